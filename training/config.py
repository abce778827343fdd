"""TrainConfig: the optimisation recipe of one run, independent of the cluster it runs on.

The only world-dependent quantity, gradient accumulation, is derived and checked against the
world size at runtime (`TrainConfig.accum_for(world)`), so one config serves 1 CPU process and
64 GPUs alike as long as global = micro x accumulation x world.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

# Fields that may change between a checkpoint and its resumption: they count steps, say how
# often to log or how long to wait, not what is optimised. Everything else is in the config hash.
RESUMABLE_FIELDS: frozenset[str] = frozenset(
    {"total_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps",
     "io_timeout_s", "compile", "compile_backend", "preempt_grace_s", "hang_timeout_s"}
)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation settings of one run (ViT paper defaults: AdamW b=(0.9, 0.999), clip 1.0).

    `global_batch` is the number of samples per optimizer step over all ranks; `micro_batch` is
    per device and forward pass; `grad_accum=None` derives accumulation from the world size.
    `warmup_steps`/`total_steps` count optimizer steps. `eval_every`/`checkpoint_every` = 0
    means "only at the end of fit()". `max_bad_steps` consecutive non-finite losses abort.
    `io_timeout_s` bounds every collective that waits on checkpoint I/O (upload, download,
    staging): a rank waiting longer fails with a message instead of hanging.
    `compile` runs the model under `torch.compile(backend=compile_backend)` inside the DeepSpeed
    engine (the GPU profiles turn it on); checkpoints are the same with and without it, so a
    run may resume with it switched.
    `preempt_grace_s`: on SIGTERM every rank finishes the step, saves a checkpoint and exits 0
    within this many seconds (training.preempt); `hang_timeout_s`: a rank with no progress for
    this long (data wait, forward/backward, collective; checkpoint phases get io_timeout_s)
    dumps its stacks and exits non-zero (training.watchdog); 0 disables the watchdog.
    """

    global_batch: int = 32
    micro_batch: int = 32
    grad_accum: int | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1
    momentum: float = 0.9
    warmup_steps: int = 0
    total_steps: int = 1000
    decay: Literal["linear", "cosine"] = "linear"
    min_lr: float = 0.0
    grad_clip: float = 1.0
    loss: Literal["softmax", "sigmoid"] = "softmax"
    label_smoothing: float = 0.0
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    zero_stage: int = 1
    offload: Literal["none", "cpu"] = "none"
    activation_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    max_bad_steps: int = 10
    io_timeout_s: float = 1800.0
    preempt_grace_s: float = 25.0
    hang_timeout_s: float = 1800.0
    compile: bool = False
    compile_backend: str = "inductor"
    profile: str = "auto"

    def __post_init__(self) -> None:
        errors: list[str] = []

        def check(ok: bool, msg: str) -> None:
            if not ok:
                errors.append(msg)

        for name in ("global_batch", "micro_batch", "total_steps"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, f"{name}={v!r} must be a positive int")
        if self.grad_accum is not None:
            check(self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be >= 1 (or None to derive it)")
        if isinstance(self.global_batch, int) and isinstance(self.micro_batch, int) and self.micro_batch >= 1:
            check(
                self.global_batch % self.micro_batch == 0,
                f"global_batch {self.global_batch} is not a multiple of micro_batch {self.micro_batch}; "
                f"pick a micro_batch that divides it",
            )
        check(self.optimizer in ("adamw", "sgd"), f"optimizer={self.optimizer!r}: use 'adamw' or 'sgd'")
        check(self.decay in ("linear", "cosine"), f"decay={self.decay!r}: use 'linear' or 'cosine'")
        check(self.loss in ("softmax", "sigmoid"), f"loss={self.loss!r}: use 'softmax' or 'sigmoid'")
        check(self.precision in ("fp32", "fp16", "bf16"), f"precision={self.precision!r}: use fp32, fp16 or bf16")
        check(self.offload in ("none", "cpu"), f"offload={self.offload!r}: use 'none' or 'cpu'")
        check(self.zero_stage in (0, 1, 2, 3), f"zero_stage={self.zero_stage!r} must be 0, 1, 2 or 3")
        check(not (self.offload == "cpu" and self.zero_stage == 0), "offload='cpu' needs zero_stage >= 1")
        # inf / nan pass range comparisons (or fail them with a misleading message): a non-finite
        # field gets one line saying so and its range checks are skipped.
        finite = {}
        for name in ("lr", "eps", "weight_decay", "momentum", "min_lr", "grad_clip", "label_smoothing"):
            v = getattr(self, name)
            finite[name] = isinstance(v, int | float) and math.isfinite(v)
            check(finite[name], f"{name}={v!r} must be a finite number")
        if finite["lr"]:
            check(self.lr > 0, f"lr={self.lr} must be > 0")
        check(not finite["eps"] or self.eps > 0, f"eps={self.eps} must be > 0")
        check(not finite["momentum"] or 0 <= self.momentum < 1, f"momentum={self.momentum} must be in [0, 1)")
        if finite["lr"] and finite["min_lr"] and self.lr > 0:
            check(0 <= self.min_lr <= self.lr, f"min_lr={self.min_lr} must be in [0, lr={self.lr}]")
        check(not finite["weight_decay"] or self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        check(0 <= self.label_smoothing < 1, f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        check(
            self.label_smoothing == 0 or self.loss == "softmax",
            "label_smoothing only applies to loss='softmax'; set it to 0 for 'sigmoid'",
        )
        check(self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas={self.betas} must be two values in [0, 1)")
        check(
            isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps < max(self.total_steps, 1),
            f"warmup_steps={self.warmup_steps} must be in [0, total_steps={self.total_steps})",
        )
        for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 0, f"{name}={v!r} must be an int >= 0")
        check(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        check(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints} must be >= 1")
        check(self.max_bad_steps >= 1, f"max_bad_steps={self.max_bad_steps} must be >= 1")
        check(
            isinstance(self.io_timeout_s, (int, float)) and 0 < self.io_timeout_s < float("inf"),
            f"io_timeout_s={self.io_timeout_s!r} must be a finite number of seconds > 0",
        )
        check(isinstance(self.preempt_grace_s, (int, float)) and 0 < self.preempt_grace_s < float("inf"),
              f"preempt_grace_s={self.preempt_grace_s!r} must be a finite number of seconds > 0 (the platform's "
              "grace period minus a margin, e.g. 25 for Kubernetes' 30)")
        check(isinstance(self.hang_timeout_s, (int, float)) and 0 <= self.hang_timeout_s < float("inf"),
              f"hang_timeout_s={self.hang_timeout_s!r} must be a finite number of seconds >= 0 (0 disables the "
              "hang watchdog)")
        check(isinstance(self.compile, bool), f"compile={self.compile!r} must be True or False")
        check(isinstance(self.compile_backend, str) and self.compile_backend != "",
              f"compile_backend={self.compile_backend!r} must name a torch.compile backend, e.g. 'inductor'")
        if errors:
            raise ValueError("invalid TrainConfig:\n  " + "\n  ".join(errors))

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
        """Plain JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def hash_fields(self) -> dict[str, Any]:
        """The fields that must match to resume from a checkpoint (all but RESUMABLE_FIELDS)."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_FIELDS}

    def config_hash(self) -> str:
        """Short stable hash of `hash_fields()`; stored in every checkpoint."""
        blob = json.dumps(self.hash_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences `field: saved -> current`, ignoring RESUMABLE_FIELDS."""
    keys = sorted((set(saved) | set(current)) - RESUMABLE_FIELDS)
    return [
        f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
        for k in keys
        if saved.get(k, "<absent>") != current.get(k, "<absent>")
    ]
