"""Parameter groups (weight decay, layer-wise lr decay), optimizers and the learning-rate schedule."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from torch import nn

from training.config import TrainConfig

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDING = ("cls_token", "pos_embed", "patch_embed.", "dist_token", "mask_token", "rel_pos_bias.")


def vit_layer_id(name: str, num_layers: int) -> int:
    """The lr layer of parameter ``name`` of a ViT with ``num_layers - 1`` blocks (BEiT's and MAE's
    ``get_layer_id_for_vit``): the embeddings are layer 0, block i is layer i + 1, everything
    after the blocks (final norm, pooling norm, head) is layer ``num_layers``. A leading
    ``encoder.`` (an MAE / BEiT wrapper) is ignored."""
    bare = name.removeprefix("encoder.")
    if bare.startswith(_EMBEDDING):
        return 0
    m = _BLOCK.search(bare)
    return int(m.group(1)) + 1 if m else num_layers


def lr_layers(model: nn.Module) -> tuple[Callable[[str], int], int]:
    """(parameter name -> lr layer, the top layer: the head's) for layer-wise lr decay.

    A timm network (``model.zoo``): timm's own ``group_matcher`` grouping, which knows each
    architecture's stages (Swin's ``layers.i.blocks.j``, CaiT's class-attention blocks, PVT-v2's
    stages); our ViT (and an objective's wrapper with an ``encoder``): :func:`vit_layer_id`. Any
    other network is refused rather than guessed at: ViT naming would put a Swin's or a ResNet's
    blocks on the wrong layers without a word.
    """
    from model.zoo import is_timm_model, lr_layer_ids

    if is_timm_model(model):
        ids, top = lr_layer_ids(model)
        return ids.__getitem__, top
    blocks = getattr(model, "blocks", None) or getattr(getattr(model, "encoder", None), "blocks", None)
    if blocks is None:
        raise ValueError(f"layer-wise lr decay (train.optim.layer_decay) maps parameters to layers by our ViT's "
                         f"block names or a timm network's group_matcher; {type(model).__name__} has neither: set "
                         "train.optim.layer_decay=none")
    num_layers = len(blocks) + 1
    return (lambda name: vit_layer_id(name, num_layers)), num_layers


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Parameter groups: decayed weights, and no decay for ``model.no_weight_decay()`` names and
    1-d params (biases and norm scales never get weight decay, as in timm / big_vision; the
    model's own ``no_weight_decay()`` adds position embeddings and the class token).

    ``layer_decay`` (e.g. 0.65, MAE's fine-tuning of ViT-B; BEiT, ELECTRA): each group also gets
    ``lr_scale = layer_decay ** (top - layer_id)`` (:func:`lr_layers`), so the head trains at the
    full rate and each block below it at ``layer_decay`` times the one above; :func:`set_lr`
    applies the scale. None or 1.0: two groups, no scaling.
    """
    skip: set[str] = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    scaled = layer_decay is not None and layer_decay != 1.0
    layer_of, top = lr_layers(model) if scaled else ((lambda _name: 0), 0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = name in skip or p.ndim <= 1
        layer = layer_of(name)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay}
            if scaled:
                groups[key]["lr_scale"] = float(layer_decay ** (top - layer))  # type: ignore[operator]
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1]))]


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
    """Set ``lr`` (times the group's ``lr_scale``, layer-wise decay) on every param group
    (DeepSpeed's ZeRO wrappers share the torch groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


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
