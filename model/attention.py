"""Whole-network attention maps from ``VisionTransformer.forward_with_attention`` (or, for timm's
networks with a class token, ``model.zoo_attention``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def forward_with_attention(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``(logits, per-layer (B, heads, N, N) attention)`` of our ViT or a timm DeiT / CaiT / BEiT
    (ValueError for a network without a global class token)."""
    if hasattr(model, "forward_with_attention"):
        return model.forward_with_attention(x)
    from .zoo_attention import timm_forward_with_attention

    return timm_forward_with_attention(model, x)


def attention_grid(model: nn.Module) -> tuple[int, int]:
    """The patch grid (gh, gw) the attention maps are drawn on."""
    return tuple(model.cfg.grid)  # type: ignore[return-value]


def attention_rollout(attns: list[Tensor], discard_ratio: float = 0.0) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020): how much each output token draws on each input.

    For each layer, average the heads, optionally zero the lowest ``discard_ratio`` of
    each row's weights (never the diagonal), add the identity for the residual path,
    renormalise the rows, and multiply the layers together (first layer rightmost).

    Args:
        attns: per layer (B, heads, N, N) attention probabilities (rows sum to 1).
        discard_ratio: fraction in [0, 1) of the smallest weights per row to drop.

    Returns:
        (B, N, N) float32, rows summing to 1; row 0 is the class token's map for ``pool="cls"``.
    """
    if not attns:
        raise ValueError("attention_rollout needs at least one layer's attention")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    B, _, N, _ = attns[0].shape
    eye = torch.eye(N, device=attns[0].device, dtype=torch.float32)
    result = eye.expand(B, N, N)
    for a in attns:
        a = a.float().mean(dim=1)  # (B, N, N)
        if discard_ratio > 0:
            k = int(N * discard_ratio)
            if k:
                low = a.topk(k, dim=-1, largest=False).indices  # (B, N, k)
                keep = torch.ones_like(a).scatter_(-1, low, 0.0)
                keep = torch.maximum(keep, eye)  # a token always keeps its own weight
                a = a * keep
        a = a + eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result


def cls_attention_maps(attns: list[Tensor], grid: tuple[int, int]) -> Tensor:
    """Per-layer, per-head attention of the class token to each patch, as images.

    Args:
        attns: per layer (B, heads, N, N), with N = gh*gw + k (class token first, then k - 1
            other prefix tokens such as DeiT's distillation token) or N = gh*gw
            (``pool="gap"``: there is no class token, so the mean over all query tokens is
            used instead).
        grid: (gh, gw) patch grid, e.g. ``model.cfg.grid``.

    Returns:
        (L, B, heads, gh, gw) float32.
    """
    gh, gw = grid
    maps = []
    for a in attns:
        B, H, N, _ = a.shape
        if N > gh * gw:
            m = a[:, :, 0, N - gh * gw:]  # (B, heads, gh*gw): the class token's row over the patches
        elif N == gh * gw:
            m = a.mean(dim=2)
        else:
            raise ValueError(f"attention over {N} tokens does not match grid {grid} ({gh * gw} patches [+ prefix])")
        maps.append(m.float().reshape(B, H, gh, gw))
    return torch.stack(maps)
