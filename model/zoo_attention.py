"""Attention maps of timm networks with a global class token: DeiT, CaiT (its class-attention
layers) and BEiT, in the layout of ``VisionTransformer.forward_with_attention``.

timm computes attention with fused kernels that never materialise the probabilities. For the
duration of one forward the attention modules are switched to their explicit path
(``fused_attn = False``, a switch timm keeps on every attention module) and the probabilities
are read as the input of their ``attn_drop`` (the dropout applied right after the softmax).
Those are timm internals, so the result is self-checked (docs/design.md, convention 15): every
layer must report exactly once, over the expected number of tokens, with rows summing to 1;
otherwise the error says which timm changed it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .zoo import TESTED_TIMM, TimmConfig


def _layers(model: nn.Module, cfg: TimmConfig) -> list[nn.Module]:
    """The attention modules whose class-token row the maps show, first layer first."""
    if cfg.family.key == "cait":  # the class token exists only in the class-attention layers
        return [b.attn for b in model.blocks_token_only]
    return [b.attn for b in model.blocks]


@torch.no_grad()
def timm_forward_with_attention(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``(logits (B, C), per layer (B, heads, N, N) attention)`` with N = prefix tokens + patches.

    DeiT and BEiT: every block's self-attention. CaiT: its class-attention layers, where only the
    class token queries ([cls, patches] keys); their rows of the patch tokens are the identity
    (patches pass those layers unchanged), so the rollout through them is the class token's.
    ValueError for an architecture without a global class token (Swin, PVT-v2, convnets).
    """
    cfg: TimmConfig = model.cfg
    if not (cfg.family.class_token and cfg.class_token):
        raise ValueError(f"attention maps and rollout need a global class token; {cfg.name} ({cfg.family.title}) "
                         "has none (they are drawn for DeiT, CaiT and BEiT)")
    layers = _layers(model, cfg)
    seen: dict[int, list[Tensor]] = {i: [] for i in range(len(layers))}
    hooks: list[Any] = []
    fused = [(a, getattr(a, "fused_attn", None)) for a in layers]
    try:
        for i, a in enumerate(layers):
            if hasattr(a, "fused_attn"):
                a.fused_attn = False
            drop = getattr(a, "attn_drop", None)
            if drop is not None:
                hooks.append(drop.register_forward_hook(lambda _m, inp, _out, i=i: seen[i].append(inp[0].detach())))
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
        for a, f in fused:
            if f is not None:
                a.fused_attn = f
    gh, gw = cfg.grid
    n = cfg.num_prefix_tokens + gh * gw
    out = []
    for i, got in seen.items():
        a = got[0].float() if len(got) == 1 else None
        ok = a is not None and a.ndim == 4 and a.shape[-1] == n and a.shape[-2] in (1, n)
        ok = ok and bool(torch.allclose(a.sum(-1), torch.ones((), device=a.device), atol=1e-3))  # type: ignore[union-attr]
        if not ok:
            raise RuntimeError(
                f"{cfg.name}: attention layer {i} did not report its probabilities as expected (got "
                f"{[tuple(t.shape) for t in got]}, want (B, heads, 1 or {n}, {n}) rows summing to 1); timm "
                f"{cfg.timm_version or '?'} differs from the tested timm {TESTED_TIMM} here, so no attention maps")
        if a.shape[-2] == 1:  # class attention: the class token's row; the patches' rows are the identity
            full = torch.eye(n, device=a.device).expand(a.shape[0], a.shape[1], n, n).clone()
            full[:, :, :1] = a
            a = full
        out.append(a)
    return logits, out
