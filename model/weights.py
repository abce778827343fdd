"""Weights interop: timm state dicts, position-embedding resampling, safetensors files.

Our parameter names equal timm's ``VisionTransformer`` for the common configuration
(``pool="cls"``, ``posemb="learn"``, no representation layer), so the conversions below are
mostly validation: they refuse the timm features we do not implement instead of silently
dropping weights. Two layouts need care:

* ``posemb="sincos2d"``: our fixed (1, N_patches, D) buffer is saved as ``pos_embed``; the
  equivalent timm model is built with ``no_embed_class=True`` (see ``timm_kwargs``).
* ``representation_size``: the paper's tanh pre-logits layer is ``pre_logits.fc`` (the name
  used by timm < 0.6 and the JAX-converted checkpoints); timm >= 0.6 has no such layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vit import VisionTransformer, ViTConfig

StateDict = dict[str, Tensor]

# timm features with parameters that have no counterpart here (layer scale, registers,
# qk-norm, post-pool fc_norm, attention pooling, pre-encoder norm).
_UNSUPPORTED_TIMM = (
    ("reg_token", "register tokens"),
    ("norm_pre.", "a pre-encoder norm (pre_norm=True, CLIP style)"),
    ("fc_norm.", "a norm after pooling (timm's global_pool='avg' default; ours normalises before pooling, "
                 "as big_vision: build the timm model with fc_norm=False)"),
    ("attn_pool.", "attention pooling (MAP head)"),
    (".ls1.", "layer scale"),
    (".ls2.", "layer scale"),
    (".q_norm.", "qk-norm"),
    (".k_norm.", "qk-norm"),
    (".attn.norm.", "attention scale-norm"),
    (".mlp.norm.", "MLP scale-norm"),
)


def _strip_wrappers(sd: Mapping[str, Tensor]) -> StateDict:
    """Drop the ``module.`` (DDP/DeepSpeed) and ``_orig_mod.`` (torch.compile) prefixes."""
    out = {}
    for k, v in sd.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def from_timm_state_dict(sd: Mapping[str, Tensor]) -> StateDict:
    """A timm ``VisionTransformer`` state dict -> ours (a new dict; tensors are shared).

    Also accepts our own state dicts (the mapping is idempotent).

    Raises:
        ValueError: the checkpoint uses a timm feature this model lacks; names the keys.
    """
    sd = _strip_wrappers(sd)
    bad = {}
    for k in sd:
        key = "." + k
        for pattern, what in _UNSUPPORTED_TIMM:
            if key.startswith("." + pattern) or pattern in key:
                bad.setdefault(what, []).append(k)
    if bad:
        lines = "; ".join(f"{what}: {keys[:4]}{' ...' if len(keys) > 4 else ''}" for what, keys in bad.items())
        raise ValueError(f"timm checkpoint uses features model.VisionTransformer does not implement: {lines}")
    return dict(sd)


def to_timm_state_dict(our_sd: Mapping[str, Tensor], *, drop_pre_logits: bool = False) -> StateDict:
    """Our state dict -> timm ``VisionTransformer`` layout (build it with ``timm_kwargs(cfg)``).

    Raises:
        ValueError: the state dict has a representation layer (``pre_logits.fc.*``), which
            timm >= 0.6 lacks, and ``drop_pre_logits`` is False. Dropping it (as timm's own
            ``checkpoint_filter_fn`` does) changes the function, so the head needs fine-tuning.
    """
    sd = _strip_wrappers(our_sd)
    pre = [k for k in sd if k.startswith("pre_logits.")]
    if pre and not drop_pre_logits:
        raise ValueError(
            f"state dict has a representation layer {pre}; timm >= 0.6 VisionTransformer has none. "
            "Pass drop_pre_logits=True to drop it (then fine-tune the head), or keep our model."
        )
    return {k: v for k, v in sd.items() if not k.startswith("pre_logits.")}


def timm_kwargs(cfg: ViTConfig) -> dict[str, Any]:
    """Keyword arguments for ``timm.models.vision_transformer.VisionTransformer`` that build a
    network computing the same function as ``VisionTransformer(cfg)`` (and loading
    ``to_timm_state_dict`` of its weights). Dropout rates are mapped too.

    Raises:
        ValueError: ``cfg.representation_size`` is set (timm >= 0.6 has no such layer).
    """
    if cfg.representation_size:
        raise ValueError("timm >= 0.6 has no representation layer; use representation_size=None")
    return dict(
        img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
        embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_dim / cfg.width,
        qkv_bias=cfg.qkv_bias, class_token=cfg.pool == "cls", global_pool="token" if cfg.pool == "cls" else "avg",
        fc_norm=False, no_embed_class=cfg.posemb == "sincos2d", proj_drop_rate=cfg.dropout,
        pos_drop_rate=cfg.dropout, attn_drop_rate=cfg.attention_dropout, drop_path_rate=cfg.drop_path,
    )


def resample_pos_embed(
    posemb: Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    *,
    old_grid: tuple[int, int] | None = None,
) -> Tensor:
    """Resize a position embedding (B, n_prefix + g0*g1, D) to a new patch grid.

    The prefix (class token) rows are kept as they are; the grid rows are resampled
    bicubically as a 2-D image (align_corners=False, antialiased when shrinking), computed
    in float32 and returned in the input dtype. The paper's recipe for fine-tuning at a
    higher resolution. ``old_grid`` defaults to the square grid implied by the length.
    Same grid -> an unchanged copy.
    """
    if posemb.ndim != 3:
        raise ValueError(f"pos_embed must be (1, n_prefix + g0*g1, D), got shape {tuple(posemb.shape)}")
    B, T, D = posemb.shape
    n = T - num_prefix_tokens
    if old_grid is None:
        g = math.isqrt(max(n, 0))
        if g * g != n:
            raise ValueError(
                f"pos_embed of shape {tuple(posemb.shape)} with {num_prefix_tokens} prefix token(s) has {n} grid "
                "positions, not a square; pass old_grid=(gh, gw)"
            )
        old_grid = (g, g)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"old_grid {old_grid} has {old_grid[0] * old_grid[1]} positions, pos_embed has {n}")
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if tuple(old_grid) == new_grid:
        return posemb.clone()
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    img = grid.float().reshape(B, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)  # (B, D, g0, g1)
    shrink = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
    img = F.interpolate(img, size=new_grid, mode="bicubic", align_corners=False, antialias=shrink)
    grid = img.permute(0, 2, 3, 1).reshape(B, new_grid[0] * new_grid[1], D).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1)


def save_weights(
    model_or_sd: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a state dict to a ``.safetensors`` file (tensors moved to CPU, made contiguous).

    For a ``VisionTransformer`` the config is stored in the metadata as JSON under
    ``"vitscale.config"`` (read it back with ``read_config``).
    """
    from safetensors.torch import save_file

    meta = dict(metadata or {})
    bad = {k: type(v).__name__ for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ValueError(f"safetensors metadata must map str -> str; offending keys/value types: {bad}")
    if isinstance(model_or_sd, nn.Module):
        cfg = getattr(model_or_sd, "cfg", None)
        if isinstance(cfg, ViTConfig):
            meta.setdefault("vitscale.config", json.dumps(dataclasses.asdict(cfg)))
        sd: Mapping[str, Tensor] = model_or_sd.state_dict()
    else:
        sd = model_or_sd
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _strip_wrappers(sd).items()}
    save_file(tensors, os.fspath(path), metadata=meta or None)


def read_config(path: str | os.PathLike[str]) -> ViTConfig | None:
    """The ``ViTConfig`` stored by ``save_weights`` in a safetensors file, or None."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("vitscale.config")
    return ViTConfig(**json.loads(raw)) if raw else None


def _needs_resample(src: Tensor, want: Tensor) -> bool:
    """Same width, another token count: a grid change. A width change is a plain mismatch."""
    return src.ndim == 3 and src.shape[-1] == want.shape[-1] and src.shape[1] != want.shape[1]


def load_weights(
    model: VisionTransformer,
    path_or_sd: str | os.PathLike[str] | Mapping[str, Tensor],
    *,
    strict: bool = True,
    ignore_head: bool = False,
) -> VisionTransformer:
    """Load a checkpoint (safetensors path or state dict, ours or timm's) into ``model``.

    * A learnt position embedding trained on another grid is resampled
      (``resample_pos_embed``), so a 224 checkpoint loads into a 384 model. A
      ``posemb="sincos2d"`` model always keeps its own fixed buffer.
    * ``ignore_head=True`` keeps the model's (fresh) head and skips the checkpoint's
      ``head.*`` (and ``pre_logits.*`` when the model has no representation layer): the
      paper's fine-tuning recipe.
    * ``strict=False`` tolerates missing / unexpected keys, never mismatched shapes.

    Returns ``model`` (loaded in place; tensors are cast to its dtype and device).

    Raises:
        ValueError: a shape mismatch (names the tensor and both shapes), or with ``strict``
            missing / unexpected keys.
    """
    if isinstance(path_or_sd, Mapping):
        sd = dict(path_or_sd)
    else:
        from safetensors.torch import load_file

        sd = load_file(os.fspath(path_or_sd), device="cpu")
    sd = from_timm_state_dict(sd)
    cfg = model.cfg
    own = model.state_dict()
    skip_own: set[str] = set()

    if ignore_head:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        skip_own |= {k for k in own if k.startswith("head.")}
        if not cfg.representation_size:
            sd = {k: v for k, v in sd.items() if not k.startswith("pre_logits.")}
        else:
            skip_own |= {k for k in own if k.startswith("pre_logits.") and k not in sd}

    if cfg.posemb == "sincos2d":
        sd.pop("pos_embed", None)  # a fixed function of the grid: recomputed, never loaded
        skip_own.add("pos_embed")
    elif "pos_embed" in sd and _needs_resample(sd["pos_embed"], own["pos_embed"]):
        src, want = sd["pos_embed"], own["pos_embed"]
        try:
            sd["pos_embed"] = resample_pos_embed(src, cfg.grid, cfg.num_prefix_tokens)
        except ValueError as e:
            raise ValueError(
                f"pos_embed: checkpoint has shape {tuple(src.shape)}, model expects {tuple(want.shape)} and the "
                f"checkpoint's grid cannot be resampled: {e}"
            ) from e

    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]  # model order
    if bad:
        hints = []
        if any(k.startswith("head.") for k in bad):
            hints.append("the head differs (class count or representation_size): pass ignore_head=True to fine-tune "
                         "with a new head")
        if any(k.startswith("patch_embed.") for k in bad):
            hints.append("the patch size, width or input channels differ: build the model the checkpoint came from")
        lines = "; ".join(
            f"{k}: checkpoint has shape {tuple(sd[k].shape)}, model expects {tuple(own[k].shape)}" for k in bad[:6]
        )
        more = f" (+{len(bad) - 6} more)" if len(bad) > 6 else ""
        raise ValueError(f"{lines}{more}" + "".join(f"; {h}" for h in hints))
    missing = sorted(set(own) - set(sd) - skip_own)
    unexpected = sorted(set(sd) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(
            f"checkpoint does not match the model: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
            f"(model {cfg.variant or 'ViT'}; pass strict=False to load the rest)"
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return model
