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
    if cfg.optim.name == "adamw":
        fused = cfg.engine.offload == "none"  # one pass over memory; CPU fused kernels exist since torch 2.4
        return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, fused=fused)
    return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer update number `step` (0-based).

    Linear warmup reaches `cfg.optim.lr` exactly at update `warmup_steps - 1`; then linear (paper) or
    cosine decay reaches `min_lr` exactly at the last update, `total_steps - 1`. A pure function
    of the step, so a resumed run gets the same lr as an uninterrupted one.
    """
    if step < cfg.schedule.warmup_steps:
        return cfg.optim.lr * (step + 1) / cfg.schedule.warmup_steps
    span = max(cfg.schedule.total_steps - cfg.schedule.warmup_steps, 1)
    progress = min(max((step + 1 - cfg.schedule.warmup_steps) / span, 0.0), 1.0)
    if cfg.schedule.decay == "cosine":
        frac = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        frac = 1.0 - progress
    return cfg.schedule.min_lr + (cfg.optim.lr - cfg.schedule.min_lr) * frac


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set `lr` on every param group (DeepSpeed's ZeRO wrappers share the torch groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def drop_repeated_norm_checks(ds_optimizer: object) -> bool:
    """Make DeepSpeed's ZeRO-1/2 optimizer clip gradients without re-reading the norm on the host.

    DeepSpeed 0.19's `DeepSpeedZeroOptimizer.step` checks the global gradient norm once (the
    overflow check: a skipped step when it is NaN/Inf), then `unscale_and_clip_grads` checks
    the same norm again with `bool()` for every parameter group, after the previous group's
    update was launched: on a GPU each is a stall, two more per step for a ViT's two groups.
    This replaces that method on this instance only with the same arithmetic, the repeated
    check made on the device (`torch.where`). Returns False (and changes nothing) for any
    other optimizer class or a DeepSpeed whose method no longer has this signature.
    """
    import inspect

    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if type(ds_optimizer) is not DeepSpeedZeroOptimizer:
        return False
    opt: DeepSpeedZeroOptimizer = ds_optimizer
    if list(inspect.signature(opt.unscale_and_clip_grads).parameters) != ["grad_groups_flat", "total_norm"]:
        return False

    def unscale_and_clip_grads(grad_groups_flat: list, total_norm: torch.Tensor | float) -> None:
        if opt.clip_grad == 0.0 and opt.loss_scale == 1.0:
            return
        combined_scale: torch.Tensor | float = opt.loss_scale
        if opt.clip_grad > 0.0:
            norm = torch.as_tensor(total_norm, dtype=torch.float, device=opt.device)
            # An invalid norm (NaN/Inf, or DeepSpeed's -1 sentinel) clips as an infinite one.
            norm = torch.where(torch.isfinite(norm) & (norm >= 0), norm, torch.full_like(norm, float("inf")))
            clip = torch.clamp(((norm / opt.loss_scale) + 1e-6) / opt.clip_grad, min=1.0)
            combined_scale = clip * opt.loss_scale
        for grad in grad_groups_flat:
            for g in grad if isinstance(grad, list) else [grad]:
                g.data.mul_(1.0 / combined_scale)

    opt.unscale_and_clip_grads = unscale_and_clip_grads  # type: ignore[method-assign]
    return True
