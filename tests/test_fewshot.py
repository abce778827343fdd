"""Few-shot linear evaluation (issue #16): ridge solver, support sets, ranks, bad input, CLI.

Real path: scikit-learn digits -> class folders -> pipeline.write_dataset shards -> support
images read by byte range + the eval loader -> a mu ViT's pre-logit features -> float64 ridge.
Two ranks run as two processes on gloo. The slow test pre-trains a mu ViT on digits 0-4 and
measures 10-shot accuracy on digits 5-9.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestration.evaluation import (
    EvalReport,
    FewShotConfig,
    FewShotDataError,
    ResultRow,
    RidgeSolver,
    evaluate_fewshot,
    evaluate_linear,
    fit_fewshot,
    open_pool,
    select_support,
)
from orchestration.evaluation import fewshot as fewshot_mod
from orchestration.evaluation.ridge import targets, whitening
from pipeline import IOConfig, PreprocessConfig, SourceConfig

ROOT = Path(__file__).resolve().parents[1]
IMAGE = 32


def _write_digits(dst: Path, *, classes: range = range(10), limit: int | None = None,
                  val_fraction: float = 0.2) -> str:
    from pipeline import write_dataset
    from pipeline.demo_data import make_digits_folder

    src = make_digits_folder(dst / "src", image_size=IMAGE, limit=limit)
    for c in range(10):
        if c not in classes:
            shutil.rmtree(src / str(c))
    url = str(dst / "ds")
    write_dataset(src, url, samples_per_shard=200, val_fraction=val_fraction, seed=0, progress=False)
    return url


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _write_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model import create_model
    from orchestration.tracking import write_model_dir

    torch.manual_seed(0)
    # 3 head classes on a 10-class dataset: the head is never used.
    return write_model_dir(create_model("mu/4", num_classes=3, image_size=IMAGE),
                           tmp_path_factory.mktemp("model") / "m")


# ----------------------------------------------------------------------------- ridge
@pytest.mark.parametrize("n,d", [(60, 12), (20, 48)])  # primal (N >= D) and dual (D > N) forms
def test_ridge_equals_sklearn_closed_form(n: int, d: int) -> None:
    from sklearn.linear_model import Ridge

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=g) * 3 + 1
    y = torch.randint(0, 4, (n,), generator=g)
    xw = whitening(x)(x)  # whitened + bias column, what the solver sees
    solver = RidgeSolver(xw, targets(y, 4))
    for l2 in (2.0**-6, 1.0, 2.0**8):
        ref = Ridge(alpha=l2, fit_intercept=False, solver="cholesky").fit(xw.numpy(), targets(y, 4).numpy())
        w = solver.weights(l2).numpy()
        assert w.shape == (d + 1, 4)
        assert np.abs(w - ref.coef_.T).max() <= 1e-6 * max(1.0, np.abs(ref.coef_).max())
        # the classifier = RidgeClassifier's argmax over {-1, 1} one-vs-rest scores
        clf = fit_fewshot(x, y, 4, l2=l2)
        assert torch.equal(clf.predict(x), torch.from_numpy(ref.predict(xw.numpy()).argmax(1)))


def test_loo_predictions_equal_refits_without_each_sample() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(15, 30, generator=g, dtype=torch.float64)
    y = targets(torch.randint(0, 3, (15,), generator=g), 3)
    loo = RidgeSolver(x, y).loo_predictions(0.5)
    for i in range(15):
        keep = torch.arange(15) != i
        w = RidgeSolver(x[keep], y[keep]).weights(0.5)
        assert torch.allclose(loo[i], x[i] @ w, atol=1e-9)


def test_regulariser_maximises_leave_one_out_accuracy_on_the_support_set() -> None:
    # The choice sees only the support set: it equals the best grid value by brute-force
    # leave-one-out refits (each support image held out in turn), and it is not the same
    # for every problem (a noisy support set wants more shrinkage than a clean one).
    g = torch.Generator().manual_seed(2)
    y = torch.arange(4).repeat_interleave(6)  # 6-shot, 4 classes
    grid = tuple(2.0**k for k in range(-6, 16, 3))
    chosen = []
    for noise in (0.3, 6.0):
        x = torch.randn(24, 40, generator=g) * noise
        x[torch.arange(24), y] += 1.0
        clf = fit_fewshot(x, y, 4, grid)
        white = whitening(x)
        xw, t = white(x), targets(y, 4)
        loo_acc = []
        for l2 in grid:
            hits = 0
            for i in range(24):
                keep = torch.arange(24) != i
                hits += int((xw[i] @ RidgeSolver(xw[keep], t[keep]).weights(l2)).argmax() == y[i])
            loo_acc.append(hits / 24)
        assert loo_acc[grid.index(clf.l2)] == max(loo_acc), (clf.l2, loo_acc)
        chosen.append(clf.l2)
    assert chosen[0] != chosen[1]


# ----------------------------------------------------------------------------- support sets
def test_support_sets_fixed_by_seed_nested_and_rank_independent(digits: str) -> None:
    pool = open_pool(digits)
    a, b = select_support(pool, 10, seed=0), select_support(open_pool(digits), 10, seed=0)
    assert np.array_equal(a, b)
    labels = pool.meta.labels[a]
    assert np.array_equal(labels, np.repeat(np.arange(10), 10))  # class-major, 10 each
    assert len(set(a.tolist())) == 100
    # nested: the 5-shot set is the first 5 of each class's 10
    assert np.array_equal(select_support(pool, 5, seed=0), a.reshape(10, 10)[:, :5].reshape(-1))
    assert not np.array_equal(select_support(pool, 10, seed=1), a)
    # the rank shares of support_features' split cover exactly the same images for any world size
    for world in (1, 2, 3):
        shares = [a[r::world] for r in range(world)]
        per = -(-len(a) // world)
        gathered = np.stack([np.pad(s, (0, per - len(s)), constant_values=-1) for s in shares])
        assert np.array_equal(gathered.T.reshape(-1)[: len(a)], a)


def test_too_few_images_per_class_names_the_classes_before_reading_images(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         model_file: Path) -> None:
    url = _write_digits(tmp_path, limit=80, val_fraction=0.25)  # ~6 train images per class
    read: list[int] = []
    monkeypatch.setattr(fewshot_mod, "read_images", lambda *a, **k: read.append(1))
    monkeypatch.setattr(fewshot_mod, "build_loader", lambda *a, **k: read.append(1))
    from orchestration.tracking import load_model

    with pytest.raises(FewShotDataError) as e:
        evaluate_fewshot(load_model(str(model_file)), FewShotConfig(datasets=(url,), shots=(1, 10)))
    msg = str(e.value)
    counts = np.bincount(open_pool(url).meta.labels, minlength=10)
    short = [str(c) for c in range(10) if counts[c] < 10]
    assert short and all(f"'{c}' ({counts[int(c)]})" in msg for c in short), msg
    assert "fewer than 10 train images" in msg and url in msg
    assert not read  # failed before any feature extraction


@pytest.mark.integration
def test_s3_dataset_gives_the_same_numbers_as_local_and_tampering_is_caught(
        digits: str, model_file: Path, s3_bucket: str, tmp_path: Path) -> None:
    from orchestration.tracking import load_model
    from pipeline import format as fmt
    from pipeline import open_storage, write_dataset
    from pipeline.demo_data import make_digits_folder

    url = f"s3://{s3_bucket}/fewshot/ds"
    write_dataset(make_digits_folder(tmp_path / "src", image_size=IMAGE), url, samples_per_shard=200,
                  val_fraction=0.2, seed=0, progress=False)
    model = load_model(str(model_file))
    cfg = dict(shots=(1, 5), batch_size=64)
    s3 = evaluate_fewshot(model, FewShotConfig(datasets=(url,), **cfg))
    local = evaluate_fewshot(model, FewShotConfig(datasets=(digits,), **cfg))
    assert s3.metrics == local.metrics
    # A support image changed after publishing: named, not evaluated on.
    pool = open_pool(url)
    i = int(select_support(pool, 1, seed=0)[0])
    shard = pool.meta.shard_names[int(pool.meta.shard_of[i])]
    st = open_storage(pool.meta.root_url)
    data = bytearray(st.read_bytes(shard))
    data[int(pool.meta.offsets[i]) + 200] ^= 0xFF
    st.write_bytes(shard, bytes(data))
    with pytest.raises(fmt.IntegrityError, match=pool.meta.keys[i].as_py()):
        evaluate_fewshot(model, FewShotConfig(datasets=(url,), **cfg))


# ----------------------------------------------------------------------------- ranks
def _run_ranks(world: int, model_file: Path, url: str, out: Path) -> list[dict]:
    from conftest import free_port, gloo_rank_env

    port = free_port()
    procs = []
    for rank in range(world):
        env = gloo_rank_env(rank, world, port)
        procs.append(subprocess.Popen([sys.executable, __file__, "rank", str(model_file), url,
                                       str(out / f"r{world}_{rank}.json")], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        log, _ = p.communicate(timeout=240)
        assert p.returncode == 0, log[-3000:]
    return [json.loads((out / f"r{world}_{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.integration
def test_two_ranks_give_the_same_accuracy_as_one(digits: str, model_file: Path, tmp_path: Path) -> None:
    one = _run_ranks(1, model_file, digits, tmp_path)
    two = _run_ranks(2, model_file, digits, tmp_path)
    assert two[0]["metrics"] == two[1]["metrics"] == one[0]["metrics"]
    assert two[0]["l2"] == one[0]["l2"]
    assert two[0]["support"] == one[0]["support"]  # the same images by key
    assert two[0]["counts"] == one[0]["counts"] == {"ds": 359}  # every val image once over both ranks
    assert two[0]["metrics"]["fewshot/ds/10shot"] > 0.3  # 10 classes: chance is 0.1
    # The linear probe too: every train image once over the ranks, the same fit, the same top-1.
    assert two[0]["probe"] == one[0]["probe"]
    assert one[0]["probe"]["train_images"] == 1438 and one[0]["probe"]["test_images"] == 359
    assert "linear_probe/ds/full" in one[0]["metrics"]


def _rank_main(model_file: str, url: str, out: str) -> None:
    from orchestration.tracking import load_model

    world = int(os.environ["WORLD_SIZE"])
    if world > 1:
        torch.distributed.init_process_group("gloo")
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    res = evaluate_fewshot(load_model(model_file), FewShotConfig(datasets=(url,), shots=(1, 5, 10), batch_size=32),
                           rank=rank, world_size=world)
    probe = evaluate_linear(load_model(model_file), FewShotConfig(datasets=(url,), batch_size=32), rank=rank,
                            world_size=world)
    Path(out).write_text(json.dumps({"metrics": {**res.metrics, **probe.metrics()}, "l2": res.l2,
                                     "counts": res.counts, "probe": probe.rows[0].details,
                                     "support": [r.details["support"] for r in res.report.rows]}))
    if world > 1:
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- CLI + report
#: The command users run (a file, as the issue names it) and the same file as a module.
CLI_FILE = [str(ROOT / "orchestration" / "evaluate.py")]
CLI_MODULE = ["-m", "orchestration.evaluate"]


def _cli(*args: str, entry: list[str] = CLI_FILE) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *entry, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_cli_end_to_end_on_digits(digits: str, model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = _cli("fewshot", "--model", str(model_file / "model.safetensors"), "--data", f"digits={digits}",
                "--shots", "1,5,10", "--seed", "0", "--out", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = EvalReport.read(out)
    m = rep.metrics()
    assert sorted(m) == ["fewshot/digits/10shot", "fewshot/digits/1shot", "fewshot/digits/5shot"]
    assert all(0.0 <= v <= 1.0 for v in m.values())
    assert m["fewshot/digits/10shot"] > 0.3
    assert all(r.details["l2"] > 0 and r.details["test_images"] == 359 for r in rep.rows)
    assert "fewshot/digits/10shot" in proc.stdout


@pytest.mark.integration
def test_cli_linear_probe_uses_the_whole_train_split(digits: str, model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    proc = _cli("linear", "--model", str(model_file), "--data", f"digits={digits}", "--out", str(out),
                "--device", "cpu", "--batch-size", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = EvalReport.read(out)
    (row,) = rep.rows
    assert (row.key, row.method, row.setting) == ("linear_probe/digits/full", "linear_probe", "full")
    assert row.details["train_images"] == 1438 and row.details["test_images"] == 359 and row.details["l2"] > 0
    # All 1438 train images beat 10 per class (in-process few-shot on the same frozen model).
    from orchestration.tracking import load_model

    few = evaluate_fewshot(load_model(str(model_file)), FewShotConfig(datasets=(digits,), shots=(10,)))
    assert row.value > few.metrics["fewshot/ds/10shot"] + 0.05, (row.value, few.metrics)
    assert "linear_probe/digits/full" in proc.stdout


@pytest.mark.parametrize("entry", [CLI_FILE, CLI_MODULE], ids=["file", "module"])
def test_cli_bad_input_exits_2_with_one_line_each(digits: str, tmp_path: Path, entry: list[str]) -> None:
    proc = _cli("fewshot", "--model", str(tmp_path / "nope.safetensors"), "--data", str(tmp_path / "missing"),
                "--shots", "0,x", entry=entry)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3, proc.stderr
    assert any(ln.startswith("error: --shots '0,x'") for ln in lines)
    assert any(ln.startswith("error: --model") and "nope.safetensors" in ln for ln in lines)
    assert any(ln.startswith("error: --data") and "missing" in ln for ln in lines)


def test_report_rows_round_trip_and_share_one_format(tmp_path: Path) -> None:
    rows = (ResultRow(method="fewshot", dataset="digits", setting="10shot", value=0.9, details={"l2": 4.0}),
            ResultRow(method="finetune", dataset="digits", setting="full", value=0.99),
            ResultRow(method="linear_probe", dataset="digits", setting="full", metric="top5", value=1.0))
    rep = EvalReport(model="models:/m/1", rows=rows)
    assert EvalReport.read(rep.write(tmp_path / "r.json")) == rep
    assert rep.metrics() == {"fewshot/digits/10shot": 0.9, "finetune/digits/full": 0.99,
                             "linear_probe/digits/full/top5": 1.0}
    with pytest.raises(ValueError, match="without '/'"):
        ResultRow(method="fewshot", dataset="a/b", setting="1shot", value=0.5)


def test_finetune_top1_is_a_report_row_in_mlflow_and_on_disk(tmp_path: Path) -> None:
    """finetune.py's last step: its final top-1 becomes a finetune/<dataset>/full row of the same
    report format, logged to the fine-tune's MLflow run (metric + eval/report.json) and written to --report."""
    from orchestration import finetune
    from orchestration.experiment import get_recipe
    from orchestration.tracking.runs import client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    run_id = c.create_run(c.create_experiment("ft")).info.run_id
    exp = get_recipe("vit_mu_smoke")
    summary = {"run_id": run_id, "model_uri": "models:/vit-mu4-digits-ft48/1", "top1_after": 0.875,
               "top1_before": 0.5, "source": "models:/vit-mu4-digits/1"}
    rep = finetune.finetune_report(exp, summary)
    assert rep is not None and rep.metrics() == {"finetune/digits/full": 0.875}
    finetune.publish_report(rep, run_id, uri, str(tmp_path / "out" / "report.json"))
    assert EvalReport.read(tmp_path / "out" / "report.json") == rep
    assert c.get_run(run_id).data.metrics["finetune/digits/full"] == 0.875
    logged = Path(c.download_artifacts(run_id, "eval/report.json", str(tmp_path / "dl")))
    merged = EvalReport.read(logged).merged(EvalReport(model=rep.model, rows=(
        ResultRow(method="fewshot", dataset="digits", setting="10shot", value=0.7),)))
    assert merged.metrics() == {"finetune/digits/full": 0.875, "fewshot/digits/10shot": 0.7}
    assert finetune.finetune_report(exp, {**summary, "top1_after": None}) is None  # no eval split: no row


# ----------------------------------------------------------------------------- slow: pre-training helps
def _pretrain_and_measure(tmp_path: Path, checkpoints: tuple[int, ...]) -> dict[int, float]:
    """10-shot top-1 on digits 5-9 (mean over 3 support seeds) of a mu ViT after each number of
    steps of supervised pre-training on digits 0-4 (a plain AdamW loop, pad-and-crop jitter)."""
    from model import create_model
    from pipeline import DataConfig, build_loader

    up = _write_digits(tmp_path / "up", classes=range(5), val_fraction=0.0)
    down = _write_digits(tmp_path / "down", classes=range(5, 10), val_fraction=0.5)
    ev = build_loader(DataConfig(source=SourceConfig(url=up, split="train"), image_size=IMAGE, batch_size=256, train=False, io=IOConfig(num_workers=0), preprocess=PreprocessConfig(eval_crop_pct=1.0)), rank=0, world_size=1)
    xs, ys = zip(*[(x[v], y[v]) for x, y, v in ev], strict=True)
    x_up, y_up = torch.cat(xs), torch.cat(ys)  # (901, 3, 32, 32): decoded once, jittered per step
    torch.manual_seed(0)
    model = create_model("mu/4", num_classes=5, image_size=IMAGE)
    cfgs = [FewShotConfig(datasets=(down,), shots=(10,), seed=s) for s in range(3)]
    pools = fewshot_mod.open_pools(cfgs[0])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    out, step = {}, 0
    for target in checkpoints:
        while step < target:
            idx = torch.randint(0, len(x_up), (64,), generator=g)
            xb = torch.nn.functional.pad(x_up[idx], (3, 3, 3, 3), mode="replicate")
            i, j = torch.randint(0, 7, (2,), generator=g).tolist()
            loss = torch.nn.functional.cross_entropy(model(xb[:, :, i:i + IMAGE, j:j + IMAGE]), y_up[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        accs = [evaluate_fewshot(model, c, pools=pools).metrics["fewshot/ds/10shot"] for c in cfgs]
        out[step] = sum(accs) / len(accs)
    return out


@pytest.mark.slow
def test_pretraining_on_digits_0_4_lifts_10shot_accuracy_on_5_9(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        acc = _pretrain_and_measure(tmp_path, (0, 100, 300))
    finally:
        torch.set_num_threads(threads)
    print(f"10-shot top-1 on digits 5-9 by pre-training steps on 0-4: {acc}")
    random_init = acc[0]
    assert acc[300] >= random_init + 0.08, acc  # measured 0.623 -> 0.756
    assert acc[300] - random_init > acc[100] - random_init + 0.04, acc  # the gap grows with steps


if __name__ == "__main__" and sys.argv[1] == "rank":
    _rank_main(*sys.argv[2:5])
