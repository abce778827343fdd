"""Scaling-law and hyper-parameter studies: a Ray Tune grid of full training runs.

``--study scaling`` runs every combination of model size × training length (× training-set
size × seed) as one Tune trial. Each trial is a complete single-process training run (a Tune
*function trainable*: ``model.create_model`` + ``pipeline.build_loader`` + ``training.Trainer``,
world size 1) on the resources Tune gives it (``--cpus-per-trial`` / ``--gpus-per-trial``), so a
cluster of N GPUs runs N trials at once. At every evaluation (``--evals-per-trial`` times per
run) the trial reports a *point* to Tune and to its MLflow run: images seen, training FLOPs
(``model.flops.train_flops_per_image`` × images), eval loss and eval error (1 − top-1).

The driver collects all points into a Parquet table (``orchestration.scaling.POINTS_SCHEMA``),
fits the saturating power law E = a·(C + d)^(−b) + c of Zhai et al. 2021 on the
compute-efficient frontier (``orchestration.scaling``), draws the plots, and logs table, fit
and plots to the study's MLflow run; every trial is an MLflow run nested under it.

``--study hparams`` searches learning rate and weight decay per model size (log-uniform,
``--num-samples`` trials per size, at the longest ``--steps``) with ASHA early stopping on
eval loss, and writes ``best_hparams.json``; pass that file to a scaling study with
``--hparams`` so every size is trained at its own tuned setting (a fair comparison).

Interrupted studies resume with ``--resume`` (``tune.Tuner.restore``): finished trials are
not re-run, unfinished or errored trials continue from their newest Trainer checkpoint.

Examples::

    # laptop: digits shards, three tiny-to-small sizes, two lengths
    python orchestration/sweep.py --study scaling --variants mu,Ti,S --steps 500,1000,2000 \\
        --data /tmp/digits-shards --image-size 32
    # cluster: submit the driver as a Ray job; storage must be shared by all nodes
    ray job submit --working-dir . -- python orchestration/sweep.py --study scaling \\
        --variants Ti,S,B --steps 10000,30000,100000 --data s3://bucket/i21k \\
        --image-size 224 --gpus-per-trial 1 --storage s3://bucket/studies --resume
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file (python orchestration/sweep.py, ray job submit -- ...)
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[1]))

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from orchestration import scaling
from pipeline.storage import open_storage, url_join

log = logging.getLogger(__name__)

STUDIES = ("scaling", "hparams")
POINTS_FILE = "points.json"  # a trial's points so far, next to its checkpoints
#: Points-table identity columns reported with every Tune result (the rest are measurements).
POINT_FIELDS = tuple(scaling.POINTS_SCHEMA.names)


# ---------------------------------------------------------------------------------------------
# The study specification (everything a trial needs travels in it: DESIGN.md rule 9)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StudySpec:
    """One study: the grid, the fixed training recipe of every trial, and where things go.

    ``variants`` are size specs (see :func:`parse_size`): ``"Ti"``, ``"B/16"`` or
    ``"mu/4:width=64:mlp_dim=128"``. ``samples`` entries of ``None`` use the whole train
    split. ``batch_size`` is the global batch of every trial (one process, no
    accumulation unless ``micro_batch`` is set). ``hparams`` maps a size spec to ``{"lr": .., "weight_decay": ..}`` and
    overrides ``lr`` / ``weight_decay`` for that size.
    """

    name: str
    study: Literal["scaling", "hparams"] = "scaling"
    data_url: str
    variants: tuple[str, ...]
    steps: tuple[int, ...]
    samples: tuple[int | None, ...] = (None,)
    seeds: int = 1
    image_size: int = 32
    patch_size: int | None = None
    batch_size: int = 64
    micro_batch: int | None = None  # per forward pass; batch_size / micro_batch = gradient accumulation
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    decay: Literal["linear", "cosine"] = "cosine"
    evals_per_trial: int = 4
    train_split: str = "train"
    eval_split: str = "val"
    crop_min: float = 0.35
    hflip: bool = True
    loader_workers: int = 1
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    hparams: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # --study hparams
    num_samples: int = 8
    lr_range: tuple[float, float] = (1e-4, 1e-2)
    wd_range: tuple[float, float] = (1e-3, 0.3)
    # bookkeeping
    storage: str = "studies"  # Tune storage_path: absolute path or URI shared by all nodes
    checkpoint_root: str = ""  # per-trial Trainer checkpoints; default <storage>/<name>-trials
    out_dir: str = ""  # table, plots, fit; default <storage>/<name>-analysis (local storage)
    keep_checkpoints: bool = False  # delete a trial's checkpoints once it finished
    experiment: str = "vitscale-scaling"  # MLflow experiment
    tracking_uri: str = ""  # default orchestration.tracking.tracking_uri()
    metric: str = "eval_error"  # what the law is fitted to
    n_boot: int = 200
    max_failures: int = 1  # Tune retries per trial (each retry resumes from its checkpoint)

    def __post_init__(self) -> None:
        errors = _study_errors(self)
        if errors:
            raise ValueError("invalid study:\n  " + "\n  ".join(dict.fromkeys(errors)))  # each line once

    # Where things go --------------------------------------------------------------------------
    @property
    def storage_path(self) -> str:
        """Tune wants an absolute path or a URI."""
        return self.storage if "://" in self.storage else str(Path(self.storage).expanduser().resolve())

    @property
    def experiment_path(self) -> str:
        """The (first) Tune experiment's folder."""
        return url_join(self.storage_path, self.experiments()[0][0])

    def experiments(self) -> list[tuple[str, str | None]]:
        """Tune experiments as (name, size label or None): one grid for a scaling study; one per
        size for an hparams study, so ASHA ranks learning rates among trials of the same size."""
        if self.study == "scaling":
            return [(self.name, None)]
        labels = [size_label(v, image_size=self.image_size, patch_size=self.patch_size) for v in self.variants]
        return [(f"{self.name}-{size_slug(v)}", v) for v in labels]

    @property
    def trials_root(self) -> str:
        return self.checkpoint_root or url_join(self.storage_path, f"{self.name}-trials")

    @property
    def analysis_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        if "://" in self.storage:
            return Path(f"{self.name}-analysis").resolve()
        return Path(self.storage_path) / f"{self.name}-analysis"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StudySpec:
        tuples = {"variants", "steps", "samples", "lr_range", "wd_range"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})

    def grid_hash(self) -> str:
        """Short hash of what defines the trials (a default study name: same command, same study)."""
        keys = ("study", "data_url", "variants", "steps", "samples", "seeds", "image_size", "patch_size",
                "batch_size", "micro_batch", "lr", "weight_decay", "warmup_frac", "decay", "hparams", "num_samples")
        blob = json.dumps({k: self.to_dict()[k] for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


#: Which StudySpec field a trial's DataConfig / TrainConfig field comes from (to name it in errors).
_SPEC_FIELD = {
    "data.image_size": "image_size", "data.batch_size": "batch_size", "data.num_workers": "loader_workers",
    "data.crop_scale": "crop_min", "data.split": "train_split", "data.limit_samples": "samples",
    "train.global_batch": "batch_size", "train.micro_batch": "micro_batch", "train.lr": "lr",
    "train.min_lr": "lr", "train.weight_decay": "weight_decay", "train.warmup_steps": "warmup_frac",
    "train.total_steps": "steps", "train.decay": "decay",
}


def trial_data_config(spec: StudySpec, *, seed: int, samples: int | None) -> Any:
    """The train split's ``DataConfig`` of one trial (the eval loader is this with ``train=False``)."""
    from pipeline import DataConfig

    return DataConfig(
        url=spec.data_url, split=spec.train_split, image_size=spec.image_size,
        batch_size=spec.micro_batch or spec.batch_size, num_workers=spec.loader_workers, seed=seed,
        limit_samples=samples, crop_scale=(spec.crop_min, 1.0), hflip=spec.hflip,
        output="uint8",  # the Trainer normalizes
    )


def trial_train_config(spec: StudySpec, *, steps: int, lr: float, weight_decay: float, seed: int,
                       precision: str = "fp32", zero_stage: int = 1) -> Any:
    """The ``TrainConfig`` of one trial: ``spec.evals_per_trial`` evaluations and checkpoints."""
    from training import TrainConfig

    every = max(1, steps // spec.evals_per_trial) if spec.evals_per_trial >= 1 else steps
    return TrainConfig(
        global_batch=spec.batch_size, micro_batch=spec.micro_batch or spec.batch_size, lr=lr,
        weight_decay=weight_decay, warmup_steps=min(int(spec.warmup_frac * steps), steps - 1),
        total_steps=steps, decay=spec.decay, precision=precision, zero_stage=zero_stage,  # type: ignore[arg-type]
        seed=seed, log_every=max(1, min(50, every)), eval_every=every, checkpoint_every=every, keep_checkpoints=1,
    )


def _component_errors(s: StudySpec, section: str, make: Callable[[], Any]) -> list[str]:
    """``make()``'s ValueError lines, each naming the study field it came from: ``lr: train.lr=nan ...``."""
    from orchestration.recipes import component_problems

    fields = dict(_SPEC_FIELD)
    if s.micro_batch is None:  # the per-pass batch is the whole batch
        fields.update({"data.batch_size": "batch_size", "train.micro_batch": "batch_size"})
    else:
        fields["data.batch_size"] = "micro_batch"
    try:
        make()
    except (ValueError, TypeError) as e:
        out = []
        for line in component_problems(section, e):
            key = line.split("=", 1)[0].split(" ", 1)[0]
            out.append(f"{fields[key]}: {line}" if key in fields else line)
        return out
    return []


def _range_errors(name: str, rng: Any) -> list[str]:
    """A log-uniform search range: two finite numbers 0 < low < high."""
    ok = len(rng) == 2 and all(isinstance(x, int | float) and math.isfinite(x) for x in rng)
    return [] if ok and 0 < rng[0] < rng[1] else [f"{name}={tuple(rng)!r} must be low,high with 0 < low < high"]


def _study_errors(s: StudySpec) -> list[str]:
    """Every problem of a study, one line each: its own fields, then each trial's component configs."""
    from orchestration.recipes import name_problems

    errors = name_problems("name", s.name)
    if s.study not in STUDIES:
        errors.append(f"study {s.study!r}: choose one of {STUDIES}")
    if not s.variants:
        errors.append("variants is empty: name at least one model size, e.g. --variants mu,Ti,S")
    if not s.steps or any(int(x) < 1 for x in s.steps):
        errors.append(f"steps {s.steps} must be positive integers")
    if any(x is not None and x < s.batch_size for x in s.samples):
        errors.append(f"samples {s.samples}: each limit must be >= batch_size {s.batch_size}")
    if s.micro_batch is not None and (s.micro_batch < 1 or s.batch_size % s.micro_batch):
        errors.append(f"micro_batch {s.micro_batch} must divide batch_size {s.batch_size}")
    for name, low in (("seeds", 1), ("evals_per_trial", 1), ("num_samples", 1), ("n_boot", 1), ("max_failures", 0)):
        if getattr(s, name) < low:
            errors.append(f"{name} {getattr(s, name)} must be >= {low}")
    if not 0 <= s.warmup_frac < 1:
        errors.append(f"warmup_frac {s.warmup_frac} must be in [0, 1)")
    if not (math.isfinite(s.cpus_per_trial) and s.cpus_per_trial > 0):
        errors.append(f"cpus_per_trial={s.cpus_per_trial} must be a finite number > 0")
    if not (math.isfinite(s.gpus_per_trial) and s.gpus_per_trial >= 0):
        errors.append(f"gpus_per_trial={s.gpus_per_trial} must be a finite number >= 0")
    if s.metric not in scaling.METRICS:
        errors.append(f"metric {s.metric!r}: choose one of {scaling.METRICS}")
    if s.study == "hparams":
        errors += _range_errors("lr_range", s.lr_range) + _range_errors("wd_range", s.wd_range)
    return errors + _trial_config_errors(s)


def _trial_config_errors(s: StudySpec) -> list[str]:
    """Build what every trial would build (data, train and model configs) and collect their errors."""
    from model import vit_config

    limits = [x for x in s.samples if x is not None]
    errors = _component_errors(s, "data", lambda: trial_data_config(s, seed=0, samples=min(limits, default=None)))
    lrs = {s.lr, *(h.get("lr", s.lr) for h in s.hparams.values())}
    wds = {s.weight_decay, *(h.get("weight_decay", s.weight_decay) for h in s.hparams.values())}
    if s.study == "hparams":  # the search samples inside the ranges; their ends must be valid too
        lrs |= set(s.lr_range)
        wds |= set(s.wd_range)
    for steps in sorted({int(x) for x in s.steps if int(x) >= 1}):
        for lr in sorted(lrs, key=str):
            for wd in sorted(wds, key=str):
                errors += _component_errors(s, "train", lambda st=steps, lr=lr, wd=wd: trial_train_config(
                    s, steps=st, lr=lr, weight_decay=wd, seed=0))
    for v in s.variants:
        try:
            name, overrides = parse_size(v, image_size=s.image_size, patch_size=s.patch_size)
        except ValueError as e:
            errors.append(str(e))
            continue
        if s.image_size >= 1:  # else the data config already said so
            errors += [f"variants: {v!r}: {e}" for e in _component_errors(
                s, "model", lambda n=name, o=overrides: vit_config(n, num_classes=2, image_size=s.image_size, **o))]
    return errors


def parse_size(spec: str, *, image_size: int, patch_size: int | None = None) -> tuple[str, dict[str, int]]:
    """Size spec -> (``model.create_model`` name with patch, shape overrides).

    ``"Ti"`` -> ``("Ti/4", {})`` at 32 px (default patch: image_size // 8 below 128 px,
    else 16); ``"B/16"`` keeps its patch; ``"mu/4:width=64:mlp_dim=128"`` overrides
    width / depth / heads / mlp_dim of the named size (custom small sizes for CPU studies).
    """
    from model import parse_variant

    name, *extra = spec.split(":")
    if "/" not in name:
        p = patch_size or (max(1, image_size // 8) if image_size < 128 else 16)
        name = f"{name}/{p}"
    parse_variant(name)  # ValueError naming the known sizes
    _, p = name.split("/")
    if image_size % int(p):
        raise ValueError(f"size {spec!r}: image_size {image_size} is not divisible by patch size {p}")
    overrides: dict[str, int] = {}
    for item in extra:
        k, sep, v = item.partition("=")
        if not sep or k not in ("width", "depth", "heads", "mlp_dim") or not v.isdigit():
            raise ValueError(f"size {spec!r}: override {item!r} must be width|depth|heads|mlp_dim=<int>")
        overrides[k] = int(v)
    return name, overrides


def size_label(spec: str, *, image_size: int, patch_size: int | None = None) -> str:
    """Canonical label of a size spec for tables and plots: ``"Ti/4"``, ``"mu/4:width=64"``."""
    name, overrides = parse_size(spec, image_size=image_size, patch_size=patch_size)
    return name + "".join(f":{k}={v}" for k, v in overrides.items())


def size_slug(label: str) -> str:
    """Path-safe form of a size label: ``"mu/4:width=64"`` -> ``"mu4-width64"``."""
    return label.replace("/", "").replace(":", "-").replace("=", "")


def trial_key(variant: str, steps: int, samples: int | None, seed: int, suffix: str = "") -> str:
    """Stable, path-safe id of one grid cell: ``"mu4-width64_s500_nall_seed0"``."""
    key = f"{size_slug(variant)}_s{steps}_n{'all' if samples is None else samples}_seed{seed}"
    return f"{key}_{suffix}" if suffix else key


def param_space(spec: StudySpec, study_run_id: str | None, variant: str | None = None) -> dict[str, Any]:
    """Tune's param_space: grid axes (scaling) or sampled lr/wd for ``variant`` (hparams) + the spec."""
    from ray import tune

    labels = [size_label(v, image_size=spec.image_size, patch_size=spec.patch_size) for v in spec.variants]
    fixed = {"spec": spec.to_dict(), "study_run_id": study_run_id}
    if spec.study == "scaling":
        return {
            **fixed,
            "variant": tune.grid_search(labels),
            "steps": tune.grid_search([int(s) for s in spec.steps]),
            "samples": tune.grid_search(list(spec.samples)),
            "seed": tune.grid_search(list(range(spec.seeds))),
        }
    if variant is None:
        raise ValueError("an hparams study searches one size per Tune experiment: pass variant")
    return {
        **fixed,
        "variant": variant,
        "steps": max(int(s) for s in spec.steps),
        "samples": spec.samples[0],
        "seed": 0,
        "lr": tune.loguniform(*spec.lr_range),
        "weight_decay": tune.loguniform(*spec.wd_range),
    }


def grid_size(spec: StudySpec) -> int:
    """Number of trials the study runs."""
    if spec.study == "scaling":
        return len(spec.variants) * len(spec.steps) * len(spec.samples) * spec.seeds
    return len(spec.variants) * spec.num_samples


# ---------------------------------------------------------------------------------------------
# Points: what every evaluation of every trial contributes to the study table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TrialInfo:
    """Identity of one trial, repeated on each of its points."""

    study: str
    trial: str
    variant: str
    params: int
    steps: int
    samples: int | None
    seed: int
    lr: float
    weight_decay: float


def make_point(info: TrialInfo, *, step: int, global_batch: int, flops_per_image: float,
               eval_metrics: Mapping[str, float]) -> dict[str, Any]:
    """One row of the points table from an evaluation at ``step``.

    images = step × global_batch (every optimizer step consumes one global batch);
    flops = train_flops_per_image × images (forward + backward ≈ 3 forwards, 2 FLOPs/MAC);
    eval_error = 1 − top-1 (1 − precision@1 for sigmoid/multi-label runs).
    """
    top1 = eval_metrics.get("eval_top1", eval_metrics.get("eval_prec1", math.nan))
    images = int(step) * int(global_batch)
    return {
        **dataclasses.asdict(info),
        "step": int(step),
        "images": images,
        "flops": float(flops_per_image) * images,
        "eval_loss": float(eval_metrics.get("eval_loss", math.nan)),
        "eval_error": 1.0 - float(top1),
    }


def points_from_rows(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Study table from reported results (Tune result rows, or ``make_point`` dicts).

    Keeps rows that carry a point (have ``trial`` and ``eval_loss``), drops Tune's own
    columns, and keeps the last report of each (trial, step): a trial that was restarted
    from scratch (its checkpoints gone) re-reports its steps and the newest run wins.
    Rows are sorted by trial, then step.
    """
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        if row.get("trial") is None or row.get("eval_loss") is None or row.get("step") is None:
            continue
        point = {k: _plain(k, row.get(k)) for k in POINT_FIELDS}
        latest[(str(point["trial"]), int(point["step"]))] = point
    ordered = [latest[k] for k in sorted(latest)]
    return scaling.points_table(ordered)


def _plain(name: str, v: Any) -> Any:
    """A reported value coerced to its schema column type; NaN/None (pandas fills) -> null."""
    if hasattr(v, "item"):
        v = v.item()
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    t = scaling.POINTS_SCHEMA.field(name).type
    if pa.types.is_integer(t):
        return int(v)
    if pa.types.is_floating(t):
        return float(v)
    return str(v)


class StudySink:
    """The trial's ``MetricsSink``: forwards everything to ``inner`` (MLflow) and turns each
    evaluation into a point that goes to ``report`` (``ray.tune.report`` in a trial)."""

    def __init__(
        self,
        info: TrialInfo,
        *,
        global_batch: int,
        flops_per_image: float,
        report: Callable[[dict[str, Any]], None],
        inner: Any | None = None,
        persist: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        from training import NullSink

        self.info = info
        self.persist = persist
        self.global_batch = global_batch
        self.flops_per_image = flops_per_image
        self.report = report
        self.inner = inner if inner is not None else NullSink()
        self.points: list[dict[str, Any]] = []

    def log_params(self, params: dict[str, Any]) -> None:
        self.inner.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.inner.log_metrics(metrics, step)
        if "eval_loss" not in metrics:
            return
        point = make_point(self.info, step=step, global_batch=self.global_batch,
                           flops_per_image=self.flops_per_image, eval_metrics=metrics)
        self.points.append(point)
        if self.persist is not None:
            self.persist(self.points)
        self.inner.log_metrics({"images": point["images"], "flops": point["flops"],
                                "eval_error": point["eval_error"]}, step)
        self.report(point)

    def replay(self, points: Sequence[Mapping[str, Any]], upto_step: int) -> None:
        """Re-report the points a resumed trial made before its checkpoint at ``upto_step``.

        A restored Tune trial without a Tune checkpoint starts a fresh result history, so
        the points from before the interruption would be lost from the study table.
        MLflow already has them; they only go to ``report``.
        """
        for p in points:
            if int(p["step"]) <= upto_step:
                self.points.append(dict(p))
                self.report(dict(p))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.inner.log_artifact(local_path, artifact_path)

    def on_eval(self, model: Any, step: int) -> None:
        self.inner.on_eval(model, step)

    def close(self) -> None:
        self.inner.close()


# ---------------------------------------------------------------------------------------------
# One trial (runs inside a Ray Tune worker process; also callable directly)
# ---------------------------------------------------------------------------------------------


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
    from model import create_model
    from model.flops import train_flops_per_image
    from pipeline import build_loader
    from training import Trainer, get_profile

    tuned = spec.hparams.get(variant, {})
    lr = float(lr if lr is not None else tuned.get("lr", spec.lr))
    wd = float(weight_decay if weight_decay is not None else tuned.get("weight_decay", spec.weight_decay))
    if spec.cpus_per_trial >= 1:
        torch.set_num_threads(int(spec.cpus_per_trial))

    data = trial_data_config(spec, seed=seed, samples=samples)
    train_loader = build_loader(data, rank=0, world_size=1)
    eval_loader = build_loader(dataclasses.replace(data, split=spec.eval_split, train=False, limit_samples=None),
                               rank=0, world_size=1)
    name, overrides = parse_size(variant, image_size=spec.image_size, patch_size=spec.patch_size)
    torch.manual_seed(seed)
    model = create_model(name, num_classes=int(train_loader.num_classes), image_size=spec.image_size, **overrides)
    n_params = sum(p.numel() for p in model.parameters())
    # The device's profile sets precision and ZeRO stage (ZeRO-1 over a world of one process is
    # a no-op partition, kept so trials take the optimizer path the profiles are tested with).
    profile = get_profile("auto")
    cfg = trial_train_config(spec, steps=steps, lr=lr, weight_decay=wd, seed=seed, precision=profile.precision,
                             zero_stage=profile.zero_stage)
    info = TrialInfo(study=spec.name, trial=key, variant=variant, params=n_params, steps=steps,
                     samples=samples, seed=seed, lr=lr, weight_decay=wd)

    mlflow_sink, run_id = None, None
    if study_run_id:
        mlflow_sink, run_id = _trial_run(spec, info, study_run_id)
    trial_url = url_join(spec.trials_root, key)
    trial_dir = open_storage(trial_url)  # points.json (+ the checkpoints, for local paths)
    saved = json.loads(trial_dir.read_bytes(POINTS_FILE)) if trial_dir.exists(POINTS_FILE) else []
    sink = StudySink(info, global_batch=cfg.global_batch, flops_per_image=train_flops_per_image(model.cfg),
                     report=report, inner=mlflow_sink,
                     persist=lambda pts: trial_dir.write_bytes(POINTS_FILE, json.dumps(pts).encode()))
    ckpt_dir, store = _checkpoint_location(trial_url, key)
    status = "FAILED"
    trainer = None
    try:
        trainer = Trainer(model, cfg, train_loader, eval_loader=eval_loader, sink=sink,
                          checkpoint_dir=ckpt_dir, checkpoint_store=store)
        trainer.restore("auto")  # a restored / retried trial continues from its newest checkpoint
        sink.replay(saved, trainer.step)
        # One value per attempt: > 0 shows the trial resumed instead of starting over.
        sink.inner.log_metrics({"resumed_from_step": float(trainer.step)}, trainer.step)
        t0 = time.perf_counter()
        result = trainer.fit()
        sink.inner.log_metrics({"train_time_s": time.perf_counter() - t0, "params": float(n_params)}, trainer.step)
        status = "FINISHED"
    except SystemExit:
        # Tune stops a trial (ASHA, or max_t reached at the last report) by exiting its thread
        # inside report(): finished if that was the last step, else stopped early.
        status = "FINISHED" if trainer is not None and trainer.step >= steps else "KILLED"
        raise
    finally:
        sink.close()
        if run_id is not None:
            from orchestration import tracking

            tracking.end_run(run_id, status, uri=spec.tracking_uri or None)
    if not spec.keep_checkpoints:
        _delete_tree(trial_url, ckpt_dir)
    return {**{k: v for k, v in result.items() if isinstance(v, (int, float))}, "params": n_params,
            "points": len(sink.points)}


def _trial_run(spec: StudySpec, info: TrialInfo, study_run_id: str) -> tuple[Any, str]:
    """(MLflowSink, run id) of the trial's nested run: the existing one on resume, else new."""
    from orchestration import tracking

    uri = spec.tracking_uri or None
    c = tracking.client(uri)
    exp_id = tracking.get_or_create_experiment(spec.experiment, uri)
    found = c.search_runs(
        [exp_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{study_run_id}' and tags.`vitscale.trial` = '{info.trial}'",
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
    else:
        run_id = tracking.start_run(
            spec.experiment, run_name=info.trial, parent_run_id=study_run_id,
            tags={"vitscale.trial": info.trial, "vitscale.study": spec.name, "vitscale.variant": info.variant},
            uri=uri,
        )
    sink = tracking.MLflowSink(run_id, uri=uri, system_metrics=False)
    sink.log_params({f"trial.{k}": v for k, v in dataclasses.asdict(info).items()})
    return sink, run_id


def _checkpoint_location(trial_url: str, key: str) -> tuple[str, Any]:
    """(local checkpoint_dir, CheckpointStore or None) for one trial's folder (path or s3://)."""
    if trial_url.startswith("s3://"):
        from orchestration.storage_ckpt import StorageCheckpointStore

        local = Path(tempfile.gettempdir()) / "vitscale-sweep-ckpt" / key
        return str(local), StorageCheckpointStore(trial_url)
    return (trial_url[len("file://"):] if trial_url.startswith("file://") else trial_url), None


def _delete_tree(url: str, local_dir: str) -> None:
    """Remove a finished trial's (or the whole study's) checkpoints and points files."""
    if local_dir:
        shutil.rmtree(local_dir, ignore_errors=True)
    if url.startswith("s3://"):
        st = open_storage(url)
        for k in st.list(""):
            st.delete(k)
    else:
        shutil.rmtree(url[len("file://"):] if url.startswith("file://") else url, ignore_errors=True)


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


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyResult:
    """What a finished study produced."""

    table: pa.Table
    table_path: Path
    files: dict[str, Path]
    summary: dict[str, Any]
    study_run_id: str | None
    errored_trials: list[str]
    complete: bool  # False when the sweep was interrupted (resume with --resume)


def _tuner(spec: StudySpec, study_run_id: str | None, resume: bool, name: str, variant: str | None) -> Any:
    from ray import tune

    trainable = tune.with_resources(run_trial, {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial})
    path = url_join(spec.storage_path, name)
    if tune.Tuner.can_restore(path):
        if not resume:
            raise FileExistsError(
                f"study {spec.name!r} already exists at {path}; pass --resume to continue it "
                "(finished trials are kept) or choose another --name"
            )
        log.info("restoring study %s from %s", spec.name, path)
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=param_space(spec, study_run_id, variant))
    scheduler, num_samples = None, 1
    if spec.study == "hparams":
        from ray.tune.schedulers import ASHAScheduler

        steps = max(spec.steps)
        first_eval = max(1, steps // spec.evals_per_trial)
        scheduler = ASHAScheduler(time_attr="step", max_t=steps, grace_period=first_eval, reduction_factor=2)
        num_samples = spec.num_samples
    return tune.Tuner(
        trainable,
        param_space=param_space(spec, study_run_id, variant),
        # reuse_actors: a worker process runs trial after trial, so torch / DeepSpeed are imported
        # once per worker, not once per trial (each trial still builds its own model and engine).
        tune_config=tune.TuneConfig(metric="eval_loss", mode="min", scheduler=scheduler, num_samples=num_samples,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=spec.storage_path,
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures)),
    )


def _export_project_path() -> None:
    """Put the project root on PYTHONPATH so the workers of a local Ray instance started by this
    driver import it too (a cluster gets the code from ``ray job submit --working-dir .``)."""
    root = str(Path(__file__).resolve().parents[1])
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])


def _check_same_study(spec: StudySpec, saved: Mapping[str, Any]) -> None:
    """A resumed study must keep the grid and recipe it started with (``StudySpec.grid_hash``)."""
    if StudySpec.from_dict(saved).grid_hash() != spec.grid_hash():
        diff = sorted(k for k, v in spec.to_dict().items() if saved.get(k) != v)
        raise ValueError(f"study {spec.name!r} was started with different settings ({', '.join(diff)}); "
                         "resume it with the command that started it")


def _study_run(spec: StudySpec, state_file: Path, resume: bool) -> str:
    """The study's MLflow run: reused on resume (id kept in ``study.json``), else created."""
    from orchestration import tracking

    uri = spec.tracking_uri or None
    if resume and state_file.exists():
        saved = json.loads(state_file.read_text())
        _check_same_study(spec, saved["spec"])
        run_id = saved["study_run_id"]
        if run_id is None:
            return _study_run(spec, state_file, resume=False)
        tracking.client(uri).update_run(run_id, status="RUNNING")
        return run_id
    run_id = tracking.start_run(spec.experiment, run_name=spec.name, uri=uri,
                                tags={"vitscale.study": spec.name, "vitscale.kind": spec.study,
                                      "vitscale.git_commit": tracking.git_commit()})
    tracking.log_params_once(run_id, {**tracking.flatten({"study": spec.to_dict()}), "trials": grid_size(spec)},
                             uri=uri)
    return run_id


def run_study(spec: StudySpec, *, resume: bool = False, ray_address: str | None = None,
              tracking: bool = True) -> StudyResult:
    """Run (or resume) the study on Ray Tune, then write and log its table, fit and plots."""
    from orchestration.ray_launch import connect_ray

    check_existing_study(spec, resume)
    if tracking and not spec.tracking_uri:  # resolved once, here, so every trial logs to the same store
        from orchestration import tracking as tr

        spec = dataclasses.replace(spec, tracking_uri=tr.tracking_uri())
    out = spec.analysis_dir
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "study.json"
    run_id = _study_run(spec, state_file, resume) if tracking else None
    state_file.write_text(json.dumps({"study_run_id": run_id, "spec": spec.to_dict()}, indent=2))
    _export_project_path()
    log.info("Ray: %s", connect_ray(ray_address))
    status = "FAILED"
    try:
        rows: list[dict[str, Any]] = []
        errored: list[str] = []
        complete, n_done = True, 0
        for name, variant in spec.experiments():
            grid = _tuner(spec, run_id, resume, name, variant).fit()
            done, n = _all_trials_done(url_join(spec.storage_path, name))
            n_done += n
            for res in grid:
                trial = res.metrics.get("trial") if res.metrics else None
                if res.error is not None:
                    errored.append(str(trial or res.path))
                    log.warning("trial %s failed: %s", trial or res.path, res.error)
                if res.metrics_dataframe is not None:
                    rows.extend(res.metrics_dataframe.to_dict("records"))
            if not done:  # interrupted (Ctrl-C): leave the remaining experiments to --resume
                complete = False
                break
        table = points_from_rows(rows)
        table_path = scaling.write_points(table, out / "points.parquet")
        files: dict[str, Path] = {"points": table_path}
        summary: dict[str, Any] = {"trials": grid_size(spec), "terminated": n_done,
                                   "errored": errored, "points": table.num_rows, "complete": complete}
        if spec.study == "hparams":
            best = best_hparams(table)
            files["best_hparams"] = out / "best_hparams.json"
            files["best_hparams"].write_text(json.dumps(best, indent=2))
            summary["best_hparams"] = best
        if table.num_rows:
            # A hparams study mixes learning rates: its frontier is not a scaling law, only plot it.
            report = scaling.analyze(table, out, metric=spec.metric, n_boot=spec.n_boot, strict=False,
                                     drop_nonfinite=True, fit_law=spec.study == "scaling")
            files.update(report.files)
            summary["fit"] = report.summary
            log.info("%s", scaling.format_report(report))
        if run_id is not None:
            _log_study(spec, run_id, files, summary)
        if complete and not spec.keep_checkpoints:  # early-stopped trials leave theirs behind
            _delete_tree(spec.trials_root, "")
        status = "KILLED" if not complete else "FINISHED" if not errored else "FAILED"
        return StudyResult(table, table_path, files, summary, run_id, errored, complete)
    finally:
        if run_id is not None:
            from orchestration import tracking as tr

            tr.end_run(run_id, status, uri=spec.tracking_uri or None)


def _all_trials_done(experiment_path: str) -> tuple[bool, int]:
    """(every trial terminated or errored, number terminated), from the saved experiment state.

    After Ctrl-C, ``Tuner.fit`` returns normally; the state it saved (unfinished trials
    PENDING, to be resumed) is the reliable record of what is left to do.
    """
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(experiment_path).trials
    done = sum(t.status == "TERMINATED" for t in trials)
    return all(t.status in ("TERMINATED", "ERROR") for t in trials), done


def best_hparams(table: pa.Table) -> dict[str, dict[str, float]]:
    """Per size: lr / weight decay of the trial with the lowest eval loss at its final step.

    Only trials that reached the longest step count compete (ASHA stops the others early).
    """
    rows = table.to_pylist()
    final: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["step"] == r["steps"] and r["eval_loss"] is not None and math.isfinite(r["eval_loss"]):
            cur = final.get(r["variant"])
            if cur is None or r["eval_loss"] < cur["eval_loss"]:
                final[r["variant"]] = r
    return {v: {"lr": r["lr"], "weight_decay": r["weight_decay"], "eval_loss": r["eval_loss"],
                "eval_error": r["eval_error"], "trial": r["trial"]} for v, r in sorted(final.items())}


def _log_study(spec: StudySpec, run_id: str, files: Mapping[str, Path], summary: Mapping[str, Any]) -> None:
    from orchestration import tracking

    sink = tracking.MLflowSink(run_id, uri=spec.tracking_uri or None, system_metrics=False)
    for path in files.values():
        if Path(path).exists():
            sink.log_artifact(str(path), "study")
    fit = summary.get("fit", {}).get("frontier_fit")
    if fit:
        metrics = {f"law.{k}": v for k, v in fit["params"].items()}
        metrics["law.rmse_log"] = fit["rmse_log"]
        hold = fit.get("holdout") or {}
        if hold.get("law") is not None:
            metrics["law.holdout_mean_abs_rel_error"] = hold["mean_abs_rel_error"]
        sink.log_metrics(metrics, 0)
        sink.set_tags({"vitscale.law": fit["law"]})
    sink.log_metrics({"study.points": float(summary.get("points", 0)),
                      "study.errored_trials": float(len(summary.get("errored", [])))}, 0)
    sink.close()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _samples(text: str) -> tuple[int | None, ...]:
    return tuple(None if x in ("all", "none", "") else int(x) for x in text.split(","))


def _floats2(text: str) -> tuple[float, float]:
    lo, hi = (float(x) for x in text.split(","))
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python orchestration/sweep.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--study", choices=STUDIES, default="scaling")
    p.add_argument("--variants", required=True,
                   help="comma-separated sizes: mu,Ti,S,B[/patch][:width=..:depth=..:heads=..:mlp_dim=..]")
    p.add_argument("--steps", type=_ints, required=True, help="training lengths (optimizer steps), e.g. 500,1000")
    p.add_argument("--data", required=True, help="dataset URL (path, file:// or s3://) from pipeline.write_shards")
    p.add_argument("--samples", type=_samples, default=(None,), help="training-set sizes, e.g. 400,all")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=None, help="for sizes without /P (default: size//8 below 128 px, else 16)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch of every trial")
    p.add_argument("--micro-batch", type=int, default=None, help="per forward pass (gradient accumulation)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-frac", type=float, default=0.05)
    p.add_argument("--decay", choices=("linear", "cosine"), default="cosine")
    p.add_argument("--evals-per-trial", type=int, default=4, help="points per trial")
    p.add_argument("--train-split", default="train")
    p.add_argument("--eval-split", default="val")
    p.add_argument("--crop-min", type=float, default=0.35, help="RandomResizedCrop lower scale")
    p.add_argument("--no-hflip", dest="hflip", action="store_false")
    p.add_argument("--loader-workers", type=int, default=1)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=None, help="default: 1 when the cluster has GPUs")
    p.add_argument("--hparams", default=None, help="best_hparams.json of a --study hparams run")
    p.add_argument("--num-samples", type=int, default=8, help="hparams: trials per size")
    p.add_argument("--lr-range", type=_floats2, default=(1e-4, 1e-2))
    p.add_argument("--wd-range", type=_floats2, default=(1e-3, 0.3))
    p.add_argument("--name", default=None, help="study name (default: <study>-<hash of the grid>)")
    p.add_argument("--storage", default=os.environ.get("VITSCALE_STUDY_STORAGE", "studies"),
                   help="Tune storage: a path or s3:// URI every node can reach")
    p.add_argument("--out", default="", help="table/plots directory (default <storage>/<name>-analysis)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep trial checkpoints after they finish")
    p.add_argument("--experiment", default="vitscale-scaling", help="MLflow experiment")
    p.add_argument("--metric", choices=scaling.METRICS, default="eval_error", help="what the law is fitted to")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--max-failures", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="continue an interrupted study (tune.Tuner.restore)")
    p.add_argument("--address", default=None, help="Ray address (default $RAY_ADDRESS, else a local instance)")
    p.add_argument("--no-tracking", dest="tracking", action="store_false", help="no MLflow runs")
    return p


def _cluster_gpus() -> float:
    """1 when the connected Ray cluster has GPUs, else 0 (0 when not connected: no Ray is started here)."""
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _read_hparams(path: str | None) -> dict[str, dict[str, float]]:
    """``best_hparams.json`` of an hparams study as ``{size: {"lr": .., "weight_decay": ..}}``."""
    if not path:
        return {}
    try:
        raw = json.loads(Path(path).read_text())
        return {str(v): {k: float(x[k]) for k in ("lr", "weight_decay")} for v, x in raw.items()}
    except (OSError, ValueError) as e:
        raise ValueError(f"--hparams {path}: {e}") from None
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"--hparams {path}: not a best_hparams.json ({{size: {{lr, weight_decay}}}}): "
                         f"{type(e).__name__} {e}") from None


def spec_from_args(args: argparse.Namespace) -> StudySpec:
    """StudySpec from parsed CLI arguments (raises ValueError listing every problem; no I/O but --hparams).

    Without ``--gpus-per-trial`` the GPUs per trial come from an already connected cluster, else 0;
    :func:`main` connects to Ray only after validation and then asks the cluster.
    """
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else _cluster_gpus()
    errors: list[str] = []
    try:
        hparams = _read_hparams(args.hparams)
    except ValueError as e:
        hparams, errors = {}, [str(e)]
    try:
        spec = _spec_of(args, gpus, hparams)
    except ValueError as e:
        raise ValueError("\n".join([str(e), *errors])) from None
    if errors:
        raise ValueError(errors[0])
    if not args.name:
        spec = dataclasses.replace(spec, name=f"{spec.study}-{spec.grid_hash()}")
    return spec


def _spec_of(args: argparse.Namespace, gpus: float, hparams: dict[str, dict[str, float]]) -> StudySpec:
    return StudySpec(
        name=args.name or "pending", study=args.study, data_url=args.data,
        variants=tuple(v for v in args.variants.split(",") if v), steps=args.steps, samples=args.samples,
        seeds=args.seeds, image_size=args.image_size, patch_size=args.patch_size, batch_size=args.batch_size,
        micro_batch=args.micro_batch,
        lr=args.lr, weight_decay=args.weight_decay, warmup_frac=args.warmup_frac, decay=args.decay,
        evals_per_trial=args.evals_per_trial, train_split=args.train_split, eval_split=args.eval_split,
        crop_min=args.crop_min, hflip=args.hflip, loader_workers=args.loader_workers,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=float(gpus), hparams=hparams,
        num_samples=args.num_samples, lr_range=args.lr_range, wd_range=args.wd_range, storage=args.storage,
        out_dir=args.out, keep_checkpoints=args.keep_checkpoints, experiment=args.experiment,
        metric=args.metric, n_boot=args.n_boot, max_failures=args.max_failures,
    )


def check_study(args: argparse.Namespace) -> tuple[StudySpec | None, list[str]]:
    """The study and every problem with it and its dataset, before Ray or MLflow start."""
    from orchestration import validation

    spec, problems = None, []
    try:
        spec = spec_from_args(args)
    except ValueError as e:
        problems += validation.problems_of(e)
    if spec is None:
        return None, problems + validation.location_problems(args.data)
    limits = [x for x in spec.samples if x is not None]
    data = trial_data_config(spec, seed=0, samples=min(limits, default=None))
    problems += validation.dataset_problems(spec.data_url, data, world_size=1, split_key="--train-split",
                                            eval_split=spec.eval_split, eval_key="--eval-split")
    if "://" not in spec.storage or spec.storage.startswith("file://"):
        problems += validation.storage_problems(spec.storage_path)
    try:
        check_existing_study(spec, args.resume)
    except (FileExistsError, ValueError) as e:
        problems.append(str(e))
    return spec, problems


def check_existing_study(spec: StudySpec, resume: bool) -> None:
    """A study already on storage needs --resume (FileExistsError), and --resume needs the settings it
    started with (ValueError). Reads Tune's saved state and ``study.json``; starts nothing."""
    from ray import tune

    existing = [n for n, _ in spec.experiments() if tune.Tuner.can_restore(url_join(spec.storage_path, n))]
    if existing and not resume:
        raise FileExistsError(
            f"study {spec.name!r} already exists at {url_join(spec.storage_path, existing[0])}; pass --resume "
            "to continue it (finished trials are kept) or choose another --name"
        )
    state_file = spec.analysis_dir / "study.json"
    if resume and state_file.exists():
        try:
            saved = json.loads(state_file.read_text())["spec"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{state_file} is not a study state file ({type(e).__name__}: {e})") from None
        _check_same_study(spec, saved)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    from orchestration import validation
    from orchestration.ray_launch import connect_ray

    spec, problems = check_study(args)
    if spec is None or problems:  # nothing started: no Ray, no MLflow run
        return validation.report(problems)
    if args.gpus_per_trial is None:  # only now ask the cluster (connecting may start a local Ray)
        connect_ray(args.address)
        spec = dataclasses.replace(spec, gpus_per_trial=_cluster_gpus())
    print(f"study {spec.name}: {grid_size(spec)} trials -> {spec.experiment_path}; analysis in {spec.analysis_dir}")
    try:
        result = run_study(spec, resume=args.resume, ray_address=args.address, tracking=args.tracking)
    except FileExistsError as e:  # created since check_study looked
        return validation.report([str(e)])
    for k, v in result.files.items():
        print(f"{k}: {v}")
    if not result.complete:
        print(f"study {spec.name} was interrupted ({result.summary['terminated']}/{grid_size(spec)} trials "
              "finished); run the same command with --resume to continue it", file=sys.stderr)
        return 130
    if result.errored_trials:
        print(f"{len(result.errored_trials)} trial(s) failed: {result.errored_trials}; rerun with --resume",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
