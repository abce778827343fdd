"""Weights of timm networks: state dicts and safetensors files checked against the model before a
tensor is read, and resized for another resolution with timm's own helpers.

The state dict of a zoo network is timm's own (our networks *are* timm's modules), so a timm
checkpoint converted to safetensors loads as it is. Another resolution changes two kinds of
tensors, both resized only with ``allow_resample`` (``finetune.py`` asks for it for its
``--image-size``):

* absolute position embeddings (DeiT, CaiT, BEiT): ``timm.layers.resample_abs_pos_embed``, the
  class / distillation tokens' rows kept;
* relative position bias tables (Swin's windows, BEiT's): ``timm.layers.resize_rel_pos_bias_table``
  to the window each attention layer has at the new size (what timm's ``checkpoint_filter_fn``
  of Swin and BEiT do).

PVT-v2 (overlapping convolutional patches, no position embedding) and the convnets have nothing
that depends on the resolution. Anything else that differs is refused, naming the tensors.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .weights import TensorSpec, _bare_name, _spec, check_casts, physical_memory_bytes, read_header
from .zoo import TimmConfig, create_timm_model

log = logging.getLogger(__name__)

_REL_BIAS = "relative_position_bias_table"


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """``("head.",)``, Swin's ``("head.fc.",)``, a ResNet's ``("fc.",)``, distilled DeiT's two heads."""
    clf = model.get_classifier()
    mods = clf if isinstance(clf, tuple) else (clf,)
    names = {id(m): n for n, m in model.named_modules()}
    return tuple(f"{names[id(m)]}." for m in mods if id(m) in names and names[id(m)])


def _meta_model(cfg: TimmConfig) -> nn.Module:
    with torch.device("meta"):
        return create_timm_model(cfg)


def expected_specs(cfg: TimmConfig) -> dict[str, TensorSpec]:
    """The state dict ``create_timm_model(cfg)`` would have, built on the meta device."""
    return {k: _spec(v) for k, v in _meta_model(cfg).state_dict().items()}


class _Plan(NamedTuple):
    keys: dict[str, str]  # model key -> the checkpoint's key
    resize: list[str]  # model keys to resize (position embeddings, relative bias tables)
    casts: dict[str, list[str]]


def _resizable(key: str, have: TensorSpec, want: TensorSpec) -> bool:
    if key == "pos_embed":
        return len(have.shape) == len(want.shape) == 3 and have.shape[-1] == want.shape[-1]
    if key.endswith(_REL_BIAS):
        return len(have.shape) == len(want.shape) == 2 and have.shape[-1] == want.shape[-1]
    return False


def _plan(src: Mapping[str, TensorSpec], own: Mapping[str, TensorSpec], cfg: TimmConfig, heads: tuple[str, ...], *,
          strict: bool, ignore_head: bool, allow_resample: bool, allow_cast: bool) -> _Plan:
    names = {_bare_name(k): k for k in src}
    own = {k: v for k, v in own.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    names = {k: v for k, v in names.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    skip: set[str] = set()
    if ignore_head:
        names = {k: v for k, v in names.items() if not k.startswith(heads)}
        skip = {k for k in own if k.startswith(heads)}
    differ = [k for k in own if k in names and src[names[k]].shape != own[k].shape]
    resize = [k for k in differ if _resizable(k, src[names[k]], own[k])]
    if resize and not allow_resample:
        lines = "; ".join(f"{k}: checkpoint {src[names[k]].shape}, model {own[k].shape}" for k in resize[:4])
        raise ValueError(f"{lines}: the checkpoint is for another resolution or window size than {cfg.name} at "
                         f"image_size {cfg.image_size}; pass allow_resample=True (finetune.py does, for its "
                         "--image-size) to resize position embeddings / relative position bias tables")
    bad = [k for k in differ if k not in resize]
    if bad:
        hint = (" (the head differs: pass ignore_head=True to fine-tune with a new head)"
                if any(k.startswith(heads) for k in bad) else " (build the architecture the checkpoint came from)")
        lines = "; ".join(f"{k}: checkpoint has shape {src[names[k]].shape}, model expects {own[k].shape}"
                          for k in bad[:6])
        raise ValueError(f"{lines}{f' (+{len(bad) - 6} more)' if len(bad) > 6 else ''}{hint}")
    casts = check_casts(own, src, names, allow_cast)
    missing = sorted(set(own) - set(names) - skip)
    unexpected = sorted(set(names) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint does not match timm's {cfg.name} with {cfg.shape_kwargs()}: missing "
                         f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} (pass strict=False to load the rest)")
    return _Plan({k: names[k] for k in own if k in names}, resize, casts)


def check_timm_file(path: str | os.PathLike[str], cfg: TimmConfig, *, max_bytes: int | None = None,
                    allow_resample: bool = False, allow_cast: bool = False) -> None:
    """A safetensors file against the network ``cfg`` declares, from its header alone (before the
    network is allocated): every tensor present with the model's shape (or a resizable one with
    ``allow_resample``), and the network within ``max_bytes`` (default: this machine's RAM)."""
    specs, _ = read_header(path)
    meta = _meta_model(cfg)
    own = {k: _spec(v) for k, v in meta.state_dict().items()}
    try:
        _plan(specs, own, cfg, head_prefixes(meta), strict=True, ignore_head=False, allow_resample=allow_resample,
              allow_cast=allow_cast)
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)}: the tensors do not match the config stored with them ({cfg.name}, "
                         f"image_size {cfg.image_size}): {e}") from e
    need = sum(s.numel for s in own.values()) * 4
    limit = max_bytes if max_bytes is not None else physical_memory_bytes()
    if limit is not None and need > limit:
        raise ValueError(f"{os.fspath(path)}: the model needs {need / 2**30:.1f} GiB, more than the "
                         f"{limit / 2**30:.1f} GiB allowed (this machine's memory); load it on a bigger machine")


def _resized(model: nn.Module, key: str, v: Tensor, want: torch.Size) -> Tensor:
    from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

    if key == "pos_embed":
        gh, gw = (int(g) for g in model.patch_embed.grid_size)
        prefix = want[1] - gh * gw  # class / distillation tokens inside pos_embed (0: CaiT, no_embed_class)
        n = v.shape[1] - prefix
        g = math.isqrt(max(n, 0))
        if prefix < 0 or g * g != n:
            raise ValueError(f"pos_embed {tuple(v.shape)} with {prefix} prefix token(s) is not a square patch grid; "
                             "cannot resample it")
        out = resample_abs_pos_embed(v.float(), new_size=[gh, gw], old_size=[g, g], num_prefix_tokens=prefix)
        log.info("resampled pos_embed from a %dx%d to a %dx%d patch grid (allow_resample)", g, g, gh, gw)
        return out.to(v.dtype)
    m = model.get_submodule(key[: -len(_REL_BIAS) - 1])
    out = resize_rel_pos_bias_table(v.float(), new_window_size=tuple(m.window_size), new_bias_shape=tuple(want))
    log.info("resized %s from %s to %s (allow_resample)", key, tuple(v.shape), tuple(want))
    return out.to(v.dtype)


def load_timm_weights(model: nn.Module, path_or_sd: str | os.PathLike[str] | Mapping[str, Tensor], *,
                      strict: bool = True, ignore_head: bool = False, allow_resample: bool = False,
                      allow_cast: bool = False) -> nn.Module:
    """Load a state dict or safetensors file (timm's layout) into the timm network ``model``.

    The same contract as ``model.weights.load_weights``: checked from shapes and dtypes first;
    ``ignore_head`` keeps the network's fresh classifier; ``allow_resample`` resizes position
    embeddings and relative position bias tables to the network's resolution and windows;
    ``allow_cast`` casts non-floating tensors. Returns ``model`` (loaded in place).
    """
    cfg: TimmConfig = model.cfg
    own_sd = model.state_dict()
    own = {k: _spec(v) for k, v in own_sd.items()}
    kw = dict(strict=strict, ignore_head=ignore_head, allow_resample=allow_resample, allow_cast=allow_cast)
    heads = head_prefixes(model)
    if isinstance(path_or_sd, Mapping):
        plan = _plan({k: _spec(v) for k, v in path_or_sd.items()}, own, cfg, heads, **kw)
        sd = {k: path_or_sd[src] for k, src in plan.keys.items()}
    else:
        from safetensors import safe_open

        plan = _plan(read_header(path_or_sd)[0], own, cfg, heads, **kw)
        with safe_open(os.fspath(path_or_sd), framework="pt") as f:
            sd = {k: f.get_tensor(src) for k, src in plan.keys.items()}
    for k in plan.resize:
        sd[k] = _resized(model, k, sd[k], own_sd[k].shape)
    for what, keys in plan.casts.items():
        log.warning("load_timm_weights: cast %d tensor(s) %s (allow_cast): %s", len(keys), what, keys[:4])
    model.load_state_dict(sd, strict=False)
    return model
