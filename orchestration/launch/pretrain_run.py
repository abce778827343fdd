"""The driver of one training run: MLflow run, run lease, Ray Train, registration.

:func:`launch` is what ``pretrain.py`` and ``finetune.py`` run after validating their arguments.
Storage layout::

    <storage>/<recipe>/latest_run.json            pointer used by --resume auto
    <storage>/<recipe>/<run_id>/checkpoints/      DeepSpeed checkpoints (step{N}/, complete.json)
    <storage>/<recipe>/<run_id>/export/model.safetensors
    <storage>/<recipe>/<run_id>/lease.json         held by the live run (another launch is refused)
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from orchestration import tracking
from orchestration.experiment.config import Experiment, experiment_to_dict, flatten_experiment
from orchestration.launch import cluster
from orchestration.launch.checkpoint_store import rewind_checkpoints
from orchestration.launch.lease import Lease, LeaseLostError, hold_run_lease
from orchestration.launch.ray_train import CHECKPOINT_PREFIX, EXPORT_KEY, dataset_lineage, run_training
from orchestration.launch.tokenizer import (
    CodebookUsageError,
    eval_split_problem,
    registry_tags,
    usage_verdict,
)
from orchestration.serving.spec import spec_for_experiment
from orchestration.tracking.sink import RECONSTRUCTION_FOLDER
from pipeline.storage import open_storage, url_join

log = logging.getLogger(__name__)
RESULT_PREFIX = "VITSCALE_RESULT "


def register_from_run(
    exp: Experiment,
    *,
    run_id: str,
    run_dir: str,
    report: dict[str, Any],
    lineage: dict[str, Any],
    uri: str,
    extra_tags: dict[str, Any] | None = None,
) -> int:
    """Rebuild the trained model from ``<run_dir>/export/model.safetensors`` and register it."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model.safetensors"
        open_storage(run_dir).download_file(EXPORT_KEY, local)
        model = tracking.model_from_path(local, f"{run_dir}/{EXPORT_KEY}")  # the one safetensors loader
    metrics = {k: v for k, v in report.items() if isinstance(v, (int, float))}
    tags = {
        "git_commit": tracking.git_commit(),
        "recipe": exp.name,
        "variant": exp.model.variant,
        "image_size": exp.image_size,
        "dataset": exp.dataset_name,
        "dataset_url": lineage.get("data_url", ""),
        "dataset_index_sha256": lineage.get("index_sha256", ""),
        "steps": int(metrics.get("step", 0)),
        "source_run_id": run_id,
        # What the model was trained for: fine-tuning picks its protocol by it (an MAE encoder: MAE's).
        "objective": exp.train.objective.kind,
        **{f"metric.{k}": f"{v:.6g}" for k, v in sorted(metrics.items())},
        **registry_tags(exp),  # a tokenizer's vocabulary and patch size (BEiT checks them)
        **(extra_tags or {}),
    }
    figure = tracking.latest_artifact(run_id, RECONSTRUCTION_FOLDER, uri)  # an MAE run's last eval figure
    if figure is not None:
        tags["reconstruction_figure"] = f"runs:/{run_id}/{figure}"
    return tracking.log_and_register_model(
        model, run_id=run_id, name=exp.model_name, tags=tags,
        description=f"{exp.model.variant} trained by recipe {exp.name} on {exp.dataset_name}", uri=uri,
        metadata={"vitscale.objective": exp.train.objective.kind},
        serving=spec_for_experiment(exp, model.cfg, lineage.get("data_url", "")),  # eval transform + class names
    )


def _run_pointer(storage: str, exp: Experiment) -> tuple[Any, str]:
    return open_storage(url_join(storage, exp.name)), "latest_run.json"


def launch(
    exp: Experiment,
    *,
    data_url: str,
    storage: str,
    uri: str,
    experiment: str,
    run_name: str,
    resume: str | None = None,
    address: str | None = None,
    register: bool = True,
    init_weights: str | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, Any] | None = None,
    extra_params: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Create/continue the MLflow run, connect to Ray, train, register; returns the summary dict.

    The run folder's lease is taken before a resumed MLflow run is touched and before Ray is
    started or joined (``address``: see :func:`cluster.connect_ray`): a second launch on the same
    run raises LeaseHeldError at once and changes nothing. ``force`` takes over a stale lease.
    """
    lineage = {**dataset_lineage(data_url), "data_url": data_url}
    eval_split = exp.eval.split if exp.eval.split in lineage["splits"] else None
    if exp.eval.split and eval_split is None:
        log.warning("dataset %s has no %r split: no evaluation", data_url, exp.eval.split)
    problem = eval_split_problem(exp, eval_split, data_url)
    if problem:  # before any run, lease or Ray
        raise ValueError(problem)
    tags = {"recipe": exp.name, "variant": exp.model.variant, "dataset": exp.dataset_name,
            "objective": exp.train.objective.kind, "git_commit": tracking.git_commit(), "dataset_index_sha256": lineage["index_sha256"],
            "data_url": data_url, **(extra_tags or {})}
    run_id, lease = _open_run(exp, storage=storage, uri=uri, experiment=experiment, run_name=run_name,
                              resume=resume, tags=tags, parent_run_id=parent_run_id, force=force)
    run_dir = url_join(storage, exp.name, run_id)
    print(f"[run] MLflow run {run_id} (experiment {experiment!r}) in {tracking.redact_text(tracking.public_uri(uri))}; "
          f"run folder {tracking.redact_text(run_dir)} (checkpoints/, export/model.safetensors)", flush=True)
    try:
        if resume not in (None, "auto"):  # a step: every attempt of this launch resumes "auto" from it
            rewind_checkpoints(url_join(run_dir, CHECKPOINT_PREFIX), int(resume))
        log.info("Ray: %s", cluster.connect_ray(address))  # after the lease: a refused launch starts nothing
        pointer_store, pointer_key = _run_pointer(storage, exp)
        pointer_store.write_bytes(pointer_key, json.dumps({"run_id": run_id, "run_dir": run_dir}).encode())
        _log_run_inputs(exp, run_id=run_id, uri=uri, data_url=data_url, lineage=lineage, extra_params=extra_params)
        report = run_training(exp, data_url=data_url, run_id=run_id, run_dir=run_dir, tracking_uri=uri,
                              eval_split=eval_split, init_weights=init_weights)
        summary: dict[str, Any] = {"run_id": run_id, "experiment": experiment, "run_dir": run_dir,
                                   "tracking_uri": uri, "metrics": report, "model_name": None, "model_version": None}
        if exp.model.kind == "dvae":  # dead codes are a failed tokenizer: said, and not registered
            passed, line = usage_verdict(exp, report)
            print(line, flush=True)
            tracking.MLflowSink(run_id, uri=uri, system_metrics=False).set_tags({"tokenizer.verdict": line})
            if not passed:
                raise CodebookUsageError(line)
        if register:
            version = register_from_run(exp, run_id=run_id, run_dir=run_dir, report=report, lineage=lineage,
                                        uri=uri, extra_tags=extra_tags)
            summary.update(model_name=exp.model_name, model_version=version,
                           model_uri=f"models:/{exp.model_name}/{version}")
    except BaseException:
        if not lease.lost:  # only the lease's holder may set the MLflow run's status
            tracking.end_run(run_id, "FAILED", uri=uri)
        lease.release()  # after the status: a launch waiting for the lease must not be overwritten
        raise
    if lease.lost:
        raise LeaseLostError(f"run {run_id} lost its lease {lease.url} to another run during training; "
                             "its MLflow status is left to that run")
    tracking.end_run(run_id, "FINISHED", uri=uri)
    lease.release()
    return summary


def _open_run(exp: Experiment, *, storage: str, uri: str, experiment: str, run_name: str, resume: str | None,
              tags: dict[str, Any], parent_run_id: str | None, force: bool) -> tuple[str, Lease]:
    """(run id, held lease): the recipe's latest run with ``resume`` ("auto" or a step), else a new one.

    The run folder's lease is taken before a resumed MLflow run is touched: a second launch on a
    live run raises LeaseHeldError and changes nothing.
    """
    pointer_store, pointer_key = _run_pointer(storage, exp)
    previous = None
    if resume is not None and pointer_store.exists(pointer_key):
        previous = json.loads(pointer_store.read_bytes(pointer_key)).get("run_id")
    leases: list[Lease] = []

    def take_lease(run_id: str) -> None:
        leases.append(hold_run_lease(url_join(storage, exp.name, run_id), run_id, force=force))

    run_id, resumed = tracking.resume_or_start_run(
        experiment, run_name=run_name, existing=previous, tags=tags, parent_run_id=parent_run_id, uri=uri,
        on_resume=take_lease,
    )
    if resumed:
        log.info("resuming run %s", run_id)
    else:
        take_lease(run_id)  # a new prefix: free
    return run_id, leases[0]


def _log_run_inputs(
    exp: Experiment, *, run_id: str, uri: str, data_url: str, lineage: dict[str, Any],
    extra_params: dict[str, Any] | None,
) -> None:
    """Driver-side params and artifacts: resolved config, DeepSpeed config, dataset lineage."""
    from training.deepspeed_config import deepspeed_config

    sink = tracking.MLflowSink(run_id, uri=uri, system_metrics=False)
    sink.log_params({**flatten_experiment(exp), "data.source.url": data_url, **(extra_params or {})})
    sink.log_dict({**experiment_to_dict(exp), "data_url": data_url}, "config/experiment.json")
    sink.log_dict(deepspeed_config(exp.train, exp.resources.workers), "config/deepspeed_config.json")
    sink.log_dict(lineage["dataset"], "dataset/dataset.json")
    sink.log_dict({"index_sha256": lineage["index_sha256"], "url": data_url}, "dataset/index_sha256.json")


def emit(summary: dict[str, Any], path: str | None) -> None:
    """Print the ``VITSCALE_RESULT`` line (and write it to ``path``), credentials redacted."""
    text = tracking.redact_text(json.dumps(summary, default=str, sort_keys=True))
    if path:
        Path(path).write_text(text)
    print(RESULT_PREFIX + text, flush=True)
