"""Parameter groups, optimizers and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and no decay for `model.no_weight_decay()` names + 1-d params.

    Biases and norm scales (1-d) never get weight decay (as in timm / big_vision); the model's
    own `no_weight_decay()` adds position embeddings and the class token.
    """
    skip: set[str] = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip or p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: TrainConfig, groups: list[dict], device_type: str) -> torch.optim.Optimizer:
    """torch AdamW (decoupled decay, fused kernel on CPU and CUDA) or SGD with momentum (fine-tuning)."""
    if cfg.optimizer == "adamw":
        fused = cfg.offload == "none"  # one pass over memory; CPU fused kernels exist since torch 2.4
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer update number `step` (0-based).

    Linear warmup reaches `cfg.lr` exactly at update `warmup_steps - 1`; then linear (paper) or
    cosine decay reaches `min_lr` exactly at the last update, `total_steps - 1`. A pure function
    of the step, so a resumed run gets the same lr as an uninterrupted one.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.total_steps - cfg.warmup_steps, 1)
    progress = min(max((step + 1 - cfg.warmup_steps) / span, 0.0), 1.0)
    if cfg.decay == "cosine":
        frac = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        frac = 1.0 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * frac


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set `lr` on every param group (DeepSpeed's ZeRO wrappers share the torch groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
