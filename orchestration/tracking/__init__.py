"""Tracking: secret redaction, MLflow runs and the rank-0 sink, the model registry, loading a model.

* ``redact``    - secrets never reach params, tags, logs or printed lines
* ``runs``      - tracking URI, experiments, :func:`resume_or_start_run` / end a run, metrics
* ``sink``      - :class:`MLflowSink`, the ``training.MetricsSink`` of rank 0
* ``registry``  - register a model as a pyfunc around safetensors + config; :func:`load_model` by URI or path
* ``importer``  - the paper's .npz / timm safetensors into the registry (``import_weights.py``)
* ``promotion`` - move an alias (``champion``) only to a version that measures better
* ``attention_figures`` - [CLS] attention / rollout figures (logged at evals, drawn by ``visualize.py``)

The names below are this package's public API (``from orchestration import tracking``).
"""

from orchestration.tracking.redact import (
    REDACTED,
    RedactingFilter,
    RedactingStream,
    install_log_redaction,
    is_secret_name,
    iter_secret_env,
    redact,
    redact_text,
    secret_values,
    url_passwords,
)
from orchestration.tracking.registry import (
    MODEL_CONFIG_FILE,
    MODEL_FORMAT,
    MODEL_WEIGHTS_FILE,
    PYFUNC_ARTIFACTS,
    UnsafeModelError,
    load_model,
    log_and_register_model,
    model_from_path,
    register_model_dir,
    resolve_model_source,
    write_model_dir,
)
from orchestration.tracking.runs import (
    artifact_root,
    client,
    end_run,
    flatten,
    get_or_create_experiment,
    git_commit,
    latest_artifact,
    metric_history,
    public_uri,
    resolve_uri,
    resume_or_start_run,
    run_metrics,
    start_run,
    tracking_uri,
)
from orchestration.tracking.sink import MLflowSink, log_params_once

__all__ = [
    "MODEL_CONFIG_FILE", "MODEL_FORMAT", "MODEL_WEIGHTS_FILE", "PYFUNC_ARTIFACTS", "REDACTED", "MLflowSink", "RedactingFilter",
    "RedactingStream", "UnsafeModelError", "artifact_root", "client", "end_run", "flatten",
    "get_or_create_experiment", "git_commit", "install_log_redaction", "is_secret_name", "iter_secret_env", "latest_artifact",
    "load_model", "log_and_register_model", "log_params_once", "metric_history", "public_uri", "resolve_uri", "model_from_path", "redact",
    "redact_text", "register_model_dir", "resolve_model_source", "resume_or_start_run", "run_metrics", "secret_values", "start_run",
    "tracking_uri", "url_passwords", "write_model_dir",
]
