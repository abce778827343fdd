"""MLflow tracking, model registry and secret redaction.

* Tracking URI: ``$MLFLOW_TRACKING_URI``, else an embedded ``sqlite:///<project>/mlflow.db``
  (the model registry works on sqlite). Artifacts of sqlite stores go to ``mlruns/`` next to
  the database file, so a ``ray job submit --working-dir`` copy of the repo never swallows them.
* :class:`MLflowSink` implements ``training.metrics.MetricsSink`` for rank 0. It talks to one
  run by id through :class:`mlflow.MlflowClient` (no global "active run"), so the driver creates
  the run and any Ray worker - including a restarted one - keeps appending to it.
* :func:`log_and_register_model` logs the model as an MLflow *logged model* whose artifacts are
  ``model.safetensors`` + ``config.json`` (no pickle) and registers it as ``vit-<variant>-<dataset>``
  with lineage tags; :func:`load_model` rebuilds it from those two files and never unpickles.
* Embedded store vs ``mlflow server``: a server validates a model version's source against the
  ids sent with it (``models:/m-...`` needs ``model_id``), stores artifacts behind
  ``mlflow-artifacts:/`` (proxied, local disk or S3) instead of ``file://`` paths, and puts the
  tracking URI (user-info included) into its messages. Registration sends ``model_id`` and
  ``run_id``, every artifact goes through MLflow's artifact API (never a local path), and every
  printed or logged line is redacted.
* Redaction: no environment variable whose *name* contains KEY/SECRET/TOKEN/PASSWORD (nor its
  value) ever reaches params, tags or log records; URL user-info is masked too, in log records,
  tracebacks and everything the CLIs print (:func:`install_log_redaction`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

if TYPE_CHECKING:
    from model import VisionTransformer

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD")
REDACTED = "***"
_MIN_SECRET_LEN = 6  # shorter values ("1", "on", "token") would mask half the config
# Any user-info in a URL (``user:password@``, ``token@``) is a credential.
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]+@")
_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")
_EXTRA_SECRETS: set[str] = set()  # passwords of URLs seen by client() (e.g. from --tracking-uri)
_MAX_PARAM_LEN = 6000  # MLflow's param value limit


# ---------------------------------------------------------------------------------------------
# Redaction
# ---------------------------------------------------------------------------------------------


def is_secret_name(name: str) -> bool:
    """True for names like ``AWS_SECRET_ACCESS_KEY``, ``HF_TOKEN``, ``db_password``."""
    upper = name.upper()
    return any(w in upper for w in SECRET_WORDS)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret environment variables, longest first (so substrings mask cleanly).

    An env var is secret when KEY/SECRET/TOKEN/PASSWORD appears in its name *or* its value
    (``DB_URL=postgres://app:password@db``); values shorter than 6 characters are ignored.
    """
    env = os.environ if environ is None else environ
    vals = {
        v for k, v in env.items()
        if v and len(v) >= _MIN_SECRET_LEN and (is_secret_name(k) or is_secret_name(v))
    }
    # The password of a URL in the environment (MLFLOW_TRACKING_URI=http://u:pw@host) is masked
    # on its own too: HTTP libraries move it into headers and messages without the URL around it.
    for v in env.values():
        if "://" in v and "@" in v:
            vals.update(url_passwords(v))
    vals.update(_EXTRA_SECRETS)
    return sorted(vals, key=len, reverse=True)


def url_passwords(text: str) -> set[str]:
    """Passwords (raw and percent-decoded, at least 6 characters) of the URLs in ``text``."""
    out: set[str] = set()
    for url in _URL_IN_TEXT.findall(text):
        try:
            password = urllib.parse.urlsplit(url).password
        except ValueError:  # e.g. an invalid port: not a URL we can parse, the regex still masks it
            continue
        if password:
            out |= {p for p in (password, urllib.parse.unquote(password)) if len(p) >= _MIN_SECRET_LEN}
    return out


def redact_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with every secret env value and URL credential replaced by ``***``."""
    out = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    for value in secret_values(environ):
        out = out.replace(value, REDACTED)
    return out


def redact(mapping: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Stringify and redact a params/tags mapping: secret-named keys are dropped entirely."""
    out: dict[str, str] = {}
    for key, value in mapping.items():
        # A secret-named key ("AWS_SECRET_ACCESS_KEY", "api_token") is dropped outright unless its
        # value is a plain number/bool (config fields such as "num_prefix_tokens=1" are no secret).
        if is_secret_name(str(key)) and not isinstance(value, (bool, int, float)):
            continue
        out[redact_text(str(key), environ)] = redact_text(_to_str(value), environ)
    return out


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in every record passing through a handler/logger."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - logging API name
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record must not kill logging
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class RedactingStream:
    """A text stream that redacts everything written through it (wraps ``sys.stdout``/``stderr``).

    MLflow and boto3 also print (``eprint``) and raise with URLs in their text; wrapping the
    process's streams catches what no logging filter sees. Each ``write`` is redacted on its own:
    ``print``, logging handlers and tracebacks write whole lines, so a URL is never split.
    """

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner

    def write(self, text: str) -> int:
        self._inner.write(redact_text(text))
        return len(text)  # what the caller passed: print() and logging check nothing else

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, buffer, ...
        return getattr(self._inner, name)


def _redacting_excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    (sys.stderr or sys.__stderr__).write(redact_text(text))


def _redacting_thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    (sys.stderr or sys.__stderr__).write(redact_text(f"Exception in thread {name}:\n{text}"))


def install_log_redaction() -> None:
    """Redact secrets in everything this process prints: log records, uncaught exceptions, stdout/err.

    Attaches :class:`RedactingFilter` to the root logger's handlers and the mlflow/ray loggers,
    replaces ``sys.excepthook``/``threading.excepthook`` with redacting ones, and wraps
    ``sys.stdout``/``sys.stderr`` in :class:`RedactingStream` (idempotent).
    """
    for stream_name in ("stdout", "stderr"):
        stream = getattr(sys, stream_name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, stream_name, RedactingStream(stream))
    sys.excepthook = _redacting_excepthook
    threading.excepthook = _redacting_thread_excepthook
    flt = RedactingFilter()
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(flt)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # "Found credentials in ..." per client
    for name in ("", "mlflow", "ray", "orchestration", "training", "pipeline"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in lg.filters):
            lg.addFilter(flt)


# ---------------------------------------------------------------------------------------------
# Tracking URI, experiments, runs
# ---------------------------------------------------------------------------------------------


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or ``sqlite:///<project>/mlflow.db``.

    Under ``ray job submit --working-dir`` the "project" is a temporary unpacked copy, so a
    default sqlite store there would vanish with the job: set MLFLOW_TRACKING_URI on the cluster
    (infra/local/start_services.sh does) or pass ``--tracking-uri``.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if "runtime_resources" in str(PROJECT_ROOT):
        log.warning(
            "MLFLOW_TRACKING_URI is not set and this code runs from a Ray working_dir copy (%s): "
            "the default sqlite store there is deleted with the job", PROJECT_ROOT,
        )
    return f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Default artifact location for new experiments: ``mlruns/`` next to a sqlite file, else None."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "mlruns").resolve().as_uri()
    return None


def client(uri: str | None = None) -> MlflowClient:
    """An MlflowClient on ``uri`` (default :func:`tracking_uri`); also sets the fluent API's URI."""
    uri = uri or tracking_uri()
    _EXTRA_SECRETS.update(url_passwords(uri))  # a --tracking-uri password is masked like an env one
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def get_or_create_experiment(name: str, uri: str | None = None) -> str:
    """Experiment id of ``name``, created (with the sqlite-adjacent artifact root) if missing."""
    uri = uri or tracking_uri()
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_root(uri))
    except mlflow.exceptions.MlflowException:  # created concurrently
        exp = c.get_experiment_by_name(name)
        assert exp is not None
        return exp.experiment_id


def start_run(
    experiment: str,
    *,
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    uri: str | None = None,
) -> str:
    """Create a RUNNING run (nested under ``parent_run_id`` when given) and return its id."""
    c = client(uri)
    exp_id = get_or_create_experiment(experiment, uri)
    all_tags = {"mlflow.runName": run_name, **redact(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    """Mark ``run_id`` FINISHED / FAILED / KILLED."""
    client(uri).set_terminated(run_id, status=status)


def git_commit(root: Path = PROJECT_ROOT) -> str:
    """HEAD commit of the checkout (``+dirty`` when modified), or "unknown" outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("VITSCALE_GIT_COMMIT", "unknown")


# ---------------------------------------------------------------------------------------------
# The rank-0 MetricsSink
# ---------------------------------------------------------------------------------------------


class MLflowSink:
    """``training.metrics.MetricsSink`` that writes to one existing MLflow run (rank 0 only).

    Metrics are buffered and flushed with ``log_batch`` (one sqlite transaction per log
    interval, not one per value). ``on_eval`` renders [CLS] attention maps of a fixed image
    batch and logs the PNGs under ``attention/step_<N>/``. System metrics (CPU, memory, GPU)
    are sampled by MLflow's monitor thread when ``system_metrics`` is True and psutil exists.
    """

    def __init__(
        self,
        run_id: str,
        *,
        uri: str | None = None,
        attention_images: Any | None = None,
        system_metrics: bool = True,
        system_metrics_interval_s: float = 10.0,
    ) -> None:
        self.run_id = run_id
        self.uri = uri or tracking_uri()
        self.client = client(self.uri)
        self.attention_images = attention_images  # (B, 3, S, S) tensor or None
        self._buffer: list[Metric] = []
        self._monitor = None
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(
                    run_id,
                    sampling_interval=system_metrics_interval_s,
                    resume_logging=True,
                    tracking_uri=self.uri,
                )
                self._monitor.start()
            except Exception as e:  # noqa: BLE001 - psutil/pynvml missing is not an error
                log.info("system metrics disabled: %s", e)
                self._monitor = None

    # MetricsSink protocol -------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (redacted, stringified) params; values longer than MLflow's limit are truncated.

        Params already logged with the same value are skipped (a restarted worker re-logs them).
        """
        existing = self.client.get_run(self.run_id).data.params
        clean = {k: v[:_MAX_PARAM_LEN] for k, v in redact(params).items()}
        fresh = [Param(k, v) for k, v in clean.items() if existing.get(k) is None]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i : i + 100])
        # Params are immutable in MLflow; a changed value (e.g. after a resume) becomes a tag.
        changed = {f"param_override.{k}": v for k, v in clean.items() if existing.get(k) not in (None, v)}
        if changed:
            self.set_tags(changed)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer finite metrics at ``step`` and flush them in one batch."""
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                self._buffer.append(Metric(_metric_key(key), v, now, int(step)))
        self.flush()

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Upload a file or directory to the run's artifacts."""
        if Path(local_path).is_dir():
            self.client.log_artifacts(self.run_id, local_path, artifact_path)
        else:
            self.client.log_artifact(self.run_id, local_path, artifact_path)

    def on_eval(self, model: Any, step: int) -> None:
        """Log attention-map PNGs of the fixed probe images at this eval step (best effort)."""
        if self.attention_images is None:
            return
        try:
            from orchestration.attention import attention_figures

            with tempfile.TemporaryDirectory() as tmp:
                attention_figures(_unwrap(model), self.attention_images, Path(tmp), max_images=1)
                self.client.log_artifacts(self.run_id, tmp, f"attention/step_{step:07d}")
        except Exception as e:  # noqa: BLE001 - a plot must never kill a training run
            log.warning("attention maps at step %d failed: %s", step, redact_text(str(e)))

    def close(self) -> None:
        """Flush metrics and stop the system-metrics thread. Does not end the run (the driver does)."""
        self.flush()
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:  # noqa: BLE001
                pass
            self._monitor = None

    # Extras -----------------------------------------------------------------------------------
    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:900], self._buffer[900:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, v[:_MAX_PARAM_LEN]) for k, v in redact(tags).items()]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Log a JSON document (redacted) as an artifact file."""
        text = redact_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(text)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(str(path), None if parent in ("", ".") else parent)


def _metric_key(key: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / ; map anything else to "_".
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(key))


def _unwrap(model: Any) -> Any:
    """The nn.Module inside a DeepSpeed engine / DDP wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return model


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def run_metrics(run_id: str, uri: str | None = None) -> dict[str, float]:
    """Latest value of every metric of the run."""
    return dict(client(uri).get_run(run_id).data.metrics)


def metric_history(run_id: str, key: str, uri: str | None = None) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` of one metric, sorted by step."""
    hist = client(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in hist)


MODEL_WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "config.json"
MODEL_FORMAT = "vitscale-safetensors-1"  # tag on the logged model: which loader reads it
_PICKLE_SUFFIXES = (".pth", ".pt", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib")


class UnsafeModelError(ValueError):
    """A model artifact that could only be loaded by unpickling it (which runs arbitrary code)."""


def write_model_dir(model: VisionTransformer, out_dir: Path) -> Path:
    """Write ``model.safetensors`` (weights + config metadata) and ``config.json`` into ``out_dir``."""
    from model.weights import save_weights

    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, out_dir / MODEL_WEIGHTS_FILE)
    (out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2, sort_keys=True))
    return out_dir


def register_model_dir(
    local_dir: Path,
    *,
    run_id: str,
    name: str,
    tags: Mapping[str, Any],
    description: str = "",
    uri: str | None = None,
    await_s: int = 300,
) -> int:
    """Log ``local_dir`` as a logged model of ``run_id`` and register it as a new version of ``name``.

    The version's source is ``models:/<model_id>`` and the request carries both ``model_id`` and
    ``run_id``: an ``mlflow server`` validates the source against them (the embedded store does
    not), and the version keeps its lineage to the run. MLflow's own wait
    (``await_creation_for``) raises unless the version becomes READY. Returns the version number.
    """
    c = client(uri)
    clean = redact(tags)
    run = c.get_run(run_id)
    logged = c.create_logged_model(
        run.info.experiment_id, name="model", source_run_id=run_id,
        tags={"vitscale.format": MODEL_FORMAT, **{k: v for k, v in clean.items() if len(v) < 500}},
    )
    try:
        c.log_model_artifacts(logged.model_id, str(local_dir))
    except BaseException:
        c.finalize_logged_model(logged.model_id, "FAILED")
        raise
    c.finalize_logged_model(logged.model_id, "READY")
    try:
        c.create_registered_model(name, description=description or None)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    mv = c.create_model_version(
        name, source=f"models:/{logged.model_id}", run_id=run_id, model_id=logged.model_id,
        tags=clean, description=description or None, await_creation_for=await_s,
    )
    return int(mv.version)


def log_and_register_model(
    model: Any,
    *,
    run_id: str,
    name: str,
    tags: Mapping[str, Any],
    description: str = "",
    uri: str | None = None,
) -> int:
    """Register ``model`` (a VisionTransformer) as ``model.safetensors`` + ``config.json``.

    Nothing is pickled: :func:`load_model` rebuilds the network from the config with this
    repository's ``model`` package and loads the tensors with safetensors. ``tags`` (lineage)
    go on the model version. Returns the new version number.
    """
    with tempfile.TemporaryDirectory() as tmp:
        local = write_model_dir(model.cpu().eval(), Path(tmp) / "model")
        return register_model_dir(local, run_id=run_id, name=name, tags=tags, description=description, uri=uri)


def load_model(source: str, uri: str | None = None) -> VisionTransformer:
    """A VisionTransformer from ``models:/NAME/VERSION``, ``models:/m-<id>``, ``runs:/ID/PATH`` or a path.

    The artifacts are downloaded through MLflow's artifact API (``file://``, proxied
    ``mlflow-artifacts:/`` and S3 alike) and must be ``model.safetensors`` (+ ``config.json``) or
    a single ``.safetensors`` file with ``vitscale.config`` metadata. Nothing is unpickled: a
    pickled model (an ``mlflow.pytorch`` ``data/model.pth``, any ``.pt``/``.pkl``) raises
    :class:`UnsafeModelError` without its bytes ever reaching ``pickle``.
    """
    if not source.startswith(("models:/", "runs:/")):
        return model_from_path(Path(source), source)
    client(uri)  # sets the fluent API's tracking/registry URI for the artifact download
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri)
        except mlflow.exceptions.MlflowException as e:
            raise FileNotFoundError(f"could not download model {source}: {redact_text(e.message)}") from e
        return model_from_path(Path(local), source)


def model_from_path(path: Path, source: str) -> VisionTransformer:
    """Rebuild a model from a downloaded model folder or ``.safetensors`` file (see :func:`load_model`)."""
    from model import VisionTransformer, ViTConfig
    from model.weights import load_weights, read_config

    if not path.exists():
        raise FileNotFoundError(f"model source {source!r}: not a models:/ or runs:/ URI and no such file")
    if path.is_dir():
        weights, config_file = path / MODEL_WEIGHTS_FILE, path / MODEL_CONFIG_FILE
    else:
        weights, config_file = path, None
    if not weights.is_file() or weights.suffix != ".safetensors":
        _refuse_non_safetensors(path, source)
    try:
        meta_cfg = read_config(weights)  # parses the safetensors header only: no code runs
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise UnsafeModelError(f"{source}: {weights.name} is not a valid safetensors file ({e})") from e
    cfg = meta_cfg
    if config_file is not None and config_file.is_file():
        try:
            cfg = ViTConfig(**json.loads(config_file.read_text()))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {MODEL_CONFIG_FILE} is not a valid ViTConfig ({e})") from e
    if cfg is None:
        raise ValueError(f"{source}: {weights.name} carries no 'vitscale.config' metadata and there is no "
                         f"{MODEL_CONFIG_FILE}; export it with model.weights.save_weights")
    if meta_cfg is not None and meta_cfg != cfg:
        raise ValueError(f"{source}: {MODEL_CONFIG_FILE} and the config inside {weights.name} disagree "
                         f"({cfg} vs {meta_cfg}); the artifact was modified after registration")
    return load_weights(VisionTransformer(cfg), weights)


def _refuse_non_safetensors(path: Path, source: str) -> None:
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path.name]
    pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    what = f"pickle files {pickles}" if pickles else f"files {files[:10]}"
    raise UnsafeModelError(
        f"{source} has no {MODEL_WEIGHTS_FILE} (found {what}); vitscale never unpickles a model artifact "
        "because loading a pickle runs arbitrary code. Register the model's safetensors export instead "
        "(orchestration.tracking.log_and_register_model, or load runs:/<RUN_ID>/weights/model.safetensors, "
        "which every training run logs)"
    )


def resolve_model_source(source: str, uri: str | None = None) -> dict[str, Any]:
    """Describe a ``models:/NAME/VERSION``, ``runs:/ID/PATH`` or local ``.safetensors`` source.

    Returns ``{"kind", "run_id" (or None), "tags" (version/run lineage tags), "uri"}``.
    ``models:/NAME/latest`` picks the highest version.
    """
    if source.startswith("models:/"):
        c = client(uri)
        parts = source[len("models:/") :].strip("/").split("/")
        name = parts[0]
        if len(parts) < 2 or parts[1] in ("latest", ""):
            versions = c.search_model_versions(f"name='{name}'")
            if not versions:
                raise ValueError(f"registered model {name!r} has no versions (source {source!r})")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = c.get_model_version(name, parts[1])
        return {
            "kind": "registry",
            "run_id": mv.run_id,
            "tags": dict(mv.tags),
            "uri": f"models:/{name}/{mv.version}",
            "name": name,
            "version": int(mv.version),
        }
    if source.startswith("runs:/"):
        run_id = source[len("runs:/") :].split("/")[0]
        tags = dict(client(uri).get_run(run_id).data.tags)
        return {"kind": "run", "run_id": run_id, "tags": tags, "uri": source}
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model source {source!r}: not a models:/ or runs:/ URI and no such file")
    return {"kind": "file", "run_id": None, "tags": {}, "uri": str(path.resolve())}


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists/tuples stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def log_params_once(run_id: str, params: Mapping[str, Any], uri: str | None = None) -> None:
    """Driver-side params logging (same rules as :meth:`MLflowSink.log_params`)."""
    sink = MLflowSink(run_id, uri=uri, system_metrics=False)
    sink.log_params(params)


def iter_secret_env(environ: Mapping[str, str] | None = None) -> Iterable[str]:
    """Names of secret-looking environment variables (for warnings; values never printed)."""
    env = os.environ if environ is None else environ
    return sorted(k for k in env if is_secret_name(k))
