"""The :class:`Experiment`: everything one training run needs, and its (de)serialisation.

Only orchestration sees a whole experiment; each component gets its own small config
(``pipeline.DataConfig``, ``training.TrainConfig``, ``model.ViTConfig``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, replace
from typing import Any

from model import ViTConfig, vit_config
from pipeline import DataConfig
from training import TrainConfig


def variant_slug(variant: str) -> str:
    """``"B/16" -> "b16"``, ``"mu/4" -> "mu4"`` (used in registered model names)."""
    return variant.replace("/", "").lower()


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """Everything one pre-training (or fine-tuning) launch needs; only orchestration sees it.

    ``image_size`` is the one source of the resolution and ``train.micro_batch`` of the per-rank
    batch: ``data.image_size`` / ``data.batch_size`` are derived from them when the experiment is
    built (whatever the given ``data`` said), so the two can never disagree.
    ``workers * cpus_per_worker`` CPUs (and ``gpus_per_worker`` GPUs each) are asked of Ray.
    """

    name: str
    variant: str  # paper name, e.g. "B/16" (model.parse_variant)
    image_size: int
    data: DataConfig
    train: TrainConfig
    model_overrides: dict[str, Any] = field(default_factory=dict)  # extra ViTConfig fields
    workers: int = 1
    # Elastic (Ray Train ScalingConfig(num_workers=(min_workers, workers))): runs on as few as
    # min_workers when nodes are lost and grows back; None = exactly `workers`.
    min_workers: int | None = None
    elastic_resize_s: float = 60.0  # how often an elastic group looks for capacity to grow into
    # Ray Train's wait for a worker group's resources (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S);
    # None = Ray's default (60 s). After a node is lost Ray first retries at the old size, on a
    # view of the cluster that can still count the dead node, and waits this long before trying
    # the size that fits; lower it where nodes never take long to come (no autoscaler launches).
    group_start_timeout_s: float | None = None
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    dataset_name: str = "dataset"
    registered_model_name: str = ""  # "" -> "vit-<variant>-<dataset>"
    eval_split: str | None = "val"  # None: no eval loader
    max_failures: int = 2  # Ray Train FailureConfig: worker-group restarts before giving up
    # Few-shot linear evaluation during training (orchestration.evaluation): downstream datasets
    # (URL or NAME=URL, written by write_shards), run every fewshot_every steps (0: only at the
    # end) and at the end; logged as fewshot/<NAME>/<K>shot. Empty fewshot_data: never.
    fewshot_data: tuple[str, ...] = ()
    fewshot_every: int = 0
    fewshot_shots: tuple[int, ...] = (1, 5, 10, 25)
    fewshot_seed: int = 0

    def __post_init__(self) -> None:
        derived = {"image_size": self.image_size, "batch_size": self.train.micro_batch}
        if any(getattr(self.data, k) != v for k, v in derived.items()):
            object.__setattr__(self, "data", replace(self.data, **derived))  # frozen: set once, here

    @property
    def model_name(self) -> str:
        """Registry name: ``vit-<variant>-<dataset>`` unless the recipe set one."""
        return self.registered_model_name or f"vit-{variant_slug(self.variant)}-{self.dataset_name}"

    @property
    def global_batch(self) -> int:
        return self.train.micro_batch * self.grad_accum * self.workers

    @property
    def grad_accum(self) -> int:
        """Accumulation steps so that micro_batch x accum x workers == train.global_batch."""
        return self.train.accum_for(self.workers)

    def model_config(self, num_classes: int) -> ViTConfig:
        """The ViTConfig this experiment trains, for a dataset with ``num_classes`` labels."""
        return vit_config(
            self.variant, num_classes=num_classes, image_size=self.image_size, **self.model_overrides
        )


def flatten_experiment(exp: Experiment) -> dict[str, Any]:
    """``{"train.lr": 1e-3, "data.url": ..., "model.dropout": 0.1, "workers": 2, ...}`` (for tracking)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(exp):
        value = getattr(exp, f.name)
        if f.name in ("data", "train"):
            for sub in dataclasses.fields(value):
                out[f"{f.name}.{sub.name}"] = getattr(value, sub.name)
        elif f.name == "model_overrides":
            for k, v in sorted(value.items()):
                out[f"model.{k}"] = v
        else:
            out[f.name] = value
    out["grad_accum"] = exp.grad_accum
    out["global_batch"] = exp.global_batch
    out["registered_model_name"] = exp.model_name
    return out


def experiment_to_dict(exp: Experiment) -> dict[str, Any]:
    """JSON-able nested dict of the experiment (tuples become lists)."""
    return dataclasses.asdict(exp)


def experiment_from_dict(d: dict[str, Any]) -> Experiment:
    """Inverse of :func:`experiment_to_dict` (lists back to tuples where the field is a tuple)."""

    def build(cls: type, values: dict[str, Any]) -> Any:
        hints = _hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if not f.init or f.name not in values:
                continue
            v = values[f.name]
            tp = hints[f.name]
            if isinstance(v, list) and _is_tuple_type(tp):
                v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
            kwargs[f.name] = v
        return cls(**kwargs)

    d = dict(d)
    data = build(DataConfig, d.pop("data"))
    train = build(TrainConfig, d.pop("train"))
    return build(Experiment, {**d, "data": data, "train": train})


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_tuple_type(tp: Any) -> bool:
    if typing.get_origin(tp) is tuple:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(typing.get_origin(a) is tuple for a in typing.get_args(tp))
    return False
