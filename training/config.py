"""TrainConfig: the optimisation recipe of one run, in sections, independent of the cluster.

``TrainConfig`` holds the batch, the seed and the log/eval cadence, and one section per concern:
``optim`` (optimizer and its hyper-parameters), ``schedule`` (warm-up, length, decay),
``objective`` (what is learnt and its loss: classification, MAE or distillation, told apart by ``kind``), ``engine`` (precision,
ZeRO, offload, activation checkpointing, compile), ``checkpoint`` (cadence, retention, I/O
timeout) and ``faults`` (bad steps, preemption grace, hang watchdog). A new objective or engine
feature adds a section or a field of one, never a flat field here.

The only world-dependent quantity, gradient accumulation, is derived and checked against the
world size at runtime (``TrainConfig.accum_for(world)``), so one config serves 1 CPU process and
64 GPUs alike as long as global = micro x accumulation x world.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from confkit import Checker, flatten, replace_paths, to_dict
from training.objectives import ClassificationConfig, ObjectiveConfig

#: Paths that may change between a checkpoint and its resumption: they count steps, say how
#: often to log or how long to wait, not what is optimised. Everything else is in the config hash.
RESUMABLE_FIELDS: frozenset[str] = frozenset({
    "schedule.total_steps", "log_every", "eval_every", "checkpoint.every", "checkpoint.keep",
    "checkpoint.io_timeout_s", "faults.max_bad_steps", "faults.preempt_grace_s", "faults.hang_timeout_s",
    "engine.compile", "engine.compile_backend",
})


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The optimizer (ViT paper defaults: AdamW, b=(0.9, 0.999), clip 1.0).

    ``weight_decay`` is decoupled (AdamW's ``p *= 1 - lr_t * wd``; see the recipes' note on the
    paper's mapping); ``momentum`` is SGD's; ``grad_clip`` is the global norm (0: off).
    ``layer_decay``: layer-wise learning-rate decay (BEiT, MAE fine-tuning: block i of L trains
    at ``lr * layer_decay ** (L + 1 - (i + 1))``; ``training.optim.param_groups``); None: off.
    """

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1
    momentum: float = 0.9
    grad_clip: float = 1.0
    layer_decay: float | None = None

    def __post_init__(self) -> None:
        c = Checker(self)
        c.choice("name", ("adamw", "sgd"))
        c.number("layer_decay", gt=0, le=1, optional=True, why=" (None: every layer at the same rate)")
        c.number("lr", gt=0)
        c.numbers("betas", 2, ge=0, lt=1)
        c.number("eps", gt=0)
        c.number("weight_decay", ge=0)
        c.number("momentum", ge=0, lt=1)
        c.number("grad_clip", ge=0, why=" (0 disables clipping)")
        c.done()


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Learning-rate schedule over optimizer steps: linear warm-up, then linear or cosine decay
    to ``min_lr`` at ``total_steps`` (the run's length)."""

    warmup_steps: int = 0
    total_steps: int = 1000
    decay: Literal["linear", "cosine"] = "linear"
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        c = Checker(self)
        if c.int("total_steps", ge=1) and c.int("warmup_steps", ge=0):
            c.require(self.warmup_steps < self.total_steps,
                      f"warmup_steps={self.warmup_steps} must be in [0, total_steps={self.total_steps})")
        c.choice("decay", ("linear", "cosine"))
        c.number("min_lr", ge=0)
        c.done()


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How the DeepSpeed engine runs the model (the hardware profiles set these).

    ``offload="cpu"`` moves optimizer states to host memory (ZeRO >= 1). ``compile`` runs the
    model under ``torch.compile(backend=compile_backend)`` inside the engine (the GPU profiles
    turn it on); checkpoints are the same with and without it, so a run may resume with it
    switched.
    """

    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    zero_stage: int = 1
    offload: Literal["none", "cpu"] = "none"
    activation_checkpointing: bool = False
    compile: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        c = Checker(self)
        c.choice("precision", ("fp32", "fp16", "bf16"))
        c.choice("zero_stage", (0, 1, 2, 3))
        if c.choice("offload", ("none", "cpu")):
            c.require(not (self.offload == "cpu" and self.zero_stage == 0), "offload='cpu' needs zero_stage >= 1")
        c.flag("activation_checkpointing")
        c.flag("compile")
        c.text("compile_backend", why=" naming a torch.compile backend, e.g. 'inductor'")
        c.done()


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """``every`` optimizer steps (0: only at the end of fit()), keeping the newest ``keep``.
    ``io_timeout_s`` bounds every collective that waits on checkpoint I/O (upload, download,
    staging): a rank waiting longer fails with a message instead of hanging."""

    every: int = 0
    keep: int = 3
    io_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        c = Checker(self)
        c.int("every", ge=0, why=" (0: only at the end)")
        c.int("keep", ge=1)
        c.number("io_timeout_s", gt=0, unit="seconds")
        c.done()


@dataclass(frozen=True, kw_only=True)
class FaultConfig:
    """``max_bad_steps`` consecutive non-finite losses abort the run. ``preempt_grace_s``: on
    SIGTERM every rank finishes the step, saves and exits 0 within this many seconds
    (training.preempt). ``hang_timeout_s``: a rank with no progress for this long (data wait,
    forward/backward, collective; checkpoint phases get ``checkpoint.io_timeout_s``) dumps its
    stacks and exits non-zero (training.watchdog); 0 disables the watchdog."""

    max_bad_steps: int = 10
    preempt_grace_s: float = 25.0
    hang_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        c = Checker(self)
        c.int("max_bad_steps", ge=1)
        c.number("preempt_grace_s", gt=0, unit="seconds",
                 why=" (the platform's grace period minus a margin, e.g. 25 for Kubernetes' 30)")
        c.number("hang_timeout_s", ge=0, unit="seconds", why=" (0 disables the hang watchdog)")
        c.done()


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation settings of one run; see the module docstring for the sections.

    ``global_batch`` is the number of samples per optimizer step over all ranks; ``micro_batch``
    is per device and forward pass; ``grad_accum=None`` derives accumulation from the world size.
    ``log_every`` / ``eval_every`` count optimizer steps (``eval_every=0``: only at the end).
    ``profile`` names the hardware profile the engine settings came from (training.profiles).
    """

    global_batch: int = 32
    micro_batch: int = 32
    grad_accum: int | None = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    profile: str = "auto"
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    objective: ObjectiveConfig = field(default_factory=ClassificationConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        c = Checker(self)
        if c.int("global_batch", ge=1) & c.int("micro_batch", ge=1):
            c.require(self.global_batch % self.micro_batch == 0,
                      f"global_batch {self.global_batch} is not a multiple of micro_batch {self.micro_batch}; "
                      "pick a micro_batch that divides it")
        c.int("grad_accum", ge=1, optional=True, why=" (none derives it from the world size)")
        c.int("seed", ge=0)
        c.int("log_every", ge=1)
        c.int("eval_every", ge=0, why=" (0: only at the end)")
        c.text("profile")
        c.require(self.schedule.min_lr <= self.optim.lr,
                  f"schedule.min_lr={self.schedule.min_lr} must be <= optim.lr={self.optim.lr}")
        c.done()

    def accum_for(self, world_size: int) -> int:
        """Gradient accumulation steps for `world_size` ranks; a clear error if they don't fit.

        Checks global_batch == micro_batch x grad_accum x world_size (deriving grad_accum when
        it is None) and names the numbers and a fix when it does not hold.
        """
        per_step = self.micro_batch * world_size
        if self.grad_accum is None:
            if self.global_batch % per_step:
                raise ValueError(
                    f"global_batch {self.global_batch} is not divisible by micro_batch {self.micro_batch} "
                    f"x world_size {world_size} = {per_step}; choose a global_batch that is a multiple of "
                    f"{per_step}, or a micro_batch such that micro_batch x {world_size} divides {self.global_batch}"
                )
            return self.global_batch // per_step
        if self.micro_batch * self.grad_accum * world_size != self.global_batch:
            fix = (
                f"set grad_accum={self.global_batch // per_step}"
                if self.global_batch % per_step == 0
                else f"set global_batch={per_step * self.grad_accum}"
            )
            raise ValueError(
                f"global_batch {self.global_batch} != micro_batch {self.micro_batch} x grad_accum "
                f"{self.grad_accum} x world_size {world_size} = {per_step * self.grad_accum}; {fix} "
                f"(or grad_accum=None to derive it)"
            )
        return self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able nested dict (tuples become lists)."""
        return to_dict(self)

    def hash_fields(self) -> dict[str, Any]:
        """The leaves that must match to resume from a checkpoint (all but RESUMABLE_FIELDS), by path."""
        flat = json.loads(json.dumps(flatten(self)))
        return {k: v for k, v in flat.items() if k not in RESUMABLE_FIELDS}

    def config_hash(self) -> str:
        """Short stable hash of `hash_fields()`; stored in every checkpoint."""
        blob = json.dumps(self.hash_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **paths: Any) -> TrainConfig:
        """This config with leaves replaced by path: ``cfg.replace(**{"optim.lr": 3e-4})``."""
        return replace_paths(self, paths)


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences ``path: saved -> current`` of two nested or flat config dicts,
    ignoring RESUMABLE_FIELDS."""
    a, b = _flat(saved), _flat(current)
    keys = sorted((set(a) | set(b)) - RESUMABLE_FIELDS)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in keys if a.get(k, "<absent>") != b.get(k, "<absent>")]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


__all__ = ["RESUMABLE_FIELDS", "CheckpointConfig", "ClassificationConfig", "EngineConfig", "FaultConfig",
           "OptimConfig", "ScheduleConfig", "TrainConfig", "config_diff"]
