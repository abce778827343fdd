"""Ray Train plumbing shared by pre-training and fine-tuning.

The driver (``pretrain.py`` / ``finetune.py``) resolves an :class:`~orchestration.recipes.Experiment`,
creates the MLflow run, and calls :func:`run_training`, which launches a Ray Train
``TorchTrainer`` (Train V2 API in Ray 2.60: ``ray.train.torch.TorchTrainer``,
``ScalingConfig``, ``RunConfig(failure_config=FailureConfig(max_failures=...))``).

Each worker runs :func:`train_worker`, which takes ALL of its state from the config dict (no
module globals, DESIGN.md rule 9): it builds the loaders for its rank, the model (optionally
initialised from exported weights for fine-tuning), a ``training.Trainer`` (DeepSpeed on the
process group Ray Train already created: nccl on GPUs, gloo on CPUs) and, on rank 0, the
:class:`~orchestration.tracking.MLflowSink`. Checkpoints go to a run-specific folder on shared
storage (a path, or ``s3://`` through :class:`~orchestration.storage_ckpt.StorageCheckpointStore`),
and every attempt calls ``fit(resume="auto")``: when Ray restarts the worker group after a
failure, training continues from the newest complete checkpoint, not from step 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestration.recipes import Experiment, experiment_from_dict, experiment_to_dict
from pipeline.storage import open_storage, url_join

log = logging.getLogger(__name__)

#: Where the exported weights of a run land, relative to the run folder.
EXPORT_KEY = "export/model.safetensors"
#: Rank 0's final report (Ray Train V2 keeps metrics only alongside reported checkpoints).
RESULT_KEY = "result.json"
CHECKPOINT_PREFIX = "checkpoints"


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


def connect_ray(address: str | None = None) -> str:
    """Connect to a Ray cluster and return a description of it.

    ``address`` (or ``$RAY_ADDRESS``, which ``ray job submit`` sets for the job's driver) joins
    an existing cluster; ``"auto"`` joins the newest cluster started on this machine. With
    neither, a private local Ray instance is started. We do not try ``"auto"`` implicitly: on a
    shared machine it would attach to somebody else's ``ray start --head``.
    """
    import ray

    if ray.is_initialized():
        return "already connected"
    addr = address or os.environ.get("RAY_ADDRESS") or None
    if addr:
        ray.init(address=addr, log_to_driver=True)
        return f"cluster at {addr}"
    _private_auth_token()
    ray.init(include_dashboard=False, log_to_driver=True)
    return "local Ray instance"


def _private_auth_token() -> None:
    """Give a private local Ray instance its own token (token auth stays on).

    Without one, ``ray.init()`` would create and keep ``~/.ray/auth_token``: state outside the
    project that later runs silently depend on (DESIGN.md rule 13). The token lives in a 0700
    temp folder for this process's lifetime; Ray's processes inherit the path, never the value.
    A token the caller already configured (``RAY_AUTH_TOKEN[_PATH]``) is used as it is.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return  # the caller chose another mode explicitly
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    import atexit
    import secrets

    folder = tempfile.mkdtemp(prefix="vitscale-ray-auth-")  # mode 0700
    path = os.path.join(folder, "auth_token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    atexit.register(shutil.rmtree, folder, True)
    # Only the path is set: with RAY_AUTH_MODE unset, ray.init() turns token mode on itself
    # (and refreshes its cached config, which an env change alone would not reach).
    os.environ["RAY_AUTH_TOKEN_PATH"] = path


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


def run_training(
    exp: Experiment,
    *,
    data_url: str,
    run_id: str,
    run_dir: str,
    tracking_uri: str,
    eval_split: str | None,
    init_weights: str | None = None,
    probe_images: int = 1,
    ray_storage: str | None = None,
) -> dict[str, Any]:
    """Run ``exp`` on Ray Train and return rank 0's final report (step, loss, eval_top1, ...).

    ``run_dir`` (local path or ``s3://``) holds ``checkpoints/`` and ``export/model.safetensors``;
    it must be reachable from every worker. ``init_weights`` (a URL/path of safetensors written
    by :func:`train_worker`) initialises the backbone for fine-tuning: new zero-init head, position
    embeddings resampled to ``exp.image_size``. Raises ``RuntimeError`` if training failed after
    ``exp.max_failures`` worker-group restarts.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = {
        "experiment": experiment_to_dict(exp),
        "data_url": data_url,
        # Resolved once here, so every rank (and restart) reads the same dataset version.
        "dataset_version": exp.data.dataset_version or dataset_lineage(data_url)["version"],
        "eval_split": eval_split,
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "run_dir": run_dir,
        "init_weights": init_weights,
        "probe_images": probe_images,
    }
    use_gpu = exp.gpus_per_worker > 0
    resources: dict[str, float] = {"CPU": float(exp.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(exp.gpus_per_worker)
    storage = ray_storage or os.environ.get("VITSCALE_RAY_STORAGE") or str(Path(tempfile.gettempdir()) / "vitscale-ray")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=exp.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{exp.name}-{run_id[:8]}-{int(time.time())}",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=exp.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # ray.train.TrainingFailedError and friends
        raise RuntimeError(f"training run {run_id} failed: {e}") from e
    if getattr(result, "error", None):
        raise RuntimeError(f"training run {run_id} failed: {result.error}")
    raw = read_run_file(run_dir, RESULT_KEY)
    return {**(result.metrics or {}), **(json.loads(raw) if raw else {})}


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


def _checkpoint_location(run_dir: str, run_id: str) -> tuple[str, Any]:
    """(local checkpoint_dir, CheckpointStore or None) for a run folder on a path or s3://."""
    from orchestration.storage_ckpt import StorageCheckpointStore

    remote = url_join(run_dir, CHECKPOINT_PREFIX)
    if remote.startswith("s3://"):
        local = Path(tempfile.gettempdir()) / "vitscale-ckpt" / run_id
        return str(local), StorageCheckpointStore(remote)
    path = remote[len("file://") :] if remote.startswith("file://") else remote
    return path, None


def _probe_batch(data_cfg: Any, split: str | None, n: int) -> Any:
    """A few normalised eval images for attention maps (rank 0), or None."""
    if not n or not split:
        return None
    from pipeline import build_loader

    cfg = replace(data_cfg, split=split, train=False, batch_size=n, num_workers=0, output="float")
    try:
        loader = build_loader(cfg, rank=0, world_size=1)
        for batch in loader:
            return batch[0][:n].clone()
    except Exception as e:  # noqa: BLE001 - attention maps are optional
        log.warning("no probe images for attention maps: %s", e)
    return None


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train per-worker function: everything it needs is in ``config`` (JSON-able).

    Reports once at the end (all ranks, as Ray Train requires) with rank 0's final metrics.
    """
    import ray.train
    import torch

    from model import create_model
    from model.weights import load_weights
    from orchestration import tracking
    from pipeline import build_loader
    from training import Trainer
    from training.checkpoint import export_weights

    tracking.install_log_redaction()
    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    # Ray Train has already created the process group; the Trainer (and DeepSpeed) reuse it and
    # only read these for logging / device selection.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _use_plain_gloo_collectives()

    exp = experiment_from_dict(config["experiment"])
    # uint8 batches: the Trainer normalizes them on its device (a quarter of the host bytes).
    data_cfg = replace(exp.data, url=config["data_url"], output="uint8", dataset_version=config.get("dataset_version"))
    train_loader = build_loader(data_cfg, rank=rank, world_size=world)
    eval_split = config.get("eval_split")
    eval_loader = (
        build_loader(replace(data_cfg, split=eval_split, train=False), rank=rank, world_size=world)
        if eval_split
        else None
    )
    num_classes = int(train_loader.num_classes)

    model = create_model(exp.variant, num_classes=num_classes, image_size=exp.image_size, **exp.model_overrides)
    init = config.get("init_weights")
    if init:
        with tempfile.TemporaryDirectory() as tmp:
            local = _fetch(init, Path(tmp) / "init.safetensors")
            load_weights(model, local, ignore_head=True)  # zero-init head; pos-embed resampled

    checkpoint_dir, store = _checkpoint_location(config["run_dir"], config["run_id"])
    sink = None
    if rank == 0:
        sink = tracking.MLflowSink(
            config["run_id"],
            uri=config["tracking_uri"],
            attention_images=_probe_batch(data_cfg, eval_split, int(config.get("probe_images", 1))),
        )
    trainer = Trainer(
        model,
        exp.train,
        train_loader,
        eval_loader=eval_loader,
        sink=sink,
        checkpoint_dir=checkpoint_dir,
        checkpoint_store=store,
    )
    resumed = trainer.restore("auto")
    start_step = trainer.step
    if sink is not None:
        # One point per attempt: a restarted worker group shows up as a second point > 0.
        sink.log_metrics({"attempt/resumed_from_step": float(start_step), "attempt/resumed": float(resumed)}, start_step)
    t0 = time.perf_counter()
    result = trainer.fit()
    elapsed = time.perf_counter() - t0

    # Export consolidated weights (collective under ZeRO-3) with the config for rebuilding.
    cfg_json = json.dumps(dataclasses.asdict(trainer.model.cfg)) if hasattr(trainer.model, "cfg") else "{}"
    with tempfile.TemporaryDirectory() as tmp:
        path = export_weights(
            trainer.engine,
            Path(tmp) / "model.safetensors",
            metadata={"vitscale.config": cfg_json, "run_id": config["run_id"], "step": str(trainer.step)},
        )
        if rank == 0 and path is not None:
            open_storage(config["run_dir"]).upload_file(path, EXPORT_KEY)
            if sink is not None:
                sink.log_artifact(str(path), "weights")
    if sink is not None:
        sink.log_metrics({"train_time_s": elapsed}, trainer.step)
        sink.close()
    report = {
        **{k: float(v) for k, v in result.items() if isinstance(v, (int, float))},
        "num_classes": num_classes,
        "resumed_from_step": start_step,
        "world_size": world,
    }
    if rank == 0:
        open_storage(config["run_dir"]).write_bytes(RESULT_KEY, json.dumps(report).encode())
    ray.train.report(report)  # a barrier: every rank is past its last checkpoint save
    if store is not None and local_rank == 0:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # local staging of the s3 mirror


def _use_plain_gloo_collectives() -> None:
    """CPU workers: keep DeepSpeed on the gloo group Ray Train made, without its shm comm op.

    On CPU, DeepSpeed JIT-compiles ``deepspeed_shm_comm`` (ninja + c++, tens of seconds) in every
    fresh worker process, serialised machine-wide by a lock in ``~/.cache/torch_extensions``;
    with several jobs starting at once (a worker group restarting after a failure, parallel
    tests) workers sit behind that lock far longer than a training step. gloo's all-reduce is
    what a CPU run needs; marking the op incompatible makes DeepSpeed fall back to it.
    """
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception as e:  # noqa: BLE001 - an older/newer DeepSpeed without the table
        log.info("could not disable DeepSpeed's shm comm op: %s", e)


def _fetch(url: str, local: Path) -> Path:
    """Copy a path / file:// / s3:// object to ``local`` (or return the path itself)."""
    if url.startswith("s3://"):
        parent, name = url.rsplit("/", 1)
        open_storage(parent).download_file(name, local)
        return local
    return Path(url[len("file://") :] if url.startswith("file://") else url)


def read_run_file(run_dir: str, key: str) -> bytes | None:
    """Bytes of ``<run_dir>/<key>`` or None."""
    store = open_storage(run_dir)
    return store.read_bytes(key) if store.exists(key) else None
