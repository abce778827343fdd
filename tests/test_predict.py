"""Batch prediction over a whole split on Ray Data (issue #27): ``orchestration/predict.py``.

A digits dataset (6 val shards, one sample deliberately corrupt and resealed, as data that was
bad when written) and a model registered with the alias ``champion``:

* a clean pass of the job (every shard through the actors' per-shard code, in-process) writes one
  Parquet file per shard whose rows are the shard's samples in order, with the same top-k and
  embeddings as the Predictor on the same bytes; the corrupt sample has its error and no
  prediction, every other sample is predicted;
* ``predict.py`` on Ray is killed (SIGKILL, the whole process group) while some shards are done
  and some are not; the same command run again skips the finished shards, shows its progress,
  lists the bad sample in its summary and leaves the same Parquet content as the clean pass;
* another job into the same ``--out`` is refused; a tampered shard stops the job (exit 1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ROOT

from orchestration import tracking
from orchestration.serving.spec import ServingSpec

pytestmark = pytest.mark.integration

IMG = 16
SHARDS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from model import create_model
    from pipeline import format as fmt
    from pipeline import write_dataset
    from pipeline.demo_data import make_digits_folder

    tmp = tmp_path_factory.mktemp("predict")
    url = str(tmp / "digits")
    write_dataset(make_digits_folder(tmp / "src", image_size=IMG, limit=120), url, samples_per_shard=10,
                  val_fraction=0.5, seed=0, progress=False)
    res = fmt.resolve(url)
    rows = [r for r in fmt.read_samples(res).to_pylist() if r["split"] == "val"]
    assert len({r["shard"] for r in rows}) == SHARDS
    bad = rows[13]  # second val shard: garbage of the same size, recorded as written (reseal)
    shard = Path(res.root_url) / bad["shard"]
    data = bytearray(shard.read_bytes())
    data[bad["offset"]:bad["offset"] + bad["size"]] = b"\x00" * bad["size"]
    shard.write_bytes(bytes(data))
    fmt.reseal(url)

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    torch.manual_seed(0)
    model = create_model("mu/4", num_classes=10, image_size=IMG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    run_id = tracking.start_run("predict-test", run_name="src", uri=uri)
    version = tracking.log_and_register_model(model, run_id=run_id, name="vit-digits", tags={}, uri=uri,
                                              serving=ServingSpec(image_size=IMG, class_names=[str(i) for i in
                                                                                               range(10)]))
    tracking.client(uri).set_registered_model_alias("vit-digits", "champion", str(version))
    return {"url": url, "uri": uri, "tmp": tmp, "bad_key": bad["key"], "bad_shard": bad["shard"], "rows": rows,
            "model": model}


def _cmd(setup: dict[str, Any], out: Path, *extra: str) -> list[str]:
    return ["orchestration/predict.py", "--model", "models:/vit-digits@champion", "--data", setup["url"],
            "--split", "val", "--out", str(out), "--top-k", "3", "--embedding", "--batch-size", "4", *extra]


def _env(setup: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "MLFLOW_TRACKING_URI": setup["uri"], "PYTHONPATH": str(ROOT)}


def _run(setup: dict[str, Any], argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=_env(setup), capture_output=True, text=True,
                          timeout=timeout)


def _tables(out: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    return {p.name: pq.read_table(p) for p in sorted(out.glob("*.parquet"))}


def _clean_reference(setup: dict[str, Any], out: Path) -> None:
    """One uninterrupted pass of the job, in-process: every shard through the per-shard code the Ray
    actors run (ShardPredictor.predict_shard), without Ray (one Ray start fewer for the test)."""
    from orchestration.serving.batch import PredictConfig, ShardPredictor, check_job
    from pipeline import format as fmt

    cfg = PredictConfig(model_uri="models:/vit-digits/1", data_url=setup["url"], split="val", out_url=str(out),
                        dataset_version=fmt.resolve(setup["url"]).version, top_k=3, embedding=True, batch_size=4,
                        tracking_uri=setup["uri"])
    check_job(cfg)
    worker = ShardPredictor(cfg)
    for s in range(len(worker.meta.shard_names)):
        worker.predict_shard(s)


def test_predict_killed_half_way_and_rerun_gives_the_same_parquet_as_a_clean_run(setup: dict[str, Any]) -> None:
    from orchestration.serving.predictor import Predictor
    from orchestration.tracking.registry import write_model_dir

    clean = setup["tmp"] / "clean"
    _clean_reference(setup, clean)
    tables = _tables(clean)
    assert len(tables) == SHARDS

    # Every sample, in shard order; predictions equal the Predictor's on the same bytes.
    from pipeline import format as fmt

    res = fmt.resolve(setup["url"])
    plain = write_model_dir(setup["model"], setup["tmp"] / "plain")
    (plain / "serving.json").write_text(ServingSpec(image_size=IMG, class_names=[str(i) for i in range(10)]).to_json())
    pred = Predictor.from_dir(plain)
    st = res.storage()
    for row_shard in sorted({r["shard"] for r in setup["rows"]}):
        rows = [r for r in setup["rows"] if r["shard"] == row_shard]
        t = tables[row_shard.rsplit("/", 1)[-1].replace(".tar", ".parquet")].to_pylist()
        assert [x["key"] for x in t] == [r["key"] for r in rows]
        blob = st.read_bytes(row_shard)
        want = pred.predict([blob[r["offset"]:r["offset"] + r["size"]] for r in rows], top_k=3, return_embedding=True,
                            strict=False)
        for got, exp in zip(t, want, strict=True):
            if "error" in exp:
                assert got["key"] == setup["bad_key"] and got["classes"] is None and got["error"] == exp["error"]
                continue
            assert got["error"] is None and got["classes"] == exp["classes"]
            np.testing.assert_allclose(got["probabilities"], exp["probabilities"], atol=1e-6)
            np.testing.assert_allclose(got["embedding"], exp["embedding"], atol=1e-6)

    # Killed half-way (slow shards, so there is a "half"), then the same command again.
    resumed = setup["tmp"] / "resumed"
    log = setup["tmp"] / "killed.log"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "tests/predict_slow_driver.py", "1.5", *_cmd(setup, resumed)[1:]],
                                cwd=ROOT, env=_env(setup), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            done = list((resumed / "_done").glob("*.json")) if (resumed / "_done").exists() else []
            if done:
                break
            time.sleep(0.05)
        done_at_kill = len(list((resumed / "_done").glob("*.json")))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert 1 <= done_at_kill < SHARDS, (done_at_kill, log.read_text()[-3000:])
    r = _run(setup, _cmd(setup, resumed))
    assert r.returncode == 0, r.stderr[-4000:]
    skipped = int(r.stdout.split(" already done")[0].rsplit(";", 1)[-1].strip())
    assert skipped >= done_at_kill and "(resumed)" in r.stdout and f"{SHARDS}/{SHARDS} shards" in r.stdout
    assert "[predict] done: 60 images in 6 shards, 1 bad" in r.stdout
    again = _tables(resumed)
    assert sorted(again) == sorted(tables)
    for name, t in tables.items():
        assert again[name].equals(t), name
    summary = json.loads((resumed / "_summary.json").read_text())
    assert summary["bad_samples"] == [{"shard": setup["bad_shard"], "key": setup["bad_key"],
                                       "error": summary["bad_samples"][0]["error"]}]
    assert summary["bad_samples"][0]["error"].startswith("corrupt_image")


def test_predict_refuses_another_job_in_the_same_out_and_tampered_data(setup: dict[str, Any]) -> None:
    out = setup["tmp"] / "clean-2"
    (out).mkdir()
    (out / "_job.json").write_text(json.dumps({"model": "models:/vit-digits/9", "data": setup["url"]}))
    r = _run(setup, _cmd(setup, out))  # refused while validating, before Ray starts
    assert r.returncode == 2 and "holds predictions of another job" in r.stderr and "model: " in r.stderr

    # A shard modified after publishing (one flipped byte, not resealed) stops the shard's
    # prediction, naming the sample, like the loader; nothing is written for it. (In-process: the
    # same per-shard code the Ray actors run.)
    from orchestration.serving.batch import PredictConfig, ShardPredictor, output_name
    from pipeline import format as fmt

    res = fmt.resolve(setup["url"])
    row = setup["rows"][25]
    shard = Path(res.root_url) / row["shard"]
    original = shard.read_bytes()
    data = bytearray(original)
    data[row["offset"] + row["size"] // 2] ^= 0xFF
    out = setup["tmp"] / "tampered"
    cfg = PredictConfig(model_uri="models:/vit-digits/1", data_url=setup["url"], split="val", out_url=str(out),
                        dataset_version=res.version, tracking_uri=setup["uri"])
    worker = ShardPredictor(cfg)
    index = list(worker.meta.shard_names).index(row["shard"])
    try:
        shard.write_bytes(bytes(data))
        with pytest.raises(fmt.IntegrityError, match=f"sample {row['key']} in shard .* does not match the sha256"):
            worker.predict_shard(index)
    finally:
        shard.write_bytes(original)
    assert not (out / output_name(row["shard"])).exists()


def test_registration_records_the_recipes_eval_transform_and_the_datasets_classes(setup: dict[str, Any]) -> None:
    """register_from_run (what every training run ends with) writes serving.json from the run's
    Experiment: its mean/std/crop and image size, and the dataset's class names; an MAE encoder
    (no head) serves embeddings."""
    import dataclasses

    from model.weights import save_weights
    from orchestration.experiment.recipes import vit_mu_smoke
    from orchestration.experiment.recipes_mae import mae_vit_mu_digits
    from orchestration.launch.pretrain_run import register_from_run
    from orchestration.serving.predictor import Predictor
    from pipeline import PreprocessConfig
    from pipeline import format as fmt

    exp = vit_mu_smoke()
    pre = PreprocessConfig(mean=(0.4, 0.45, 0.5), std=(0.2, 0.25, 0.3), eval_crop_pct=0.8)
    exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, preprocess=pre))
    run_dir = setup["tmp"] / "run"
    (run_dir / "export").mkdir(parents=True)
    save_weights(setup["model"], run_dir / "export" / "model.safetensors")
    run_id = tracking.start_run("predict-test", run_name="trained", uri=setup["uri"])
    version = register_from_run(exp, run_id=run_id, run_dir=str(run_dir), report={"step": 3},
                                lineage={"data_url": setup["url"]}, uri=setup["uri"])
    import mlflow

    local = mlflow.artifacts.download_artifacts(f"models:/{exp.model_name}/{version}",
                                                dst_path=str(setup["tmp"] / "dl"), tracking_uri=setup["uri"])
    spec = Predictor.from_dir(local).spec
    assert (spec.mean, spec.std, spec.crop_pct, spec.image_size) == (pre.mean, pre.std, 0.8, IMG)
    assert list(spec.class_names) == fmt.read_classes(fmt.resolve(setup["url"])) and spec.activation == "softmax"

    mae = mae_vit_mu_digits()
    encoder = mae.model_config(10)
    assert encoder.num_classes == 0
    from model import VisionTransformer

    save_weights(VisionTransformer(dataclasses.replace(encoder, image_size=IMG)), run_dir / "export" / "model.safetensors")
    mae = dataclasses.replace(mae, image_size=IMG)
    version = register_from_run(mae, run_id=run_id, run_dir=str(run_dir), report={}, lineage={"data_url": setup["url"]},
                                uri=setup["uri"])
    local = mlflow.artifacts.download_artifacts(f"models:/{mae.model_name}/{version}",
                                                dst_path=str(setup["tmp"] / "dl2"), tracking_uri=setup["uri"])
    assert Predictor.from_dir(local).spec.embedding_only
