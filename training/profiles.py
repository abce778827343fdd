"""Hardware profiles: per-device defaults for precision, ZeRO stage, micro batch and attention.

A profile only supplies defaults; a recipe overrides any of them by passing the path explicitly
to `from_profile` / `with_profile` (``**{"engine.zero_stage": 3}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from training.config import TrainConfig


@dataclass(frozen=True, kw_only=True)
class Profile:
    """Defaults for one device class.

    `sdpa` picks the scaled-dot-product-attention kernels the Trainer enables
    ("flash" = FlashAttention-2 + fallbacks, "mem_efficient" = xformers-style kernel without
    flash, which is what an sm75 T4 supports in fp16, "math" = reference, "auto" = torch default).
    """

    name: str
    precision: Literal["fp32", "fp16", "bf16"]
    zero_stage: int
    micro_batch: int
    grad_accum: int | None
    backend: Literal["gloo", "nccl"]
    sdpa: Literal["auto", "flash", "mem_efficient", "math"] = "auto"
    offload: Literal["none", "cpu"] = "none"
    activation_checkpointing: bool = False
    compile: bool = True  # torch.compile in the engine; off on CPU, where compiling costs more than it saves
    #: The device's memory in GB, for the launch checks' estimates (None: not checked, e.g. host RAM on CPU).
    memory_gb: float | None = None

    def train_overrides(self) -> dict[str, Any]:
        """The TrainConfig leaves this profile sets, by path."""
        return {
            "engine.precision": self.precision,
            "engine.zero_stage": self.zero_stage,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "engine.offload": self.offload,
            "engine.activation_checkpointing": self.activation_checkpointing,
            "engine.compile": self.compile,
            "profile": self.name,
        }


PROFILES: dict[str, Profile] = {
    # 2-core laptops and CI: fp32 (CPUs have no fast fp16/bf16 GEMM here), gloo.
    "cpu": Profile(name="cpu", precision="fp32", zero_stage=1, micro_batch=16, grad_accum=None, backend="gloo",
                   compile=False),
    # T4: no bf16, so fp16 with dynamic loss scaling; 16 GB -> ZeRO-2 and micro 32 x accum 4
    # (the T4 setting of the ViT notes); flash-attention-2 needs sm80, use the mem-efficient kernel.
    "t4": Profile(
        name="t4", precision="fp16", zero_stage=2, micro_batch=32, grad_accum=4, backend="nccl", sdpa="mem_efficient",
        memory_gb=16,
    ),
    # A100 80 GB (the 40 GB part runs the same profile; its runs see the estimate against 80).
    "a100": Profile(name="a100", precision="bf16", zero_stage=1, micro_batch=128, grad_accum=None, backend="nccl",
                    sdpa="flash", memory_gb=80),
    # H100 80 GB; an H200 (141 GB) is detected as this profile too, and checked against 80.
    "h100": Profile(name="h100", precision="bf16", zero_stage=1, micro_batch=256, grad_accum=None, backend="nccl",
                    sdpa="flash", memory_gb=80),
}


def detect_profile_name() -> str:
    """'cpu' without CUDA, else the profile matching the GPU name (unknown GPUs -> 'a100')."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).upper()
    for key in ("T4", "A100", "H100", "H200"):
        if key in name:
            return "h100" if key == "H200" else key.lower()
    major, _ = torch.cuda.get_device_capability(0)
    return "a100" if major >= 8 else "t4"


def get_profile(name: str = "auto") -> Profile:
    """The profile called `name` ('auto' detects the local device)."""
    key = detect_profile_name() if name == "auto" else name
    if key not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {['auto', *PROFILES]}")
    return PROFILES[key]


def with_profile(cfg: TrainConfig, name: str = "auto", **paths: Any) -> TrainConfig:
    """`cfg` with the profile's defaults applied, then `paths` (which win), e.g.
    ``with_profile(cfg, "t4", **{"engine.zero_stage": 3})``."""
    fields = get_profile(name).train_overrides()
    fields.update(paths)
    return cfg.replace(**fields)


def from_profile(name: str = "auto", **paths: Any) -> TrainConfig:
    """A TrainConfig with the profile's defaults, overridden by `paths` (a recipe's choices).

    Example: ``from_profile("t4", global_batch=4096, **{"optim.lr": 1e-3})`` -> fp16, ZeRO-2,
    micro 32. If you give global_batch but not grad_accum, accumulation is re-derived from the
    world size.
    """
    defaults = get_profile(name).train_overrides()
    if "global_batch" in paths and "grad_accum" not in paths:
        defaults["grad_accum"] = None
    defaults.update(paths)
    if "global_batch" not in defaults:
        accum = defaults.get("grad_accum") or 1
        defaults["global_batch"] = defaults["micro_batch"] * accum
    return TrainConfig().replace(**defaults)


def set_sdpa(kind: str) -> None:
    """Enable the attention kernels a profile's ``sdpa`` asks for (CUDA only)."""
    if not torch.cuda.is_available() or kind == "auto":
        return
    torch.backends.cuda.enable_flash_sdp(kind == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(kind in ("flash", "mem_efficient"))
    torch.backends.cuda.enable_math_sdp(True)
