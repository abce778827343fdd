"""Orchestration: redaction, tracking sink, S3 checkpoint store, attention maps, CLI errors (unit),
and Ray jobs against a real local Ray head + moto S3 + a real ``mlflow server`` (integration).

The integration tests share one Ray head (started with infra/local/start_services.sh, stopped
with stop_services.sh) and one pre-training job, in which a training worker is SIGKILLed after
the first checkpoint: Ray Train restarts the worker group and training resumes from it. Tracking
goes where production's does: an ``mlflow server`` (sqlite store, artifacts proxied to the moto
S3 bucket), reached with a password in ``MLFLOW_TRACKING_URI`` that must never be printed. The
registry on the embedded sqlite store is tested in tests/test_registry_server.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestration import tracking

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SECRET = "sk-live-0123456789abcdef"
MLFLOW_PASSWORD = "orch-pa55word"


# ---------------------------------------------------------------------------------------------
# Unit tests
# ---------------------------------------------------------------------------------------------


def test_redaction_of_secret_env_values_and_url_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_API_TOKEN", SECRET)
    monkeypatch.setenv("DB_PASSWORD", "hunter2hunter2")
    monkeypatch.setenv("LEGACY_DSN", "mysql://app-password-xyz")
    assert tracking.redact_text(f"key={SECRET} pw=hunter2hunter2") == "key=*** pw=***"
    assert "app-password-xyz" not in tracking.redact_text("dsn=mysql://app-password-xyz")
    assert tracking.redact_text("s3://user:pa55word@host/bucket") == "s3://***@host/bucket"
    clean = tracking.redact(
        {"AWS_SECRET_ACCESS_KEY": "abc123456", "api_token": SECRET, "data.source.url": f"s3://b/{SECRET}",
         "model.num_prefix_tokens": 1, "train.optim.lr": 1e-3}
    )
    assert "AWS_SECRET_ACCESS_KEY" not in clean and "api_token" not in clean
    assert clean["data.source.url"] == "s3://b/***"
    assert clean["model.num_prefix_tokens"] == "1" and clean["train.optim.lr"] == "0.001"


def test_log_records_are_redacted(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SERVICE_SECRET", SECRET)
    logger = logging.getLogger("orchestration.test_redaction")
    logger.addFilter(tracking.RedactingFilter())
    with caplog.at_level(logging.INFO, logger="orchestration.test_redaction"):
        logger.info("connecting with %s", SECRET)
    assert SECRET not in caplog.text and "connecting with ***" in caplog.text


def test_mlflow_sink_never_stores_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run("redaction", run_name="r", tags={"note": f"token {SECRET}", "GH_TOKEN": SECRET}, uri=uri)
    sink = tracking.MLflowSink(run_id, uri=uri, system_metrics=False)
    sink.log_params({"data.source.url": f"s3://bucket/{SECRET}/x", "HF_TOKEN": SECRET, "train.optim.lr": 0.1})
    sink.log_metrics({"loss": 1.5, "nan": float("nan")}, step=3)
    sink.log_dict({"env": dict(os.environ)}, "config/env.json")
    sink.close()
    run = tracking.client(uri).get_run(run_id)
    stored = json.dumps([run.data.params, run.data.tags])
    artifact = Path(run.info.artifact_uri.replace("file://", "")) / "config" / "env.json"
    assert SECRET not in stored and SECRET not in artifact.read_text()
    assert run.data.params["train.optim.lr"] == "0.1" and run.data.params["data.source.url"] == "s3://bucket/***/x"
    assert run.data.metrics == {"loss": 1.5}
    assert artifact.is_relative_to(tmp_path), "sqlite stores keep artifacts next to the database"


def test_resume_or_start_run_is_one_function(tmp_path: Path) -> None:
    """Pre-training (a run id in latest_run.json), the study run (an id in study.json) and a trial
    (found by its tag under the study run) all continue or create their MLflow run the same way."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first, resumed = tracking.resume_or_start_run("resume", run_name="a", tags={"k": "v"}, uri=uri)
    assert not resumed
    tracking.end_run(first, "FAILED", uri=uri)
    seen: list[str] = []
    again, resumed = tracking.resume_or_start_run("resume", run_name="a", existing=first, uri=uri,
                                                  on_resume=seen.append)
    assert (again, resumed, seen) == (first, True, [first])
    assert tracking.client(uri).get_run(first).info.status == "RUNNING"
    other, resumed = tracking.resume_or_start_run("resume", run_name="b", existing="0" * 32, uri=uri)
    assert other != first and not resumed  # a pointer into another store: a new run
    tags = {"vitscale.trial": "t1"}
    child, _ = tracking.resume_or_start_run("resume", run_name="t1", parent_run_id=first, match_tags=tags,
                                            tags=tags, uri=uri)
    found, resumed = tracking.resume_or_start_run("resume", run_name="t1", parent_run_id=first, match_tags=tags,
                                                  tags=tags, uri=uri)
    assert (found, resumed) == (child, True)
    assert tracking.client(uri).get_run(child).data.tags["mlflow.parentRunId"] == first


@pytest.mark.integration
def test_storage_checkpoint_store_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    from orchestration.launch.checkpoint_store import StorageCheckpointStore
    from training.checkpoint import CheckpointStore, latest_remote

    src = tmp_path / "step10"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"x" * 100)
    (src / "sub" / "b.pt").write_bytes(b"y")
    store = StorageCheckpointStore(f"s3://{s3_bucket}/run/checkpoints")
    assert isinstance(store, CheckpointStore)
    store.upload_dir(str(src), "step10")
    store.write_text("step10/complete.json", '{"step": 10}')
    assert store.list_dirs() == ["step10"] and latest_remote(store) == "step10"
    store.download_dir("step10", str(tmp_path / "back"))
    assert (tmp_path / "back" / "sub" / "b.pt").read_bytes() == b"y"
    assert store.read_text("missing.json") is None
    store.delete_prefix("step10")
    assert store.list_dirs() == []


def test_visualize_writes_layer_head_grid_and_rollout(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from model import create_model
    from model.weights import save_weights
    from orchestration import visualize

    model = create_model("mu/4", num_classes=10, image_size=32)
    save_weights(model, tmp_path / "m.safetensors")
    Image.fromarray((np.random.default_rng(0).random((40, 52, 3)) * 255).astype("uint8")).save(tmp_path / "x.jpg")
    assert visualize.main(["--model", str(tmp_path / "m.safetensors"), "--image", str(tmp_path / "x.jpg"),
                           "--out", str(tmp_path / "out")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["x_cls_attention.png", "x_rollout.png"]
    att = visualize.compute_attention(model, torch.zeros(2, 3, 32, 32))
    assert att["cls"].shape == (2, 2, 2, 8, 8) and att["rollout"].shape == (2, 8, 8)


def test_bad_set_fails_before_ray_starts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import ray

    from orchestration import pretrain
    from pipeline import write_dataset
    from pipeline.demo_data import make_digits_folder

    rc = pretrain.main(["--recipe", "vit_mu_smoke", "--data", "/nonexistent", "--set", "train.optim.lr=fast"])
    err = capsys.readouterr().err
    assert rc == 2 and "'train.optim.lr'" in err and "expected float" in err and "'fast'" in err
    rc = pretrain.main(["--recipe", "vit_mu_smoke", "--data", "/x", "--set", "train.warmup=5"])
    assert rc == 2 and "valid keys of 'train'" in capsys.readouterr().err
    assert not ray.is_initialized()
    # --dry-run validates the dataset too: a missing one fails, a real one passes.
    assert pretrain.main(["--recipe", "vit_mu_smoke", "--data", "/x", "--workers", "1", "--dry-run"]) == 2
    assert "--data /x" in capsys.readouterr().err
    data = str(tmp_path / "ds")
    write_dataset(make_digits_folder(tmp_path / "f", image_size=16, limit=60), data, samples_per_shard=100,
                  workers=1, progress=False)
    # The recipe evaluates on 'val', which this dataset lacks: said before Ray, with the fix (#23).
    assert pretrain.main(["--recipe", "vit_mu_smoke", "--data", data, "--workers", "1", "--dry-run"]) == 2
    assert "eval.split='val'" in capsys.readouterr().err
    argv = ["--recipe", "vit_mu_smoke", "--data", data, "--workers", "1", "--set", "eval.split=none", "--dry-run"]
    assert pretrain.main(argv) == 0
    assert '"resources.workers": 1' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Integration: one Ray head, one dataset, one pre-training job (with a killed worker)
# ---------------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Ray head on 127.0.0.1 (infra/local/start_services.sh, S3 = the session's moto server).

    Yields the environment for `ray job submit` (RAY_ADDRESS, MLFLOW_TRACKING_URI, ...);
    MLFLOW_TRACKING_URI is an ``mlflow server`` (artifacts proxied to S3) with a user:password.
    """
    import boto3
    from conftest import local_services, mlflow_server, s3_mlflow_env

    state = tmp_path_factory.mktemp("services")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="orch-mlflow")
    with mlflow_server(state / "mlflow", backend=f"sqlite:///{state / 'mlflow.db'}",
                       artifacts="s3://orch-mlflow/artifacts", env=s3_mlflow_env(s3_endpoint)) as server:
        with local_services(state, MLFLOW_TRACKING_URI=server.replace("http://", f"http://vitscale:{MLFLOW_PASSWORD}@"),
                            VITSCALE_STORAGE=str(state / "runs"), VITSCALE_RAY_CPUS="3") as env:
            ray_pid = int((state / "ray.pid").read_text())
            yield env
        assert not _descendants(ray_pid), "stop_services.sh left Ray processes behind"


@pytest.fixture(scope="module")
def digits_url(ray_cluster: dict[str, str], s3_endpoint: str) -> str:
    """The digits demo set, written as shards to the moto bucket."""
    import boto3

    from pipeline.demo_data import make_digits_folder

    bucket = "orch-test"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    folder = make_digits_folder(Path(ray_cluster["STATE"]) / "digits", image_size=32, limit=800)
    url = f"s3://{bucket}/digits"
    subprocess.run(
        [sys.executable, "-m", "pipeline.write_shards", str(folder), url, "--val-fraction", "0.2",
         "--samples-per-shard", "200", "--workers", "1", "--quiet"],
        cwd=ROOT, check=True, timeout=120, env=ray_cluster,
    )
    return url


def _submit(env: dict[str, str], script: str, *args: str, timeout: float = 400) -> subprocess.Popen[str]:
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--working-dir", ".", "--entrypoint-num-cpus", "0", "--",
           "python", script, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _result(output: str) -> dict[str, Any]:
    lines = [ln for ln in output.splitlines() if ln.startswith("VITSCALE_RESULT ")]
    assert lines, f"no VITSCALE_RESULT line in the job output:\n{output[-4000:]}"
    return json.loads(lines[-1].split(" ", 1)[1])


def _kill_one_train_worker(
    env: dict[str, str], has_checkpoint: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 240
) -> int:
    """Wait for a complete checkpoint, then SIGKILL one RayTrainWorker process of our head."""
    ray_pid = int(Path(env["STATE"], "ray.pid").read_text())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before a worker could be killed:\n{proc.communicate()[0][-6000:]}")
        if has_checkpoint():
            workers = [p for p in _descendants(ray_pid) if "RayTrainWorker" in " ".join(_cmdline(p))]
            # The actor processes only: the loader's DataLoader workers are forks that carry the
            # actor's process title, and killing one of those need not fail the worker group.
            pids = {p.pid for p in workers}
            actors = [p for p in workers if _ppid(p) not in pids]
            if actors:
                victim = sorted(actors, key=lambda p: p.pid)[-1]
                os.kill(victim.pid, signal.SIGKILL)
                return victim.pid
        time.sleep(0.3)
    raise TimeoutError(f"no complete checkpoint within {timeout}s")


def _ppid(p: Any) -> int | None:
    try:
        return p.ppid()
    except Exception:  # noqa: BLE001 - the process may be gone
        return None


def _cmdline(p: Any) -> list[str]:
    try:
        return p.cmdline() or [p.name()]
    except Exception:  # noqa: BLE001 - the process may be gone
        return []


@pytest.fixture(scope="module")
def storage_url(digits_url: str) -> str:
    """Run storage (checkpoints, exports) in the same moto bucket: the S3 CheckpointStore path."""
    return digits_url.rsplit("/", 1)[0] + "/runs"


@pytest.fixture(scope="module")
def pretrained(ray_cluster: dict[str, str], digits_url: str, storage_url: str) -> dict[str, Any]:
    """`ray job submit` of a short pre-training; one worker is killed after the first checkpoint."""
    from pipeline.storage import open_storage

    env = ray_cluster
    store = open_storage(storage_url)
    proc = _submit(
        env, "orchestration/pretrain.py", "--recipe", "vit_mu_smoke", "--data", digits_url,
        "--experiment", "orch-test", "--storage", storage_url,
        "--set", "train.schedule.total_steps=90", "--set", "train.schedule.warmup_steps=5", "--set", "train.checkpoint.every=15",
        "--set", "train.eval_every=45", "--set", "train.log_every=5",
    )
    pointer = "vit_mu_smoke/latest_run.json"
    deadline = time.monotonic() + 240
    while not store.exists(pointer) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert store.exists(pointer), f"the job never created its run:\n{proc.communicate()[0][-4000:]}"
    run_id = json.loads(store.read_bytes(pointer))["run_id"]
    marker = f"vit_mu_smoke/{run_id}/checkpoints/latest_complete.json"
    try:
        killed = _kill_one_train_worker(env, lambda: store.exists(marker), proc)
    except TimeoutError:
        proc.kill()
        raise AssertionError(f"no checkpoint in time; job output:\n{proc.communicate()[0][-6000:]}") from None
    from conftest import follow_ray_job

    out, ok = follow_ray_job(proc, 500)
    assert ok, out[-6000:]
    res = _result(out)
    assert res["run_dir"] == f"{storage_url}/vit_mu_smoke/{run_id}"
    assert store.exists(f"vit_mu_smoke/{run_id}/export/model.safetensors")
    return {"result": res, "killed_pid": killed, "output": out}


@pytest.mark.integration
def test_ray_job_pretraining_is_tracked_and_registered(pretrained: dict[str, Any], ray_cluster: dict[str, str]) -> None:
    import mlflow

    res = pretrained["result"]
    uri = ray_cluster["MLFLOW_TRACKING_URI"]
    c = tracking.client(uri)
    run = c.get_run(res["run_id"])
    assert run.info.status == "FINISHED"
    for key in ("loss", "lr", "grad_norm", "images_per_s", "eval_top1", "data_wait_frac"):
        assert key in run.data.metrics, key
    assert run.data.params["train.schedule.total_steps"] == "90" and run.data.tags["recipe"] == "vit_mu_smoke"
    assert run.data.tags["dataset_index_sha256"] != "missing" and len(run.data.tags["dataset_index_sha256"]) == 64
    artifacts = {a.path for a in c.list_artifacts(res["run_id"])}
    assert {"config", "dataset", "weights", "attention"} <= artifacts
    mv = c.get_model_version("vit-mu4-digits", str(res["model_version"]))
    assert mv.run_id == res["run_id"]
    assert mv.tags["recipe"] == "vit_mu_smoke" and mv.tags["steps"] == "90"
    assert mv.tags["dataset_index_sha256"] == run.data.tags["dataset_index_sha256"]
    # The job ran from Ray's copy of the checkout, without .git: the commit is still the checkout's.
    assert mv.tags["git_commit"] == run.data.tags["git_commit"] == tracking.git_commit() != "unknown"
    model = tracking.load_model(res["model_uri"], uri)  # safetensors + config.json, no pickle
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert mv.source.startswith("models:/m-")  # a logged model: what the server validates against model_id
    assert not any(f.path.endswith((".pth", ".pkl")) for f in mlflow.artifacts.list_artifacts(res["model_uri"]))
    # The password in MLFLOW_TRACKING_URI never reaches the job's output (result line included).
    assert MLFLOW_PASSWORD not in pretrained["output"]
    assert res["tracking_uri"] == uri.replace(f"vitscale:{MLFLOW_PASSWORD}@", "***@")


@pytest.mark.integration
def test_ray_job_logs_show_training_progress(pretrained: dict[str, Any], ray_cluster: dict[str, str]) -> None:
    """Rank 0's progress lines (training.progress) reach `ray job logs`, each once."""
    job = re.search(r"Job '(raysubmit_\w+)' submitted successfully", pretrained["output"])
    assert job, pretrained["output"][-3000:]
    logs = subprocess.run([str(VENV_BIN / "ray"), "job", "logs", job[1]], env=ray_cluster, capture_output=True,
                          text=True, timeout=120)
    assert logs.returncode == 0, logs.stderr[-3000:]
    out = logs.stdout
    for pattern in (r"\[train\] steps 0 -> 90 of 90, on 2 x cpu \(cpu profile",
                    r"\[train\] step +5/90 +\d+%  loss [\d.]+  lr \S+  [\d.]+ img/s  data-wait \d+%  elapsed \S+  ETA \S+",
                    r"\[train\] resuming at step \d+: steps \d+ -> 90",  # the attempt after the killed worker
                    r"\[eval\] step 45/90  eval_top1 [\d.]+", r"\[checkpoint\] step 15/90  step15 saved"):
        assert re.search(pattern, out), f"{pattern!r} not in the job's log:\n{out[-6000:]}"
    done = re.findall(r"\[train\] done: step 90/90, \d+ steps in \S+ .*eval_top1 [\d.]+", out)
    assert len(done) == 1, out[-6000:]  # rank 0 only, once (not doubled by Ray Train's print patch)


@pytest.mark.integration
def test_killed_worker_resumes_from_checkpoint(pretrained: dict[str, Any], ray_cluster: dict[str, str]) -> None:
    res = pretrained["result"]
    assert res["metrics"]["step"] == 90
    resumed = res["metrics"]["resumed_from_step"]
    assert resumed >= 15 and resumed % 15 == 0, (
        f"last attempt resumed from step {resumed}, expected a checkpoint; job output:\n{pretrained['output'][-8000:]}")
    hist = tracking.metric_history(res["run_id"], "attempt/resumed_from_step", ray_cluster["MLFLOW_TRACKING_URI"])
    assert [v for _, v in hist][0] == 0 and max(v for _, v in hist) >= 15, hist


@pytest.mark.integration
def test_finetune_from_registry_at_higher_resolution(pretrained: dict[str, Any], ray_cluster: dict[str, str],
                                                      digits_url: str, storage_url: str) -> None:
    src = pretrained["result"]
    proc = _submit(
        ray_cluster, "orchestration/finetune.py", "--from", src["model_uri"], "--data", digits_url,
        "--storage", storage_url,
        "--image-size", "48", "--workers", "1", "--gpus-per-worker", "0",
        "--set", "train.schedule.total_steps=20", "--set", "train.schedule.warmup_steps=2", "--set", "train.global_batch=32",
        "--set", "train.eval_every=20", "--set", "train.checkpoint.every=20",
    )
    from conftest import follow_ray_job

    out, ok = follow_ray_job(proc, 400)
    assert ok, out[-6000:]
    res = _result(out)
    assert res["model_name"] == "vit-mu4-digits-ft48" and res["image_size_after"] == 48
    assert res["top1_before"] is not None and res["top1_after"] is not None
    assert res["report"] == {"finetune/digits/full": res["top1_after"]}  # the evaluation report format
    c = tracking.client(ray_cluster["MLFLOW_TRACKING_URI"])
    run = c.get_run(res["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == src["run_id"]
    assert run.data.params["train.optim.name"] == "sgd" and run.data.params["train.optim.weight_decay"] == "0.0"
    assert run.data.params["train.schedule.decay"] == "cosine" and run.data.params["train.optim.momentum"] == "0.9"
    mv = c.get_model_version("vit-mu4-digits-ft48", str(res["model_version"]))
    assert mv.tags["finetune_from"] == src["model_uri"]
    assert MLFLOW_PASSWORD not in out
    model = tracking.load_model(res["model_uri"], ray_cluster["MLFLOW_TRACKING_URI"])
    assert model.cfg.image_size == 48 and model.cfg.representation_size is None
    assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 10)
