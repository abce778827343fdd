"""The model registry against the embedded sqlite store *and* a real ``mlflow server`` (issue #18),
safe model loading (issue #12 item 2, registry half) and credential redaction (issue #12 item 8).

Every registry test runs against three stores:

* ``embedded``: ``sqlite:///`` in-process, artifacts on local disk (``file://``);
* ``server``: ``mlflow server`` with a sqlite backend store, artifacts proxied through the
  server (``--serve-artifacts``) to a local folder (``mlflow-artifacts:/`` URIs);
* ``server-s3``: ``mlflow server`` with a file backend store, artifacts proxied to S3 (moto).

One server per store and module (started by ``conftest.mlflow_server``, health-checked,
stopped by pid). The fine-tune and pre-train Ray jobs through a server are in
tests/test_orchestration.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port, mlflow_server, s3_mlflow_env

from orchestration import tracking

PASSWORD = "pa55word-9f3c"


@pytest.fixture(scope="module", params=["embedded", "server", "server-s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tracking URI of each kind of store (see the module docstring)."""
    state = tmp_path_factory.mktemp(request.param)
    if request.param == "embedded":
        yield f"sqlite:///{state / 'mlflow.db'}"
        return
    if request.param == "server":
        with mlflow_server(state, backend=f"sqlite:///{state / 'mlflow.db'}", artifacts=str(state / "artifacts")) as url:
            yield url
        return
    s3_endpoint = request.getfixturevalue("s3_endpoint")
    import boto3

    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    # MLflow 3.17 keeps the file backend store in maintenance mode: it refuses to start on one
    # unless told that the file store is wanted.
    with mlflow_server(state, backend=str(state / "filestore"), artifacts=f"s3://{bucket}/artifacts",
                       env={**s3_mlflow_env(s3_endpoint), "MLFLOW_ALLOW_FILE_STORE": "true"}) as url:
        yield url


def _tiny_model(image_size: int = 32) -> torch.nn.Module:
    from model import create_model

    torch.manual_seed(0)
    return create_model("mu/4", num_classes=10, image_size=image_size).eval()


# ---------------------------------------------------------------------------------------------
# Registry: register, load, resolve, lineage, artifacts - identical on every store
# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_register_load_and_resolve_a_version(store_uri: str) -> None:
    name = f"vit-mu4-reg-{uuid.uuid4().hex[:6]}"
    run_id = tracking.start_run("registry-test", run_name="pretrain", tags={"recipe": "vit_mu_smoke"}, uri=store_uri)
    sink = tracking.MLflowSink(run_id, uri=store_uri, system_metrics=False)
    sink.log_metrics({"loss": 0.5}, step=3)
    sink.log_dict({"hello": "world"}, "config/experiment.json")
    model = _tiny_model()
    with tempfile.TemporaryDirectory() as tmp:  # what every training run logs (orchestration.launch.ray_train.train_worker)
        sink.log_artifact(str(tracking.write_model_dir(model, Path(tmp)) / tracking.MODEL_WEIGHTS_FILE), "weights")
    lineage = {"recipe": "vit_mu_smoke", "dataset_index_sha256": "ab" * 32, "steps": 3, "source_run_id": run_id}
    v1 = tracking.log_and_register_model(model, run_id=run_id, name=name, tags=lineage, uri=store_uri)
    v2 = tracking.log_and_register_model(model, run_id=run_id, name=name, tags=lineage, uri=store_uri)
    tracking.end_run(run_id, uri=store_uri)
    assert (v1, v2) == (1, 2)

    c = tracking.client(store_uri)
    mv = c.get_model_version(name, "1")
    assert mv.status == "READY" and mv.run_id == run_id and mv.source.startswith("models:/m-")
    assert mv.tags["dataset_index_sha256"] == "ab" * 32 and mv.tags["steps"] == "3" and mv.tags["recipe"] == "vit_mu_smoke"
    logged = c.get_logged_model(mv.source.removeprefix("models:/"))
    assert logged.source_run_id == run_id and logged.tags["vitscale.format"] == tracking.MODEL_FORMAT
    # Where the bytes live differs (that is the point of the parametrisation): a local folder for
    # the embedded store, the server's proxy (local folder or S3 behind it) for a server.
    scheme = "file" if store_uri.startswith("sqlite") else "mlflow-artifacts"
    assert logged.artifact_location.startswith(f"{scheme}:"), logged.artifact_location
    if "server-s3" in os.environ.get("PYTEST_CURRENT_TEST", ""):
        import boto3

        s3 = boto3.client("s3")
        keys = [o["Key"] for b in s3.list_buckets()["Buckets"] if b["Name"].startswith("mlflow-")
                for o in s3.list_objects_v2(Bucket=b["Name"]).get("Contents", [])]
        weights = f"{logged.model_id}/artifacts/{tracking.PYFUNC_ARTIFACTS}/{tracking.MODEL_WEIGHTS_FILE}"  # pyfunc layout
        assert any(k.endswith(weights) for k in keys), keys

    # The run itself: metrics and artifacts through whatever artifact store the server uses.
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 0.5
    import mlflow

    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config/experiment.json",
                                                tracking_uri=store_uri)
    assert json.loads(Path(local).read_text()) == {"hello": "world"}

    # Load it back by every URI form finetune/visualize accept: same weights, same outputs.
    x = torch.randn(2, 3, 32, 32)
    for uri in (f"models:/{name}/1", mv.source, f"runs:/{run_id}/weights/model.safetensors"):
        loaded = tracking.load_model(uri, store_uri)
        assert loaded.cfg == model.cfg
        torch.testing.assert_close(loaded(x), model(x))
    latest = tracking.resolve_model_source(f"models:/{name}/latest", store_uri)
    assert latest["uri"] == f"models:/{name}/2" and latest["run_id"] == run_id
    assert latest["tags"]["dataset_index_sha256"] == "ab" * 32


@pytest.mark.integration
def test_finetune_source_loads_from_registry_and_visualize_runs(store_uri: str, tmp_path: Path) -> None:
    """finetune.py's and visualize.py's model loading (``--from`` / ``--model models:/...``)."""
    import numpy as np
    from PIL import Image

    from orchestration import finetune, visualize

    name = f"vit-mu4-ft-{uuid.uuid4().hex[:6]}"
    run_id = tracking.start_run("registry-test", run_name="src", uri=store_uri)
    version = tracking.log_and_register_model(_tiny_model(), run_id=run_id, name=name,
                                              tags={"recipe": "vit_mu_smoke", "dataset": "digits"}, uri=store_uri)
    source = tracking.resolve_model_source(f"models:/{name}/{version}", store_uri)
    src = tracking.load_model(source["uri"], store_uri)
    exp = finetune.finetune_experiment(src.cfg, image_size=48, source_recipe=source["tags"]["recipe"],
                                       dataset_name=source["tags"]["dataset"], source_model_name=source["name"])
    assert exp.registered_model_name == f"{name}-ft48" and exp.model_config(10).width == src.cfg.width

    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8")).save(tmp_path / "x.jpg")
    rc = visualize.main(["--model", source["uri"], "--tracking-uri", store_uri, "--image", str(tmp_path / "x.jpg"),
                         "--out", str(tmp_path / "out")])
    assert rc == 0 and sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["x_cls_attention.png",
                                                                                   "x_rollout.png"]


# ---------------------------------------------------------------------------------------------
# Unsafe artifacts are refused, never unpickled (issue #12 item 2)
# ---------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader executed attacker code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def _malicious_pytorch_model(folder: Path, marker: Path) -> Path:
    """A genuine ``mlflow.pytorch`` model folder whose ``data/model.pth`` is attacker-written."""
    import mlflow

    mlflow.pytorch.save_model(torch.nn.Linear(2, 2), str(folder), serialization_format="pickle",
                             pip_requirements=["torch"])  # no requirement inference: seconds
    torch.save(_Payload(marker), folder / "data" / "model.pth")
    return folder


@pytest.mark.integration
def test_registered_pickle_is_refused_never_executed(store_uri: str, tmp_path: Path) -> None:

    marker = tmp_path / "pwned"
    run_id = tracking.start_run("registry-test", run_name="attacker", uri=store_uri)
    name = f"evil-{uuid.uuid4().hex[:6]}"
    # 1. An mlflow.pytorch model: MLmodel + pickled data/model.pth.
    v_pickle = tracking.register_model_dir(_malicious_pytorch_model(tmp_path / "pt", marker),
                                           run_id=run_id, name=name, tags={}, uri=store_uri)
    # 2. Our layout, but model.safetensors is a pickle and config.json is fine.
    disguised = tmp_path / "disguised"
    tracking.write_model_dir(_tiny_model(), disguised)
    torch.save(_Payload(marker), disguised / tracking.MODEL_WEIGHTS_FILE)
    v_disguised = tracking.register_model_dir(disguised, run_id=run_id, name=name, tags={}, uri=store_uri)

    with pytest.raises(tracking.UnsafeModelError, match=r"pickle files \['data/model.pth'\].*never unpickles"):
        tracking.load_model(f"models:/{name}/{v_pickle}", store_uri)
    with pytest.raises(tracking.UnsafeModelError, match="model.safetensors is not a valid safetensors file"):
        tracking.load_model(f"models:/{name}/{v_disguised}", store_uri)
    assert not marker.exists(), "a registered pickle was executed by the loader"


# ---------------------------------------------------------------------------------------------
# Credentials in the tracking URI never reach stdout/stderr (issue #12 item 8)
# ---------------------------------------------------------------------------------------------


def test_url_credentials_are_redacted_in_text_and_result_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestration.launch import pretrain_run as driver

    uri = f"http://alice:{PASSWORD}@127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.redact_text(f"API request to {uri}/api/2.0 failed") == "API request to http://***@127.0.0.1:5000/api/2.0 failed"
    assert tracking.redact_text("https://ghp_tokenvalue@github.com/x") == "https://***@github.com/x"
    # The bare password (moved into a header or message by an HTTP library) is masked too.
    assert PASSWORD not in tracking.redact_text(f"auth failed for alice/{PASSWORD}")
    driver.emit({"run_id": "r", "tracking_uri": uri}, None)
    out = capsys.readouterr().out
    assert out.startswith("VITSCALE_RESULT ") and PASSWORD not in out and "http://***@127.0.0.1:5000" in out


def _cli(args: list[str], uri: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri,
           # one attempt, short timeout: the closed-port case must fail in seconds, not minutes
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.integration
def test_password_in_tracking_uri_never_printed(store_uri: str, tmp_path: Path) -> None:
    """visualize.py with ``user:password@`` in MLFLOW_TRACKING_URI: against each server it works,
    and against a closed port (the embedded case has no URL) MLflow's exception text, which
    carries the URL, reaches stderr redacted. (pretrain/finetune result lines through a server
    with a password: tests/test_orchestration.py.)"""
    import numpy as np
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8")).save(tmp_path / "x.jpg")
    server = store_uri.startswith("http://")
    uri = (store_uri.replace("http://", f"http://alice:{PASSWORD}@") if server
           else f"http://alice:{PASSWORD}@127.0.0.1:{free_port()}")
    if server:
        run_id = tracking.start_run("redaction", run_name="r", uri=uri)
        tracking.log_and_register_model(_tiny_model(), run_id=run_id, name="vit-redact", tags={}, uri=uri)
    res = _cli(["orchestration/visualize.py", "--model", "models:/vit-redact/latest" if server else "models:/x/1",
                "--image", str(tmp_path / "x.jpg"), "--out", str(tmp_path / "att")], uri)
    assert PASSWORD not in res.stdout + res.stderr, (res.stdout + res.stderr)[-3000:]
    if server:
        assert res.returncode == 0 and "x_rollout.png" in res.stdout, res.stderr[-3000:]
    else:  # one line (exit 2, the CLI's validation), still saying where it tried to connect
        assert res.returncode == 2 and "http://***@127.0.0.1" in res.stderr, res.stderr[-3000:]
        assert "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------
# Sweeps: the study's own MLflow calls (nested trial runs, resume by tag search, study artifacts)
# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_sweep_tracking_on_every_store(store_uri: str, tmp_path: Path) -> None:
    """What orchestration/sweep.py does in MLflow, minus Ray: the Ray part is store-agnostic."""
    from orchestration.studies import points, trial
    from orchestration.studies import tune_study as driver
    from orchestration.studies.spec import StudySpec

    spec = StudySpec(name=f"s-{uuid.uuid4().hex[:6]}", overrides=(f"data.source.url={tmp_path}",), variants=("mu/4",),
                     steps=(10,), storage=str(tmp_path / "studies"), experiment="sweep-store-test",
                     tracking_uri=store_uri)
    study_run = driver._study_run(spec, tmp_path / "study.json", resume=False)
    info = points.TrialInfo(study=spec.name, trial="mu4-s10", variant="mu/4", params=1000, steps=10, samples=None,
                           seed=0, lr=1e-3, weight_decay=0.05)
    sink, trial_run = trial._trial_run(spec, info, study_run)
    sink.log_metrics({"eval_loss": 1.25}, 10)
    sink.close()
    again, resumed_run = trial._trial_run(spec, info, study_run)  # a resumed trial finds its run
    again.close()
    assert resumed_run == trial_run
    (tmp_path / "points.parquet").write_bytes(b"PAR1")
    driver._log_study(spec, study_run, {"points": tmp_path / "points.parquet"}, {"points": 3})
    tracking.end_run(study_run, uri=store_uri)

    c = tracking.client(store_uri)
    trial = c.get_run(trial_run)
    assert trial.data.tags["mlflow.parentRunId"] == study_run and trial.data.metrics["eval_loss"] == 1.25
    assert trial.data.params["trial.variant"] == "mu/4"
    assert [a.path for a in c.list_artifacts(study_run, "study")] == ["study/points.parquet"]
    assert c.get_run(study_run).data.metrics["study.points"] == 3.0


def test_public_uri_drops_only_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Ray may persist (train_loop_config, Tune params.json) is the password-less URI; each
    process gets the password back from its own MLFLOW_TRACKING_URI for the same server."""
    full = f"http://alice:{PASSWORD}@mlflow.example:5000/prefix"
    public = tracking.public_uri(full)
    assert public == "http://alice@mlflow.example:5000/prefix" and PASSWORD not in public
    for same in ("sqlite:////tmp/m.db", "http://mlflow.example:5000", "http://tok@h:1"):
        assert tracking.public_uri(same) == same
    monkeypatch.setenv("MLFLOW_TRACKING_URI", full)
    assert tracking.resolve_uri(public) == full  # same server: this process's credentials
    assert tracking.resolve_uri(None) == full
    assert tracking.resolve_uri("http://alice@other:5000") == "http://alice@other:5000"  # another server: as given
    other = f"http://bob:{PASSWORD}x@mlflow.example:5000/prefix"
    assert tracking.resolve_uri(other) == other  # an explicit password is never replaced


def test_configs_ray_persists_hold_no_password(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Ray Train's train_loop_config and Tune's param_space (-> params.json, study.json) carry the
    password-less URI; a worker resolving it in its own environment gets the full one back."""
    from orchestration.experiment import get_recipe
    from orchestration.launch.ray_train import worker_config
    from orchestration.studies.spec import StudySpec, param_space
    from orchestration.studies.tune_study import tracked_spec
    from pipeline import write_dataset
    from pipeline.demo_data import make_digits_folder

    full = f"http://alice:{PASSWORD}@127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", full)
    data = str(tmp_path / "ds")
    write_dataset(make_digits_folder(tmp_path / "f", image_size=16, limit=40), data, samples_per_shard=100,
                  workers=1, progress=False)
    cfg = worker_config(get_recipe("vit_mu_smoke"), data_url=data, run_id="r", run_dir=str(tmp_path / "run"),
                        tracking_uri=full, eval_split=None, init_weights=None, probe_images=1)
    assert PASSWORD not in json.dumps(cfg) and tracking.resolve_uri(cfg["tracking_uri"]) == full
    for given in ("", full):  # from the environment, or passed as --tracking-uri
        spec = tracked_spec(StudySpec(name="s", variants=("mu/4",), steps=(10,), storage=str(tmp_path / "st"),
                                      tracking_uri=given), tracking=True)
        space = param_space(spec, "run-1")
        assert PASSWORD not in json.dumps(spec.to_dict()) and PASSWORD not in repr(space), given
        assert tracking.resolve_uri(spec.tracking_uri) == full
