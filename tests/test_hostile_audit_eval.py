"""Issue #32 findings 5 and 6 (and #30 item 6): results that look complete or measured and are not.

Audit (real datasets of photo crops written by the real writer, audited on a local Ray): damaged
``--against`` data and a partial decode fraction are stated (stdout, summary.txt, audit.json) and
stop ``--write-filtered`` unless ``--allow-incomplete``; DEST problems are found before the audit;
a dataset filtered away entirely saves its report and says nothing was left to write.

Evaluation (tiny digits datasets, a mu ViT): a 1-class dataset, a class without train images and
NaN weights are refused with one ``error:`` line and exit 2 (few-shot, linear probe, visualize);
during training the few-shot hook logs ``fewshot/failed`` instead of crashing the run.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline import format as fmt
from pipeline import write_dataset

IMAGE = 32
RAY_ARGS = ["--quiet", "--tasks", "2", "--cpus-per-task", "0.5"]


# ----------------------------------------------------------------------------- audit
@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    from orchestration.launch.cluster import connect_ray

    connect_ray()  # a private local Ray (its own auth token, nothing under ~/.ray)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """main: 12 train + 4 val photos and 2 train re-encodings of val images (near duplicates);
    eval: copies of 6 train images as a 'test' set, one image per shard; all: every original."""
    from test_prepare_ray import _distinct_photos, _reencode, _write

    photos = _distinct_photos(16, seed=11)
    files = [(f"t{i}.jpg", p, f"c{i % 3}", "train") for i, p in enumerate(photos[:12])]
    files += [(f"v{i}.jpg", p, f"c{i % 3}", "val") for i, p in enumerate(photos[12:])]
    files += [(f"t_near_v{i}.jpg", _reencode(photos[12 + i], 0.7, 60), "c0", "train") for i in (1, 2)]
    tmp = tmp_path_factory.mktemp("hostile_audit")
    return {"main": _write(tmp / "main", files),
            "eval": _write(tmp / "eval", [(f"e{i}.jpg", p, "c0", "test") for i, p in enumerate(photos[:6])],
                           per_shard=1),
            "all": _write(tmp / "all", [(f"a{i}.jpg", p, "c0", "test") for i, p in enumerate(photos)]),
            "tmp": str(tmp)}


def _audit(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from orchestration.audit import main

    code = 0
    try:
        main([*args, *RAY_ARGS])
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _damage(url: str, shards: list[int]) -> list[str]:
    """Flip bytes inside the given shards (by index.parquet row); returns their names."""
    res = fmt.resolve(url)
    names = [fmt.read_index(res).to_pylist()[i]["shard"] for i in shards]
    for name in names:
        path = Path(res.root_url) / name
        data = bytearray(path.read_bytes())
        data[700] ^= 0xFF
        path.write_bytes(bytes(data))
    return names


def test_damaged_against_data_is_stated_and_stops_the_filtered_copy(
        sets: dict[str, str], ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Finding 5a: 2 corrupt --against shards used to give exit 0, a silent summary and a
    'de-duplicated' copy that kept the images of those shards."""
    ev = str(tmp_path / "eval")
    shutil.copytree(sets["eval"], ev)
    bad = _damage(ev, [1, 3])
    dest, rep = tmp_path / "filtered", tmp_path / "rep"
    code, out, _ = _audit(capsys, sets["main"], "--against", ev, "--write-filtered", str(dest), "--report", str(rep))
    assert code == 1  # a shard failed its check, and the requested copy was not written
    assert not dest.exists()
    summary = (rep / "summary.txt").read_text()
    for text in (out, summary):
        assert all(f"BAD shard {b} of --against {ev}" in text for b in bad), text
        assert f"INCOMPLETE: --against {ev}: 2 of 6 shards are damaged, so 2 of its 6 images were not compared" \
            in text, text
        assert f"filtered dataset {dest}: NOT written" in text and "--allow-incomplete" in text
    report = json.loads((rep / "audit.json").read_text())
    assert report["complete"] is False and len(report["incomplete"]) == 1
    assert report["filtered"]["written"] is False
    assert len(report["near_duplicates"]["against"][ev]) == 4  # the 4 intact shards' copies were found
    result = json.loads(out.strip().splitlines()[-1].split(" ", 1)[1])
    assert result["complete"] == 0 and result["against_bad_shards"] == 2 and result["filtered_written"] == 0

    # Told to: written, and both the report and the copy's manifest say it is from a partial comparison.
    code, out, _ = _audit(capsys, sets["main"], "--against", ev, "--write-filtered", str(dest), "--allow-incomplete")
    assert code == 1  # the damaged shards are still a failed check
    assert "from an INCOMPLETE comparison" in out and "INCOMPLETE: --against" in out
    res = fmt.resolve(str(dest))
    assert "INCOMPLETE comparison" in res.manifest["source"]
    # The 4 found copies and the 2 train near copies of val images dropped; the 2 unseen copies remain.
    assert len(fmt.read_samples(res)) == 18 - 4 - 2


def test_self_deduplication_decodes_everything_or_says_it_did_not(
        sets: dict[str, str], ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 5b: --write-filtered with the default --decode-fraction 0.1 de-duplicated only the
    decoded 10% without saying so."""
    main = sets["main"]
    # The default with --write-filtered decodes every image: both planted near copies are dropped.
    code, out, _ = _audit(capsys, main, "--write-filtered", str(tmp_path / "full"), "--report", str(tmp_path / "r1"))
    assert code == 0, out
    report = json.loads((tmp_path / "r1" / "audit.json").read_text())
    assert report["decode_fraction"] == 1.0 and report["complete"] is True and report["incomplete"] == []
    assert len(report["near_duplicates"]["across_splits"]) == 2
    assert report["filtered"]["dropped_by_reason"] == {"duplicate": 2} and report["filtered"]["kept"] == 16
    assert "INCOMPLETE" not in out

    # An explicit partial fraction: refused before any shard is read ...
    import orchestration.audit as audit_cli

    audited: list[str] = []
    monkeypatch.setattr(audit_cli, "audit_dataset", lambda url, *a: audited.append(url))
    code, _, err = _audit(capsys, main, "--decode-fraction", "0.5", "--write-filtered", str(tmp_path / "half"))
    assert code == 2 and not audited
    assert "--write-filtered with --decode-fraction 0.5" in err and "--allow-incomplete" in err
    monkeypatch.undo()
    # ... or written when told to, stated in stdout, summary.txt, audit.json and the copy's manifest.
    code, out, _ = _audit(capsys, main, "--decode-fraction", "0.5", "--write-filtered", str(tmp_path / "half"),
                          "--allow-incomplete", "--report", str(tmp_path / "r2"))
    assert code == 0
    report = json.loads((tmp_path / "r2" / "audit.json").read_text())
    decoded = report["image_size"]["decoded"]
    gap = f"decoded 50% of the images only ({decoded} of 18)"
    assert report["complete"] is False and gap in report["incomplete"][0]
    assert report["filtered"]["complete"] is False
    for text in (out, (tmp_path / "r2" / "summary.txt").read_text()):
        assert f"INCOMPLETE: near duplicates across splits were looked for among the {gap}" in text
        assert "from an INCOMPLETE comparison" in text and "audit INCOMPLETE" in text
    assert "INCOMPLETE comparison" in fmt.resolve(str(tmp_path / "half")).manifest["source"]


def test_everything_filtered_saves_the_report_and_says_nothing_was_left(
        sets: dict[str, str], ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Finding 5c / #30 item 6: every image matching --against ended in a WriterError traceback, no report."""
    dest, rep = tmp_path / "filtered", tmp_path / "rep"
    code, out, err = _audit(capsys, sets["main"], "--against", sets["all"], "--write-filtered", str(dest),
                            "--report", str(rep))
    assert code == 1 and "Traceback" not in err
    line = f"filtered dataset {dest}: NOT written: nothing left to write: all 18 samples were dropped (duplicate: 18)"
    assert line in out and line in (rep / "summary.txt").read_text()
    report = json.loads((rep / "audit.json").read_text())
    assert report["filtered"]["written"] is False and report["filtered"]["kept"] == 0
    assert report["complete"] is True and not dest.exists()


def test_filtered_destination_problems_are_found_before_the_audit(
        sets: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 5d: DEST a regular file, or an existing dataset without --overwrite, failed only after
    the whole audit (no Ray here: the check comes first)."""
    import orchestration.audit as audit_cli

    audited: list[str] = []
    monkeypatch.setattr(audit_cli, "audit_dataset", lambda url, *a: audited.append(url))
    monkeypatch.setattr(audit_cli, "connect", lambda *a: audited.append("connect"))
    afile = tmp_path / "a_file"
    afile.write_text("not a folder")
    code, _, err = _audit(capsys, sets["main"], "--write-filtered", str(afile))
    assert code == 2 and f"error: --write-filtered {afile}: {afile} is not a folder" in err
    code, _, err = _audit(capsys, sets["main"], "--write-filtered", sets["eval"])
    version = fmt.resolve(sets["eval"]).version
    assert code == 2 and f"--write-filtered {sets['eval']} already publishes dataset version {version}" in err
    assert "--overwrite" in err
    assert not audited


# ----------------------------------------------------------------------------- evaluation
def _digits(dst: Path, rows: list[tuple[int, str]] | None = None, classes: tuple[int, ...] = tuple(range(10)),
            limit: int = 300) -> str:
    """A digits dataset: class folders (``classes``, 20% val) or, with ``rows`` = (class, split)
    rules, a manifest placing every image of that class in that split."""
    from pipeline.demo_data import make_digits_folder

    src = make_digits_folder(dst / "src", image_size=IMAGE, limit=limit)
    for c in range(10):
        if c not in classes:
            shutil.rmtree(src / str(c))
    url = str(dst / "ds")
    if rows is None:
        write_dataset(src, url, samples_per_shard=200, val_fraction=0.2, seed=0, progress=False)
        return url
    lines = ["path,label,split"]
    for c in classes:
        for i, img in enumerate(sorted((src / str(c)).iterdir())):
            split = dict(rows).get(c) or ("val" if i % 4 == 0 else "train")
            lines.append(f"{img},{c},{split}")
    (dst / "m.csv").write_text("\n".join(lines) + "\n")
    write_dataset(dst / "m.csv", url, samples_per_shard=200, progress=False)
    return url


def _model(dst: Path, nan: bool = False) -> Path:
    from model import create_model
    from orchestration.tracking import write_model_dir

    torch.manual_seed(0)
    m = create_model("mu/4", num_classes=3, image_size=IMAGE)
    if nan:  # a diverged run's checkpoint
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(float("nan"))
    return write_model_dir(m, dst)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hostile_models")
    return {"ok": _model(tmp / "ok"), "nan": _model(tmp / "nan", nan=True)}


def _evaluate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from orchestration.evaluate import main

    code = main([*args, "--device", "cpu", "--batch-size", "64"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_one_class_dataset_is_not_a_measurement(models: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Finding 6a: fewshot|linear on a 1-class dataset printed 1.0000, exit 0."""
    from orchestration.evaluation import FewShotConfig, evaluate_linear
    from orchestration.tracking import load_model

    url = _digits(tmp_path, classes=(3,))
    for cmd, extra in (("fewshot", ["--shots", "1"]), ("linear", [])):
        code, out, err = _evaluate(capsys, cmd, "--model", str(models["ok"]), "--data", url, *extra)
        assert code == 2 and out == "", (cmd, out)
        (line,) = err.strip().splitlines()
        assert line.startswith(f"error: --data {url}: 1 class(es) ['3']: top-1 over fewer than 2 classes"), line
    with pytest.raises(ValueError, match="fewer than 2 classes"):  # in-process too: an EvaluationError
        evaluate_linear(load_model(str(models["ok"])), FewShotConfig(datasets=(url,)))


def test_linear_probe_refuses_a_class_without_train_images(models: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Finding 6b: a class with 0 training images gave a silent number (0.5000 in the issue)."""
    url = _digits(tmp_path, rows=[(2, "val")], classes=(0, 1, 2))  # class '2' only in val
    code, out, err = _evaluate(capsys, "linear", "--model", str(models["ok"]), "--data", url)
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line == (f"error: --data {url}: 1 of 3 classes have no train images: '2'; a classifier can never "
                    "predict them; write the dataset so every class has train images")


def test_nan_checkpoint_is_refused_by_fewshot_linear_and_visualize(
        models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Finding 6c: NaN weights ended few-shot in a LinAlgError traceback; visualize drew blank maps, exit 0."""
    from orchestration.evaluation import FewShotConfig, evaluate_fewshot, evaluate_linear
    from orchestration.tracking import load_model
    from orchestration.tracking.attention_figures import attention_figures, load_image
    from orchestration.visualize import main as visualize

    url = _digits(tmp_path, classes=(0, 1, 2), limit=120)
    nan = str(models["nan"])
    for cmd, extra in (("fewshot", ["--shots", "1"]), ("linear", [])):
        code, out, err = _evaluate(capsys, cmd, "--model", nan, "--data", url, *extra)
        assert code == 2 and out == ""
        (line,) = err.strip().splitlines()
        assert line.startswith(f"error: --model {nan}: ") and "hold NaN/Inf values" in line, line
    # In-process, the features are caught before the ridge solver (no LinAlgError).
    for run in (evaluate_fewshot, evaluate_linear):
        with pytest.raises(ValueError, match="(support|probe training) features.*NaN/Inf"):  # NonFiniteError
            run(load_model(nan), FewShotConfig(datasets=(url,), shots=(1,), batch_size=64))
    # visualize: one error line, exit 2, no PNG.
    img = next((Path(url).parent / "src" / "0").iterdir())
    out_dir = tmp_path / "attn"
    assert visualize(["--model", nan, "--image", str(img), "--out", str(out_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --model {nan}: ") and "NaN/Inf" in err[0]
    assert not list(out_dir.glob("*.png"))
    # The attention itself is checked too (what the MLflow sink draws during training).
    with pytest.raises(ValueError, match="attention holds NaN/Inf"):  # NonFiniteAttention
        attention_figures(load_model(nan), load_image(img, IMAGE), out_dir)
    assert not list(out_dir.glob("*.png"))


def test_fewshot_during_training_logs_failure_instead_of_crashing(
        models: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The few-shot hook on a model gone NaN: no accuracy, fewshot/failed = 1 and a warning, no crash;
    a 1-class downstream set is named before launch."""
    from orchestration.evaluation.in_training import fewshot_data_problems, fewshot_hooks
    from orchestration.experiment import get_recipe
    from orchestration.tracking import load_model

    url = _digits(tmp_path / "three", classes=(0, 1, 2), limit=120)
    exp = get_recipe("vit_mu_smoke")
    exp = replace(exp, eval=replace(exp.eval, fewshot_data=(f"d={url}",), fewshot_shots=(1,)))
    (hook,) = fewshot_hooks(exp, rank=0, world=1)
    ok = hook.fn(load_model(str(models["ok"])), 3)
    assert set(ok) == {"fewshot/d/1shot"}
    with caplog.at_level(logging.WARNING, logger="orchestration.evaluation.in_training"):
        assert hook.fn(load_model(str(models["nan"])), 4) == {"fewshot/failed": 1.0}
    assert "step 4 is not a measurement" in caplog.text and "NaN/Inf" in caplog.text
    one = _digits(tmp_path / "one", classes=(5,))
    problems = fewshot_data_problems(replace(exp, eval=replace(exp.eval, fewshot_data=(one,))))
    assert len(problems) == 1 and "fewer than 2 classes" in problems[0], problems
