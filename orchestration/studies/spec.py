"""A study = a base recipe + a grid of overrides. Every trial is an :class:`Experiment`: the base
(``--recipe``, default ``vit_study``, with the study's ``--set`` overrides) with the trial's size,
length, training-set size, seed (and, in an hparams study, learning rate / weight decay) applied
through the same typed overrides as ``pretrain.py --set``. Everything a trial needs travels in the
spec (docs/design.md, convention 9).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model import ViTSpec
from orchestration.experiment import (
    ConfigError,
    Experiment,
    apply_overrides,
    flatten_experiment,
    get_recipe,
    name_problems,
)
from orchestration.studies.archs import arch_label, arch_slug, is_arch, parse_arch
from orchestration.studies.table import METRICS, is_logged_metric
from pipeline.storage import url_join

STUDIES = ("scaling", "hparams")
#: What defines the trials (a default study name: same command, same study; --resume must keep it).
_GRID_KEYS = ("study", "variants", "steps", "samples", "seeds", "patch_size", "evals_per_trial", "hparams",
              "num_samples", "lr_range", "wd_range")


@dataclass(frozen=True, kw_only=True)
class StudySpec:
    """One study: the grid, the base experiment every trial trains, and where things go.

    ``variants`` are size specs (see :func:`parse_size`): ``"Ti"``, ``"B/16"`` or
    ``"mu/4:width=64:mlp_dim=128"``, or architectures (``"timm:<name>[:field=value]..."``,
    :mod:`orchestration.studies.archs`). ``samples`` entries of ``None`` use the whole train split.
    ``overrides`` are ``--set`` items applied to ``recipe`` (``data.source.url=...``, ``train.optim.lr=3e-3``,
    ``image_size=16``); the result is :attr:`base`. ``hparams`` maps a size to
    ``{"lr": .., "weight_decay": ..}`` for that size's trials.
    """

    name: str
    study: Literal["scaling", "hparams"] = "scaling"
    recipe: str = "vit_study"
    overrides: tuple[str, ...] = ()
    variants: tuple[str, ...]
    steps: tuple[int, ...]
    samples: tuple[int | None, ...] = (None,)
    seeds: int = 1
    patch_size: int | None = None
    evals_per_trial: int = 4
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

    @functools.cached_property
    def base(self) -> Experiment:
        """``recipe`` with ``overrides`` applied (raises ConfigError listing every problem)."""
        return apply_overrides(get_recipe(self.recipe), self.overrides)

    @property
    def data_url(self) -> str:
        return self.base.data.source.url

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
        labels = [size_label(v, image_size=self.base.image_size, patch_size=self.patch_size) for v in self.variants]
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
        tuples = {"variants", "steps", "samples", "lr_range", "wd_range", "overrides"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})

    def settings(self) -> dict[str, Any]:
        """What defines the trials: the grid and every resolved setting of the base experiment."""
        d = self.to_dict()
        return json.loads(json.dumps({**{k: d[k] for k in _GRID_KEYS}, **flatten_experiment(self.base)},
                                     default=str))

    def grid_hash(self) -> str:
        """Short hash of :meth:`settings` (a default study name: same command, same study)."""
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:8]

    def changed_settings(self, other: StudySpec) -> list[str]:
        """Names of the settings that differ from ``other``'s (``["train.optim.lr"]``)."""
        mine, theirs = self.settings(), other.settings()
        return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


def trial_overrides(spec: StudySpec, *, variant: str, steps: int, samples: int | None, seed: int,
                    lr: float | None = None, weight_decay: float | None = None) -> list[str]:
    """The ``--set`` items that turn the study's base into one trial's experiment.

    ``spec.evals_per_trial`` evaluations (and checkpoints); the base's warmup fraction at this
    length; the size's tuned (``spec.hparams``) or sampled lr / weight decay.
    """
    base = spec.base.train
    model_items: list[str] = []
    if not is_arch(variant):  # an architecture replaces the whole model section (trial_experiment)
        name, shape = parse_size(variant, image_size=spec.base.image_size, patch_size=spec.patch_size)
        model_items = [f"model.variant={name}", *(f"model.{k}={v}" for k, v in shape.items())]
    tuned = spec.hparams.get(variant, {})
    lr = lr if lr is not None else tuned.get("lr")
    weight_decay = weight_decay if weight_decay is not None else tuned.get("weight_decay")
    every = max(1, steps // spec.evals_per_trial) if spec.evals_per_trial >= 1 else steps
    warmup = min(base.schedule.warmup_steps * steps // max(1, base.schedule.total_steps), steps - 1)
    items = [*model_items, f"train.schedule.total_steps={steps}", f"train.schedule.warmup_steps={max(0, warmup)}",
             f"train.eval_every={every}", f"train.checkpoint.every={every}",
             f"train.log_every={max(1, min(50, every))}", f"train.seed={seed}", f"data.seed={seed}",
             f"data.source.limit_samples={samples}"]
    if spec.base.eval.fewshot_data:  # few-shot at each of the trial's evaluations: one point each
        items.append(f"eval.fewshot_every={every}")
    items += [f"train.optim.lr={float(lr)!r}"] if lr is not None else []
    items += [f"train.optim.weight_decay={float(weight_decay)!r}"] if weight_decay is not None else []
    return items


def trial_experiment(spec: StudySpec, **trial: Any) -> Experiment:
    """One trial's :class:`Experiment`: the base with :func:`trial_overrides` (same arguments); an
    architecture variant first replaces the base's model section (and a ViT size the section of a
    base recipe that trains a timm model)."""
    base, variant = spec.base, trial["variant"]
    if is_arch(variant):
        base = _with_model(base, parse_arch(variant))
    elif not isinstance(base.model, ViTSpec):
        base = _with_model(base, ViTSpec())
    return apply_overrides(base, trial_overrides(spec, **trial))


def _with_model(base: Experiment, model: Any) -> Experiment:
    try:
        return dataclasses.replace(base, model=model)
    except ValueError as e:  # the base's objective refuses this model (an MAE recipe and a timm network)
        raise ConfigError([f"model: {' '.join(str(e).split())}"]) from None


def _range_errors(name: str, rng: Any) -> list[str]:
    """A log-uniform search range: two finite numbers 0 < low < high."""
    ok = len(rng) == 2 and all(isinstance(x, int | float) and math.isfinite(x) for x in rng)
    return [] if ok and 0 < rng[0] < rng[1] else [f"{name}={tuple(rng)!r} must be low,high with 0 < low < high"]


def _study_errors(s: StudySpec) -> list[str]:
    """Every problem of a study, one line each: its own fields, its base, then each trial's experiment."""
    errors = name_problems("name", s.name)
    if s.study not in STUDIES:
        errors.append(f"study {s.study!r}: choose one of {STUDIES}")
    if not s.variants:
        errors.append("variants is empty: name at least one model size, e.g. --variants mu,Ti,S")
    if not s.steps or any(int(x) < 1 for x in s.steps):
        errors.append(f"steps {s.steps} must be positive integers")
    for name, low in (("seeds", 1), ("evals_per_trial", 1), ("num_samples", 1), ("n_boot", 1), ("max_failures", 0)):
        if getattr(s, name) < low:
            errors.append(f"{name} {getattr(s, name)} must be >= {low}")
    if not (math.isfinite(s.cpus_per_trial) and s.cpus_per_trial > 0):
        errors.append(f"cpus_per_trial={s.cpus_per_trial} must be a finite number > 0")
    if not (math.isfinite(s.gpus_per_trial) and s.gpus_per_trial >= 0):
        errors.append(f"gpus_per_trial={s.gpus_per_trial} must be a finite number >= 0")
    if s.metric not in METRICS and not is_logged_metric(s.metric):
        errors.append(f"metric {s.metric!r}: choose one of {METRICS} or a logged metric such as "
                      "fewshot/<dataset>/10shot (with --fewshot-data)")
    errors += _fewshot_metric_errors(s) + _objective_metric_errors(s)
    if s.study == "hparams":
        errors += _range_errors("lr_range", s.lr_range) + _range_errors("wd_range", s.wd_range)
    try:
        batch = s.base.train.global_batch
    except (ConfigError, ValueError) as e:
        return errors + str(e).splitlines()
    if any(x is not None and x < batch for x in s.samples):
        errors.append(f"samples {s.samples}: each limit must be >= batch_size {batch}")
    return errors + _trial_errors(s)


def _fewshot_metric_errors(s: StudySpec) -> list[str]:
    """A ``fewshot/<ds>/<K>shot`` metric must be one the trials log (their datasets and shots)."""
    if not s.metric.startswith("fewshot/"):
        return []
    try:
        base = s.base
    except (ConfigError, ValueError):
        return []  # the base's own problems are reported by the caller
    from orchestration.evaluation.in_training import split_datasets

    names, _ = split_datasets(base.eval.fewshot_data)
    valid = [f"fewshot/{n}/{k}shot" for n in names for k in base.eval.fewshot_shots]
    if s.metric in valid:
        return []
    if not valid:
        return [f"metric {s.metric!r}: the trials run no few-shot evaluation; add --fewshot-data NAME=URL "
                "(or --set eval.fewshot_data=NAME=URL)"]
    return [f"metric {s.metric!r} is not logged by the trials; choose one of {valid}"]


def default_metric(recipe: str) -> str:
    """eval_error for a classification recipe, eval_loss for one without a top-1 (MAE); an unknown
    recipe is reported by the study's checks."""
    try:
        kind = get_recipe(recipe).train.objective.kind
    except ValueError:
        return "eval_error"
    return "eval_error" if kind == "classification" else "eval_loss"


def logged_metrics(base: Experiment) -> list[str]:
    """The metrics the trials of ``base`` log that a study can fit: eval_error (1 - top-1) only
    for a classifier, eval_loss always (an MAE's masked reconstruction error), and the few-shot
    accuracies of its ``eval.fewshot_data``."""
    from orchestration.evaluation.in_training import split_datasets

    names, _ = split_datasets(base.eval.fewshot_data)
    builtin = list(METRICS) if base.train.objective.kind == "classification" else ["eval_loss"]
    return builtin + [f"fewshot/{n}/{k}shot" for n in names for k in base.eval.fewshot_shots]


def _objective_metric_errors(s: StudySpec) -> list[str]:
    """A built-in metric the base's objective does not log (eval_error of an MAE: it has no top-1)."""
    if s.metric not in METRICS:
        return []
    try:
        base = s.base
    except (ConfigError, ValueError):
        return []  # the base's own problems are reported by the caller
    logged = logged_metrics(base)
    if s.metric in logged:
        return []
    return [f"metric {s.metric!r}: the trials of recipe {s.recipe} ({base.train.objective.kind} objective) have "
            f"no top-1 to take an error from; choose one of the metrics they log: {', '.join(logged)} (few-shot "
            "accuracies with --fewshot-data NAME=URL)"]


def _trial_errors(s: StudySpec) -> list[str]:
    """Build what the trials would build (every length x lr x weight decay, every size) and collect
    their problems: what passed here is what a trial runs."""
    limits = [x for x in s.samples if x is not None]
    lrs: set[float | None] = {None, *(h.get("lr") for h in s.hparams.values())}
    wds: set[float | None] = {None, *(h.get("weight_decay") for h in s.hparams.values())}
    if s.study == "hparams":  # the search samples inside the ranges; their ends must be valid too
        lrs |= set(s.lr_range)
        wds |= set(s.wd_range)
    steps = sorted({int(x) for x in s.steps if int(x) >= 1})
    cells = [(st, lr, wd) for st in steps for lr in lrs for wd in wds]
    errors: list[str] = []
    for i, v in enumerate(s.variants):
        try:
            size_label(v, image_size=s.base.image_size, patch_size=s.patch_size)
        except ValueError as e:
            errors.append(str(e))
            continue
        for st, lr, wd in cells if i == 0 else cells[:1]:  # the sizes differ only in the model
            try:
                trial_experiment(s, variant=v, steps=st, samples=min(limits, default=None), seed=0, lr=lr,
                                 weight_decay=wd)
            except ConfigError as e:
                errors += [f"variants: {v!r}: {p}" if p.startswith("model") else p for p in e.problems]
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
    """Canonical label of a size spec for tables and plots: ``"Ti/4"``, ``"mu/4:width=64"``,
    ``"timm:swin_tiny_patch4_window7_224:depths=1,1"``."""
    if is_arch(spec):
        return arch_label(spec)
    name, overrides = parse_size(spec, image_size=image_size, patch_size=patch_size)
    return name + "".join(f":{k}={v}" for k, v in overrides.items())


def size_slug(label: str) -> str:
    """Path-safe form of a size label: ``"mu/4:width=64"`` -> ``"mu4-width64"``."""
    if is_arch(label):
        return arch_slug(label)
    return label.replace("/", "").replace(":", "-").replace("=", "")


def trial_key(variant: str, steps: int, samples: int | None, seed: int, suffix: str = "") -> str:
    """Stable, path-safe id of one grid cell: ``"mu4-width64_s500_nall_seed0"``."""
    key = f"{size_slug(variant)}_s{steps}_n{'all' if samples is None else samples}_seed{seed}"
    return f"{key}_{suffix}" if suffix else key


def param_space(spec: StudySpec, study_run_id: str | None, variant: str | None = None) -> dict[str, Any]:
    """Tune's param_space: grid axes (scaling) or sampled lr/wd for ``variant`` (hparams) + the spec."""
    from ray import tune

    labels = [size_label(v, image_size=spec.base.image_size, patch_size=spec.patch_size) for v in spec.variants]
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
