"""One trial of a study: a Ray Tune function trainable (also callable directly).

A trial is the study's base experiment with the trial's overrides
(:func:`orchestration.studies.spec.trial_experiment`), built and resumed by the same
:func:`orchestration.launch.build.build_run` as pre-training, on one process (world size 1) with
the resources Tune gives it. Its sink turns every evaluation into a point of the study table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from orchestration.launch.build import build_run, resume, timed_fit
from orchestration.launch.checkpoint_store import checkpoint_location, delete_tree
from orchestration.studies.points import StudySink, TrialInfo
from orchestration.studies.spec import StudySpec, trial_experiment, trial_key
from pipeline.storage import open_storage, url_join

log = logging.getLogger(__name__)

POINTS_FILE = "points.json"  # a trial's points so far, next to its checkpoints


def train_trial(
    spec: StudySpec,
    *,
    variant: str,
    steps: int,
    samples: int | None,
    seed: int,
    key: str,
    report: Callable[[dict[str, Any]], None],
    lr: float | None = None,
    weight_decay: float | None = None,
    study_run_id: str | None = None,
) -> dict[str, Any]:
    """Train one grid cell to ``steps`` (resuming from its checkpoints) and return its result.

    ``variant`` is a canonical size label. The trial's MLflow run (nested under
    ``study_run_id``) is found by its ``vitscale.trial`` tag, so a resumed trial keeps
    appending to the run it started.
    """
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if spec.cpus_per_trial >= 1:
        torch.set_num_threads(int(spec.cpus_per_trial))
    exp = _device_experiment(trial_experiment(spec, variant=variant, steps=steps, samples=samples, seed=seed,
                                              lr=lr, weight_decay=weight_decay))
    trial_url = url_join(spec.trials_root, key)
    trial_dir = open_storage(trial_url)  # points.json (+ the checkpoints, for local paths)
    saved = json.loads(trial_dir.read_bytes(POINTS_FILE)) if trial_dir.exists(POINTS_FILE) else []
    box: dict[str, Any] = {}

    def make_sink(model: Any) -> StudySink:
        box["sink"], box["run_id"] = _trial_sink(spec, exp, model, key=key, variant=variant, steps=steps,
                                                 samples=samples, seed=seed, study_run_id=study_run_id,
                                                 report=report, points_dir=trial_dir)
        return box["sink"]

    status, trainer = "FAILED", None
    try:
        trainer, _ = build_run(exp, rank=0, world=1, checkpoint_url=trial_url, checkpoint_key=key,
                               make_sink=make_sink)
        sink: StudySink = box["sink"]
        # A restored / retried trial continues from its newest checkpoint and re-reports its points.
        sink.replay(saved, resume(trainer, sink.inner.log_metrics))
        result, elapsed = timed_fit(trainer)
        sink.inner.log_metrics({"train_time_s": elapsed, "params": float(sink.info.params)}, trainer.step)
        status = "FINISHED"
    except SystemExit:
        # Tune stops a trial (ASHA, or max_t reached at the last report) by exiting its thread
        # inside report(): finished if that was the last step, else stopped early.
        status = "FINISHED" if trainer is not None and trainer.step >= steps else "KILLED"
        raise
    finally:
        _close_trial(spec, box, status)
    if not spec.keep_checkpoints:
        delete_tree(trial_url, checkpoint_location(trial_url, key)[0])
    return {**{k: v for k, v in result.items() if isinstance(v, (int, float))}, "params": sink.info.params,
            "points": len(sink.points)}


def _device_experiment(exp: Any) -> Any:
    """The trial on this device: the profile's precision and ZeRO stage (ZeRO-1 over a world of one
    process is a no-op partition, kept so trials take the optimizer path the profiles are tested with)."""
    from training import get_profile

    profile = get_profile("auto")
    return dataclasses.replace(exp, train=exp.train.replace(**{"engine.precision": profile.precision,
                                                               "engine.zero_stage": profile.zero_stage}))


def _trial_sink(spec: StudySpec, exp: Any, model: Any, *, key: str, variant: str, steps: int,
                samples: int | None, seed: int, study_run_id: str | None, report: Callable[[dict[str, Any]], None],
                points_dir: Any) -> tuple[StudySink, str | None]:
    """The trial's points sink (over its MLflow run when the study tracks) and that run's id."""
    from training.objectives import objective_for

    info = TrialInfo(study=spec.name, trial=key, variant=variant, params=sum(p.numel() for p in model.parameters()),
                     steps=steps, samples=samples, seed=seed, lr=exp.train.optim.lr, weight_decay=exp.train.optim.weight_decay)
    mlflow_sink, run_id = _trial_run(spec, info, study_run_id) if study_run_id else (None, None)
    # The objective's count: an MAE's encoder sees a quarter of the patches and its decoder all of them.
    flops = objective_for(exp.train.objective).flops_per_image(model)
    sink = StudySink(info, global_batch=exp.train.global_batch, flops_per_image=float(flops or 0.0),
                     report=report, inner=mlflow_sink, metric=spec.metric,
                     persist=lambda pts: points_dir.write_bytes(POINTS_FILE, json.dumps(pts).encode()))
    return sink, run_id


def _close_trial(spec: StudySpec, box: dict[str, Any], status: str) -> None:
    if "sink" in box:
        box["sink"].close()
    if box.get("run_id") is not None:
        from orchestration import tracking

        tracking.end_run(box["run_id"], status, uri=spec.tracking_uri or None)


def _trial_run(spec: StudySpec, info: TrialInfo, study_run_id: str) -> tuple[Any, str]:
    """(MLflowSink, run id) of the trial's nested run: the existing one on resume, else new."""
    from orchestration import tracking

    uri = spec.tracking_uri or None
    run_id, _ = tracking.resume_or_start_run(
        spec.experiment, run_name=info.trial, parent_run_id=study_run_id, uri=uri,
        match_tags={"vitscale.trial": info.trial},
        tags={"vitscale.trial": info.trial, "vitscale.study": spec.name, "vitscale.variant": info.variant},
    )
    sink = tracking.MLflowSink(run_id, uri=uri, system_metrics=False)
    sink.log_params({f"trial.{k}": v for k, v in dataclasses.asdict(info).items()})
    return sink, run_id


def run_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one grid cell, all state from ``config``."""
    from ray import tune

    from orchestration import tracking

    tracking.install_log_redaction()
    spec = StudySpec.from_dict(config["spec"])
    suffix = tune.get_context().get_trial_id() if spec.study == "hparams" else ""
    key = trial_key(config["variant"], int(config["steps"]), config["samples"], int(config["seed"]), suffix)
    train_trial(
        spec, variant=config["variant"], steps=int(config["steps"]), samples=config["samples"],
        seed=int(config["seed"]), key=key, report=tune.report, lr=config.get("lr"),
        weight_decay=config.get("weight_decay"), study_run_id=config.get("study_run_id"),
    )

