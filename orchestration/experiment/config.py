"""The :class:`Experiment`: everything one training run needs, in typed sections.

Only orchestration sees a whole experiment; each component gets its own small config
(``model.ViTSpec`` -> ``ViTConfig`` or ``model.TimmSpec`` -> ``TimmConfig``, ``pipeline.DataConfig``,
``training.TrainConfig``). The
experiment adds what only a launch knows: the evaluation during training (``eval``) and the
Ray resources (``resources``). ``--set`` paths follow the sections:
``--set train.optim.lr=3e-4``, ``--set model.dropout=0.1``, ``--set resources.workers=4``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from confkit import Checker, ConfigValueError, flatten, from_dict, to_dict
from model import TimmConfig, TimmSpec, ViTConfig, ViTSpec
from model.tokenizer import DVAEConfig, DVAESpec
from pipeline import DataConfig
from pipeline.masking import MaskConfig
from training import TrainConfig
from training.objectives import objective_for

#: A name that is safe as one path component, an MLflow name and a Ray Train run name.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def name_problems(key: str, value: Any) -> list[str]:
    """``[]`` if ``value`` is safe as a path component (run folders, registry names), else one line."""
    if isinstance(value, str) and _SAFE_NAME.match(value) and ".." not in value:
        return []
    return [f"{key}={value!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "and without '..' (it names folders and registry entries)"]


#: Objective kind -> the loader's mask kind (pipeline.masking): MAE hides random patches, BEiT
#: blocks (of at least data.mask.min_block=16 patches, aspect in [0.3, 1/0.3]: BEiT's defaults).
_MASK_KIND = {"mae": "random", "beit": "block"}


@dataclass(frozen=True, kw_only=True)
class Resources:
    """What the run asks of Ray: ``workers`` ranks of ``cpus_per_worker`` CPUs and
    ``gpus_per_worker`` GPUs each.

    ``min_workers``: elastic (Ray Train ``ScalingConfig(num_workers=(min_workers, workers))``):
    runs on as few as ``min_workers`` when nodes are lost and grows back; None = exactly
    ``workers``. ``elastic_resize_s``: how often an elastic group looks for capacity to grow
    into. ``group_start_timeout_s``: Ray Train's wait for a worker group's resources
    (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``; None = Ray's 60 s): after a node is lost Ray
    first retries at the old size, on a view that can still count the dead node, and waits this
    long before trying the size that fits; lower it where nodes never take long to come.
    ``max_failures``: worker-group restarts before the run gives up (Ray Train FailureConfig).
    """

    workers: int = 1
    min_workers: int | None = None
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    max_failures: int = 2
    elastic_resize_s: float = 60.0
    group_start_timeout_s: float | None = None

    def __post_init__(self) -> None:
        c = Checker(self)
        c.int("workers", ge=1)
        c.int("cpus_per_worker", ge=1, why=" (Ray packs workers without CPUs onto one node without limit)")
        c.int("gpus_per_worker", ge=0)
        c.int("max_failures", ge=0, why=" (-1, Ray's 'retry forever', would repeat a deterministic failure "
                                        "without end)")
        if c.int("min_workers", ge=1, optional=True, why=" for a fixed size") and self.min_workers is not None:
            c.require(not isinstance(self.workers, int) or self.min_workers <= self.workers,
                      f"min_workers={self.min_workers!r} must be an int in [1, workers={self.workers}] "
                      "(or none for a fixed size)")
        c.number("elastic_resize_s", gt=0, unit="seconds")
        c.number("group_start_timeout_s", gt=0, unit="seconds", optional=True, why=" for Ray's default")
        c.done()


@dataclass(frozen=True, kw_only=True)
class EvalSpec:
    """Evaluation during training.

    ``split``: the dataset's split evaluated every ``train.eval_every`` steps and at the end
    (None: none). Few-shot linear evaluation (orchestration.evaluation) on downstream datasets
    ``fewshot_data`` (URL or NAME=URL, written by write_shards), every ``fewshot_every`` steps
    (0: only at the end) and at the end, logged as ``fewshot/<NAME>/<K>shot``; empty: never.
    """

    split: str | None = "val"
    fewshot_data: tuple[str, ...] = ()
    fewshot_every: int = 0
    fewshot_shots: tuple[int, ...] = (1, 5, 10, 25)
    fewshot_seed: int = 0

    def __post_init__(self) -> None:
        c = Checker(self)
        c.require(self.split is None or (isinstance(self.split, str) and bool(self.split)),
                  f"split={self.split!r} must be a split name or none")
        c.int("fewshot_every", ge=0, why=" (0: few-shot only at the end)")
        c.require(bool(self.fewshot_shots) and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                                   for k in self.fewshot_shots),
                  f"fewshot_shots={self.fewshot_shots!r} must be one or more ints >= 1, e.g. 1,5,10,25")
        c.require(not (isinstance(self.fewshot_every, int) and self.fewshot_every and not self.fewshot_data),
                  f"fewshot_every={self.fewshot_every} needs downstream datasets: --fewshot-data URL[,URL] "
                  "(or --set eval.fewshot_data=URL)")
        c.int("fewshot_seed", ge=0)
        c.done()


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """Everything one pre-training (or fine-tuning) launch needs; only orchestration sees it.

    ``image_size`` is the one source of the resolution and ``train.micro_batch`` of the per-rank
    batch: ``data.image_size`` / ``data.batch_size`` are derived from them when the experiment is
    built (whatever the given ``data`` said), so the two can never disagree; so is ``data.mask``,
    from the objective (MAE: random masks of its ratio) and the model's patch size. ``dataset_name`` and
    ``registered_model_name`` ("" -> ``vit-<variant>-<dataset>``, ``<timm name>-<dataset>``) name the
    MLflow entries. ``model`` is our ViT (``kind="vit"``) or a timm architecture (``kind="timm"``,
    docs/architectures.md), or a dVAE tokenizer (``kind="dvae"``, trained by the dVAE objective,
    registered as ``dvae-v<vocab>p<patch>-<dataset>``; docs/tokenizer.md), told apart by its ``kind``.
    """

    name: str
    image_size: int
    model: ViTSpec | TimmSpec | DVAESpec
    data: DataConfig
    train: TrainConfig
    eval: EvalSpec = field(default_factory=EvalSpec)
    resources: Resources = field(default_factory=Resources)
    dataset_name: str = "dataset"
    registered_model_name: str = ""

    def __post_init__(self) -> None:
        c = Checker(self)
        for key in ("name", "dataset_name") + (("registered_model_name",) if self.registered_model_name else ()):
            for line in name_problems(key, getattr(self, key)):
                c.fail(line)
        c.int("image_size", ge=1)
        kind = self.train.objective.kind
        c.require(not (isinstance(self.model, TimmSpec) and kind == "mae"),
                  f"train.objective.kind={kind!r} needs our ViT (model.kind='vit'): MAE drops patch tokens inside "
                  f"model.VisionTransformer, which timm's {getattr(self.model, 'name', '')} does not do; use an MAE "
                  "recipe (mae_vit_*) or a classification objective")
        c.require((self.model.kind == "dvae") == (kind == "dvae"),
                  f"model.kind={self.model.kind!r} with train.objective.kind={kind!r}: a dVAE tokenizer (model.kind="
                  "'dvae') trains with the dVAE objective (train.objective.kind='dvae') and that objective trains "
                  "nothing else; use a tokenizer recipe (dvae_tokenizer_*)")
        c.done()
        derived = {"image_size": self.image_size, "batch_size": self.train.micro_batch, "mask": self._mask()}
        if any(getattr(self.data, k) != v for k, v in derived.items()):
            try:
                data = replace(self.data, **derived)
            except ConfigValueError as e:  # a derived value: name the key the user sets
                ratio = f"train.objective.mask_ratio={derived['mask'].ratio}: "
                raise ConfigValueError("Experiment", [ratio + p.removeprefix("mask: ") if p.startswith("mask: ")
                                                      else f"data.{p}" for p in e.problems]) from None
            object.__setattr__(self, "data", data)  # frozen: set once, here

    def _mask(self) -> MaskConfig:
        """The patch masks the objective needs from the loader (none for classification)."""
        obj = self.train.objective
        kind = _MASK_KIND.get(obj.kind, "none")
        if kind == "none":
            return MaskConfig()
        return replace(self.data.mask, kind=kind, ratio=obj.mask_ratio, patch_size=self._patch_size())

    def _patch_size(self) -> int:
        """The model's patch size (a timm spec without one: its named model's, from a meta-device probe)."""
        if not isinstance(self.model, TimmSpec):
            return int(self.model.shape["patch_size"])
        if self.model.patch_size:
            return int(self.model.patch_size)
        from model.zoo import probe

        try:  # a size the model cannot take is the model check's to report (checks.experiment_problems)
            cfg = TimmConfig(**self.model.arch_fields(), num_classes=0, image_size=self.image_size)
            return int(probe(cfg).patch_size or 16)
        except ValueError:
            return 16

    @property
    def model_name(self) -> str:
        """Registry name: ``vit-<variant>-<dataset>`` (``mae-vit-...`` for another objective's
        model; ``dvae-v8192p16-<dataset>`` for a tokenizer) unless the recipe set one."""
        kind = self.train.objective.kind
        if isinstance(self.model, DVAESpec):
            return self.registered_model_name or f"{self.model.variant}-{self.dataset_name}"
        prefix = "" if kind == "classification" else f"{kind}-"
        arch = self.model.slug if isinstance(self.model, TimmSpec) else f"vit-{self.model.slug}"
        return self.registered_model_name or f"{prefix}{arch}-{self.dataset_name}"

    @property
    def global_batch(self) -> int:
        return self.train.micro_batch * self.grad_accum * self.resources.workers

    @property
    def grad_accum(self) -> int:
        """Accumulation steps so that micro_batch x accum x workers == train.global_batch."""
        return self.train.accum_for(self.resources.workers)

    def model_config(self, num_classes: int) -> ViTConfig | TimmConfig | DVAEConfig:
        """The network config this experiment trains, for a dataset with ``num_classes`` labels (the
        objective decides the head: MAE's encoder has none); ValueError when the model cannot be
        built at ``image_size``."""
        head = objective_for(self.train.objective).num_classes(num_classes)
        return self.model.config(num_classes=head, image_size=self.image_size)


def flatten_experiment(exp: Experiment) -> dict[str, Any]:
    """``{"train.optim.lr": 1e-3, "data.source.url": ..., "model.dropout": 0.1, "resources.workers": 2, ...}``
    (for tracking), plus the derived ``grad_accum``, ``global_batch`` and ``registered_model_name``."""
    out = flatten(exp)
    out["grad_accum"] = exp.grad_accum
    out["global_batch"] = exp.global_batch
    out["registered_model_name"] = exp.model_name
    return out


def experiment_to_dict(exp: Experiment) -> dict[str, Any]:
    """JSON-able nested dict of the experiment (tuples become lists)."""
    return to_dict(exp)


def experiment_from_dict(d: dict[str, Any]) -> Experiment:
    """Inverse of :func:`experiment_to_dict` (an unknown key, e.g. from an older layout, is an error)."""
    return from_dict(Experiment, d)
