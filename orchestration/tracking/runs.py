"""MLflow runs: the tracking URI, experiments, creating/continuing/ending runs, reading metrics.

Tracking URI: ``$MLFLOW_TRACKING_URI``, else an embedded ``sqlite:///<state>/mlflow.db`` in the
project's state dir (:mod:`orchestration.state`; the model registry works on sqlite). Artifacts
of sqlite stores go to ``mlruns/`` next to the database file, so a ``ray job submit
--working-dir`` copy of the repo never swallows them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient

if TYPE_CHECKING:
    pass
from orchestration import state
from orchestration.tracking.redact import add_url_secrets, redact, redact_text

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or ``sqlite:///<state>/mlflow.db`` (:func:`orchestration.state.state_dir`).

    Under ``ray job submit --working-dir`` the code is a temporary unpacked copy: the cluster
    must give jobs MLFLOW_TRACKING_URI or VITSCALE_HOME (infra/local/start_services.sh does), or
    pass ``--tracking-uri``.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or state.default_tracking_uri()


def public_uri(uri: str) -> str:
    """``uri`` without the password of its user-info (``http://u:pw@h`` -> ``http://u@h``).

    This is the form that may travel in configs Ray persists (Ray Train's ``train_loop_config``,
    Tune's ``param_space`` -> ``params.json``, ``study.json``): each process gets the password back
    from its own environment in :func:`resolve_uri`.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}@" if parts.username else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}{host}"))


def resolve_uri(uri: str | None = None) -> str:
    """The URI this process should talk to: ``uri`` (default :func:`tracking_uri`), with its
    credentials taken from ``$MLFLOW_TRACKING_URI`` when that is the same server.

    A worker given :func:`public_uri`'s form thus authenticates with its own environment's
    password (or MLflow's ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``), never with one
    read from a persisted config.
    """
    if not uri:
        return tracking_uri()
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and urllib.parse.urlsplit(uri).password is None and public_uri(env) == public_uri(uri):
        return env
    return uri


def artifact_root(uri: str) -> str | None:
    """Default artifact location for new experiments: ``mlruns/`` next to a sqlite file, else None."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "mlruns").resolve().as_uri()
    return None


def client(uri: str | None = None) -> MlflowClient:
    """An MlflowClient on ``uri`` (default :func:`tracking_uri`); also sets the fluent API's URI."""
    uri = resolve_uri(uri)
    add_url_secrets(uri)  # a --tracking-uri password is masked like an env one
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
    """The commit of the code in ``root`` (``+dirty`` when it differs from that commit), or "unknown".

    In order: ``root`` is a git checkout: its HEAD. ``$VITSCALE_GIT_COMMIT`` (for a job on a remote
    cluster, given in its runtime env). ``root`` is a copy without ``.git`` (``ray job submit
    --working-dir``: Ray never uploads ``.git``) of the checkout ``$VITSCALE_CHECKOUT`` (the local
    services' env.sh sets it for every job): that checkout's HEAD when the copy's files are HEAD's,
    ``+dirty`` when some differ (see :func:`commit_of_copy`).
    """
    try:
        top = _git(root, "rev-parse", "--show-toplevel")
        if Path(top).resolve() == root.resolve():  # not a parent repository the copy happens to sit in
            dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
            return _git(root, "rev-parse", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if os.environ.get("VITSCALE_GIT_COMMIT"):
        return os.environ["VITSCALE_GIT_COMMIT"]
    checkout = os.environ.get("VITSCALE_CHECKOUT")
    return (commit_of_copy(root, Path(checkout)) if checkout else None) or "unknown"


def commit_of_copy(copy: Path, checkout: Path) -> str | None:
    """HEAD of ``checkout`` when ``copy`` holds its files (``+dirty`` if any tracked file differs).

    Every tracked file of HEAD that the copy has is compared by its git blob hash; files the copy
    lacks are ignored (Ray leaves out what .gitignore and its own excludes name). None when
    ``checkout`` is no git checkout or the copy is not one of it (most files differ).
    """
    try:
        head = _git(checkout, "rev-parse", "HEAD")
        listing = _git(checkout, "ls-tree", "-r", "-z", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None
    same = differ = 0
    for entry in filter(None, listing.split("\0")):
        meta, path = entry.split("\t", 1)
        mode, kind, sha = meta.split()
        f = copy / path
        if kind != "blob" or mode == "120000" or not f.is_file():
            continue
        data = f.read_bytes()
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # what `git hash-object` gives
        same, differ = same + (blob == sha), differ + (blob != sha)
    if same <= differ:
        return None
    return head + ("+dirty" if differ else "")


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip("\n")


def run_metrics(run_id: str, uri: str | None = None) -> dict[str, float]:
    """Latest value of every metric of the run."""
    return dict(client(uri).get_run(run_id).data.metrics)


def metric_history(run_id: str, key: str, uri: str | None = None) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` of one metric, sorted by step."""
    hist = client(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in hist)


def latest_artifact(run_id: str, folder: str, uri: str | None = None) -> str | None:
    """The run's newest file under ``folder/step_<N>/`` (the highest N; per-eval figures are logged
    that way), as an artifact path; None when there is none."""
    c = client(uri)
    steps = sorted((f.path for f in c.list_artifacts(run_id, folder) if f.is_dir), reverse=True)
    for step in steps:
        files = sorted(f.path for f in c.list_artifacts(run_id, step) if not f.is_dir)
        if files:
            return files[0]
    return None


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



def resume_or_start_run(
    experiment: str,
    *,
    run_name: str,
    existing: str | None = None,
    match_tags: Mapping[str, str] | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    uri: str | None = None,
    on_resume: Callable[[str], None] | None = None,
) -> tuple[str, bool]:
    """The run to log to: an existing one set back to RUNNING, else a new one. Returns (id, resumed).

    The existing run is ``existing`` (a run id kept by the caller, e.g. a ``latest_run.json``
    pointer; one this store does not know is logged and a new run started) or the first run of
    ``experiment`` (under ``parent_run_id``) whose tags equal ``match_tags``. ``on_resume(run_id)``
    runs before the run is touched (pre-training takes the run folder's lease there).
    """
    c = client(uri)
    run_id = None
    if existing is not None:
        try:
            run_id = c.get_run(existing).info.run_id
        except mlflow.exceptions.MlflowException:  # a pointer to a run of another tracking store
            log.warning("run %s not found in %s: starting a new run", existing, redact_text(uri or tracking_uri()))
    elif match_tags:
        exp_id = get_or_create_experiment(experiment, uri)
        terms = [f"tags.`{k}` = '{v}'" for k, v in match_tags.items()]
        if parent_run_id:
            terms.insert(0, f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
        found = c.search_runs([exp_id], filter_string=" and ".join(terms), max_results=1)
        run_id = found[0].info.run_id if found else None
    if run_id is None:
        new = start_run(experiment, run_name=run_name, tags=tags, parent_run_id=parent_run_id, uri=uri)
        return new, False
    if on_resume is not None:
        on_resume(run_id)
    c.update_run(run_id, status="RUNNING")
    return run_id, True
