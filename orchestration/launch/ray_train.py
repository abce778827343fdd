"""Ray Train launch shared by pre-training and fine-tuning: the driver's :func:`run_training` and
the per-worker :func:`train_worker`.

:func:`run_training` launches a Ray Train ``TorchTrainer`` (Train V2 API in Ray 2.60:
``ray.train.torch.TorchTrainer``, ``ScalingConfig``, ``RunConfig(failure_config=FailureConfig(
max_failures=...))``). Each worker runs :func:`train_worker`, which takes ALL of its state from
the config dict (no module globals, docs/design.md, convention 9) and builds its run with
:func:`orchestration.launch.build.build_run` (DeepSpeed on the process group Ray Train already
created: nccl on GPUs, gloo on CPUs), with the :class:`~orchestration.tracking.MLflowSink` on
rank 0. Checkpoints go to a run-specific folder on shared storage (a path, or ``s3://`` through
:class:`~orchestration.launch.checkpoint_store.StorageCheckpointStore`), and every attempt resumes: when Ray
restarts the worker group after a failure, training continues from the newest complete
checkpoint, not from step 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestration.experiment.config import Experiment, experiment_from_dict, experiment_to_dict
from orchestration.launch.build import build_run, probe_batch, resume, timed_fit
from orchestration.launch.checkpoint_store import checkpoint_location, read_run_file
from pipeline.storage import open_storage, url_join
from training.preempt import Preempted

log = logging.getLogger(__name__)

#: Where the exported weights of a run land, relative to the run folder.
EXPORT_KEY = "export/model.safetensors"
#: Rank 0's final report (Ray Train V2 keeps metrics only alongside reported checkpoints).
RESULT_KEY = "result.json"
CHECKPOINT_PREFIX = "checkpoints"


def dataset_lineage(data_url: str) -> dict[str, Any]:
    """The published version of the dataset at ``data_url``, resolved once (pipeline.format).

    Returns its manifest (``dataset``), ``version`` (the id loaders pin), the sha256 of its
    ``index.parquet`` (checked against the manifest) and its ``splits``. A missing or damaged
    dataset is logged (the error names the file) and gives empty lineage, so the run fails
    later in the loader with the same message rather than here.
    """
    from pipeline import format as fmt

    try:
        res = fmt.resolve(data_url)
        index_sha = fmt.sha256_hex(fmt.read_checked(res, fmt.INDEX))
    except (fmt.DatasetFormatError, OSError) as e:
        log.warning("no readable dataset at %s: %s", data_url, e)
        return {"dataset": {}, "version": None, "index_sha256": "missing", "splits": []}
    return {"dataset": res.manifest, "version": res.version, "index_sha256": index_sha,
            "splits": sorted(res.manifest["splits"])}


def worker_config(exp: Experiment, *, data_url: str, run_id: str, run_dir: str, tracking_uri: str,
                  eval_split: str | None, init_weights: str | None, probe_images: int | None) -> dict[str, Any]:
    """The JSON-able ``train_loop_config`` every worker (and every restart) builds its run from.

    Ray keeps and may persist it, so the tracking URI in it carries no password: workers take
    theirs from their own environment (:func:`orchestration.tracking.resolve_uri`).
    """
    from orchestration.tracking import public_uri, resolve_uri

    if resolve_uri(public_uri(tracking_uri)) != tracking_uri:
        log.warning("the MLflow password in the tracking URI is not sent to the workers (Ray would persist it): "
                    "give the workers MLFLOW_TRACKING_URI (with the password) or MLFLOW_TRACKING_USERNAME/"
                    "MLFLOW_TRACKING_PASSWORD in their environment")

    return {
        "experiment": experiment_to_dict(exp),
        "data_url": data_url,
        # Resolved once here, so every rank (and restart) reads the same dataset version.
        "dataset_version": exp.data.source.dataset_version or dataset_lineage(data_url)["version"],
        "eval_split": eval_split,
        "run_id": run_id,
        # Ray persists this config: no password in it; workers take theirs from their own
        # environment (tracking.resolve_uri: MLFLOW_TRACKING_URI or MLFLOW_TRACKING_PASSWORD).
        "tracking_uri": public_uri(tracking_uri),
        "run_dir": run_dir,
        "init_weights": init_weights,
        "probe_images": probe_images,
    }


def run_training(
    exp: Experiment,
    *,
    data_url: str,
    run_id: str,
    run_dir: str,
    tracking_uri: str,
    eval_split: str | None,
    init_weights: str | None = None,
    probe_images: int | None = None,
    ray_storage: str | None = None,
) -> dict[str, Any]:
    """Run ``exp`` on Ray Train and return rank 0's final report (step, loss, eval_top1, ...).

    ``probe_images``: how many eval images rank 0 draws at every evaluation (None: one for a
    classifier's attention maps, four for an MAE's reconstructions).
    ``run_dir`` (local path or ``s3://``) holds ``checkpoints/`` and ``export/model.safetensors``;
    it must be reachable from every worker. ``init_weights`` (a URL/path of safetensors written
    by :func:`train_worker`) initialises the backbone for fine-tuning: new zero-init head, position
    embeddings resampled to ``exp.image_size``. Raises ``RuntimeError`` if training failed after
    ``exp.resources.max_failures`` worker-group restarts.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = worker_config(exp, data_url=data_url, run_id=run_id, run_dir=run_dir, tracking_uri=tracking_uri,
                           eval_split=eval_split, init_weights=init_weights, probe_images=probe_images)
    use_gpu = exp.resources.gpus_per_worker > 0
    resources: dict[str, float] = {"CPU": float(exp.resources.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(exp.resources.gpus_per_worker)
    storage = ray_storage or os.environ.get("VITSCALE_RAY_STORAGE") or str(Path(tempfile.gettempdir()) / "vitscale-ray")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=_num_workers(exp), use_gpu=use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=float(exp.resources.elastic_resize_s)),
        run_config=RunConfig(
            name=f"{exp.name}-{run_id[:8]}-{int(time.time())}",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=exp.resources.max_failures),
        ),
    )
    try:
        with ray_train_env(exp):
            result = trainer.fit()
    except Exception as e:  # ray.train.TrainingFailedError and friends
        raise RuntimeError(f"training run {run_id} failed: {e}") from e
    if getattr(result, "error", None):
        raise RuntimeError(f"training run {run_id} failed: {result.error}")
    raw = read_run_file(run_dir, RESULT_KEY)
    return {**(result.metrics or {}), **(json.loads(raw) if raw else {})}



#: Ray Train reads its knobs from the environment of the process that calls ``fit()`` and passes
#: them on to its controller actor (``ray.train.v2._internal.constants.ENV_VARS_TO_PROPAGATE``).
GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@contextlib.contextmanager
def ray_train_env(exp: Experiment) -> Iterator[None]:
    """The experiment's Ray Train settings that Ray only takes from the environment, set for one
    ``fit()`` (and put back after: a Tune trial or a notebook runs several). A value the user
    exported stays when the experiment leaves the field at None."""
    if exp.resources.group_start_timeout_s is None:
        yield
        return
    old = os.environ.get(GROUP_START_TIMEOUT_ENV)
    os.environ[GROUP_START_TIMEOUT_ENV] = f"{float(exp.resources.group_start_timeout_s):g}"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(GROUP_START_TIMEOUT_ENV, None)
        else:
            os.environ[GROUP_START_TIMEOUT_ENV] = old


def _num_workers(exp: Experiment) -> int | tuple[int, int]:
    """Ray Train's worker count: fixed, or (min, max) for elastic training (a lost node shrinks
    the group, returning capacity grows it; each change restarts from the newest checkpoint,
    resharded by the Trainer, with accumulation re-derived so the global batch stays)."""
    if exp.resources.min_workers is not None and exp.resources.min_workers < exp.resources.workers:
        return (exp.resources.min_workers, exp.resources.workers)
    return exp.resources.workers


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train per-worker function: everything it needs is in ``config`` (JSON-able).

    Reports once at the end (all ranks, as Ray Train requires) with rank 0's final metrics.
    """
    import ray.train
    import torch

    from orchestration import tracking

    tracking.install_log_redaction()
    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    # Ray Train has already created the process group; the Trainer (and DeepSpeed) reuse it and
    # only read these for logging / device selection. The Trainer keeps DeepSpeed's CPU
    # collectives on gloo itself (training.dist).
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    exp = worker_experiment(config)

    sink = None
    if rank == 0:
        sink = tracking.MLflowSink(config["run_id"], uri=config["tracking_uri"], **probe_settings(exp, config))
    checkpoint_url = url_join(config["run_dir"], CHECKPOINT_PREFIX)
    trainer, loaders = build_run(
        exp, rank=rank, world=world, checkpoint_url=checkpoint_url, checkpoint_key=config["run_id"],
        make_sink=lambda _model: sink, init_weights=config.get("init_weights"), tracking_uri=config["tracking_uri"],
    )
    attach_ray_preemption(trainer)
    start_step = resume(trainer, sink.log_metrics if sink is not None else None, prefix="attempt/")
    try:
        result, elapsed = timed_fit(trainer)
    except Preempted as stopped:
        leave_preempted(trainer, stopped, rank, sink)
    _export(trainer, config, rank, sink)
    if sink is not None:
        # Restarts, world-size changes, recomputed steps and time lost to faults, over all attempts
        # (the Trainer logs them at each resume too; this is the run's final tally).
        sink.log_metrics({"train_time_s": elapsed, **trainer.faults.metrics()}, trainer.step)
        sink.close()
    report = {
        **{k: float(v) for k, v in result.items() if isinstance(v, (int, float))},
        "num_classes": loaders.num_classes,
        "resumed_from_step": start_step,
        "world_size": world,
    }
    if rank == 0:
        open_storage(config["run_dir"]).write_bytes(RESULT_KEY, json.dumps(report).encode())
    ray.train.report(report)  # a barrier: every rank is past its last checkpoint save
    checkpoint_dir, store = checkpoint_location(checkpoint_url, config["run_id"])
    if store is not None and local_rank == 0:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # local staging of the s3 mirror


def attach_ray_preemption(trainer: Any) -> None:
    """Give the Trainer, which Ray Train runs in a thread of its worker actor, the two preemption
    hooks it cannot make itself (training/ does not import Ray):

    * SIGTERM: the handler must be installed by the process's main thread. That thread runs the
      actor's task loop, so the install is sent to it as a task of this very actor
      (``RayTrainWorker.execute``); it then also runs the handler when the signal comes.
    * Ray Train's drain-based preemption notice (a node being drained for PREEMPTION, e.g. a
      spot reclaim announced through the autoscaler or ``ray drain-node``): Ray's watcher hands
      every worker the PreemptionInfo. It is read locally each step (the public
      ``ray.train.get_preemption_info()`` is a barrier across workers, too dear per step); the
      Trainer's own per-step all-reduce makes the ranks agree: every rank saves at once and again
      just before the deadline, and holds until Ray Train stops this attempt at the deadline
      and restarts it.
    """
    import ray

    def run_on_main_thread(fn: Any) -> None:
        actor = ray.get_runtime_context().current_actor
        ray.get(actor.execute.remote(fn), timeout=120)

    notice = None
    try:  # internal in Ray 2.60 (what get_preemption_info reads before its barrier)
        from ray.train.v2._internal.execution.context import get_train_context as internal_context

        preemption = internal_context().preemption_context

        def notice() -> float | None:
            info = preemption.preemption_info
            if info is None:
                return None
            return info.deadline_ms / 1000.0 if info.deadline_ms else math.inf
    except (ImportError, AttributeError) as e:
        log.warning("Ray Train's preemption notice is not readable in this Ray version (%s): a drained node "
                    "stops the attempt without a just-in-time checkpoint; SIGTERM still checkpoints", e)
    trainer.preemption.attach(run_on_main_thread=run_on_main_thread, notice=notice)


def leave_preempted(trainer: Any, stopped: Preempted, rank: int, sink: Any) -> None:
    """Every rank has saved checkpoint ``stopped.tag`` after a SIGTERM. The signalled process exits 0
    (its actor dies, as the platform wanted); the others fail this attempt so that Ray Train
    restarts the group from that checkpoint at once (a normal return would end the run)."""
    if trainer.preemption.signal_step is not None:
        if sink is not None:
            sink.close()
        trainer.preemption.exit_now(f"preempted (SIGTERM): checkpoint {stopped.tag} saved at step {stopped.step}; "
                                    "this worker exits 0 and Ray Train restarts the group from it")
    raise RuntimeError(f"rank {rank}: stopped at step {stopped.step} because another rank was preempted (SIGTERM); "
                       f"every rank saved checkpoint {stopped.tag}: Ray Train restarts the group from it")


def worker_experiment(config: dict[str, Any]) -> Experiment:
    """The worker's experiment: the driver's, on the resolved dataset version and eval split."""
    exp = experiment_from_dict(config["experiment"])
    data = exp.data.replace(**{"source.url": config["data_url"], "source.dataset_version": config.get("dataset_version")})
    return replace(exp, data=data, eval=replace(exp.eval, split=config.get("eval_split")))


def probe_settings(exp: Experiment, config: dict[str, Any]) -> dict[str, Any]:
    """The sink's probe images and how to draw them: one for a classifier's attention maps, four
    for an MAE's reconstructions (masked as its objective masks, from a fixed seed)."""
    mask = exp.data.mask if exp.data.mask.kind != "none" else None  # as the loader masks (derived by the Experiment)
    asked = config.get("probe_images")
    n = int(asked) if asked is not None else 4 if mask is not None or exp.model.kind == "dvae" else 1  # 0: none
    if exp.model.kind == "timm" and not exp.model.family.class_token:  # no class token: no attention maps
        n = 0
    return {"attention_images": probe_batch(exp, n), "probe_mask": mask,
            "probe_norm": (exp.data.preprocess.mean, exp.data.preprocess.std)}


def _export(trainer: Any, config: dict[str, Any], rank: int, sink: Any) -> None:
    """Export consolidated weights (collective under ZeRO-3) with the config for rebuilding."""
    from training.checkpoint import export_weights

    exported = trainer.objective.exported(trainer.model)  # the model (an MAE's encoder)
    cfg_json = json.dumps(dataclasses.asdict(exported.cfg)) if hasattr(exported, "cfg") else "{}"
    with tempfile.TemporaryDirectory() as tmp:
        path = export_weights(
            trainer.engine,
            Path(tmp) / "model.safetensors",
            metadata={"vitscale.config": cfg_json, "run_id": config["run_id"], "step": str(trainer.step),
                      "vitscale.objective": trainer.cfg.objective.kind},
            prefix=trainer.objective.exported_prefix,
        )
        if rank == 0 and path is not None:
            open_storage(config["run_dir"]).upload_file(path, EXPORT_KEY)
            if sink is not None:
                sink.log_artifact(str(path), "weights")
