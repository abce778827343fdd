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
import logging
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vit import VisionTransformer, ViTConfig

StateDict = dict[str, Tensor]
log = logging.getLogger(__name__)

# timm features with parameters that have no counterpart here (layer scale, registers,
# qk-norm, attention pooling, pre-encoder norm).
_UNSUPPORTED_TIMM = (
    ("reg_token", "register tokens"),
    ("norm_pre.", "a pre-encoder norm (pre_norm=True, CLIP style)"),
    ("attn_pool.", "attention pooling (MAP head)"),
    (".ls1.", "layer scale"),
    (".ls2.", "layer scale"),
    (".q_norm.", "qk-norm"),
    (".k_norm.", "qk-norm"),
    (".attn.norm.", "attention scale-norm"),
    (".mlp.norm.", "MLP scale-norm"),
)


def _bare_name(k: str) -> str:
    """``k`` without the ``module.`` (DDP/DeepSpeed) and ``_orig_mod.`` (torch.compile) prefixes."""
    for p in ("module.", "_orig_mod."):
        while k.startswith(p):
            k = k[len(p):]
    return k


def _strip_wrappers(sd: Mapping[str, Tensor]) -> StateDict:
    """Drop the wrapper prefixes (``_bare_name``) from every key."""
    return {_bare_name(k): v for k, v in sd.items()}


def from_timm_state_dict(sd: Mapping[str, Tensor]) -> StateDict:
    """A timm ``VisionTransformer`` state dict -> ours (a new dict; tensors are shared).

    Also accepts our own state dicts (the mapping is idempotent).

    Raises:
        ValueError: the checkpoint uses a timm feature this model lacks; names the keys.
    """
    sd = _strip_wrappers(sd)
    _refuse_unsupported_timm(sd)
    return dict(sd)


def _refuse_unsupported_timm(names: Mapping[str, Any]) -> None:
    bad: dict[str, list[str]] = {}
    for k in names:
        key = "." + k
        for pattern, what in _UNSUPPORTED_TIMM:
            if key.startswith("." + pattern) or pattern in key:
                bad.setdefault(what, []).append(k)
    if bad:
        lines = "; ".join(f"{what}: {keys[:4]}{' ...' if len(keys) > 4 else ''}" for what, keys in bad.items())
        raise ValueError(f"timm checkpoint uses features model.VisionTransformer does not implement: {lines}")


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

    A distilled config (``cfg.distilled``) maps to ``timm.models.deit.VisionTransformerDistilled``
    with the same arguments.

    Raises:
        ValueError: ``cfg.representation_size`` is set (timm >= 0.6 has no such layer).
    """
    if cfg.representation_size:
        raise ValueError("timm >= 0.6 has no representation layer; use representation_size=None")
    return dict(
        img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
        embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_dim / cfg.width,
        qkv_bias=cfg.qkv_bias, class_token=cfg.class_token, global_pool="token" if cfg.pool == "cls" else "avg",
        fc_norm=cfg.pool == "avg", no_embed_class=cfg.posemb == "sincos2d", proj_drop_rate=cfg.dropout,
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

    For a ``VisionTransformer`` (or a zoo network) the config is stored in the metadata as JSON
    under ``"vitscale.config"`` (read it back with ``read_config`` / ``network.config_from_dict``).
    """
    from safetensors.torch import save_file

    meta = dict(metadata or {})
    bad = {k: type(v).__name__ for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ValueError(f"safetensors metadata must map str -> str; offending keys/value types: {bad}")
    if isinstance(model_or_sd, nn.Module):
        cfg = getattr(model_or_sd, "cfg", None)
        if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):  # a ViTConfig or a zoo TimmConfig
            meta.setdefault("vitscale.config", json.dumps(dataclasses.asdict(cfg)))
        sd: Mapping[str, Tensor] = model_or_sd.state_dict()
    else:
        sd = model_or_sd
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _strip_wrappers(sd).items()}
    save_file(tensors, os.fspath(path), metadata=meta or None)


def read_config(path: str | os.PathLike[str]) -> ViTConfig | None:
    """The ``ViTConfig`` stored by ``save_weights`` in a safetensors file, or None."""
    return _config_of(read_header(path)[1], os.fspath(path))


class TensorSpec(NamedTuple):
    """A tensor's shape and dtype name (torch's spelling: ``float32``, ``int8``), without its data."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def floating(self) -> bool:
        return self.dtype.startswith(("float", "bfloat"))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# safetensors' dtype names -> torch's (the header spells them like Rust).
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
              "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
              "BOOL": "bool"}


def _spec(t: Tensor) -> TensorSpec:
    return TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."))


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """(tensor name -> shape/dtype, metadata) of a safetensors file, from its header alone.

    No tensor data is read or allocated; safetensors refuses a header whose offsets do not fit
    the file, so the shapes here describe bytes that are really there.
    """
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        specs = {}
        for k in f.keys():
            sl = f.get_slice(k)
            raw = sl.get_dtype()
            specs[k] = TensorSpec(tuple(int(d) for d in sl.get_shape()), _ST_DTYPES.get(raw, raw.lower()))
        return specs, dict(f.metadata() or {})


def _config_of(meta: Mapping[str, str], where: str) -> ViTConfig | None:
    raw = meta.get("vitscale.config")
    if not raw:
        return None
    try:
        return ViTConfig(**json.loads(raw))
    except (TypeError, ValueError) as e:  # unknown field, wrong type, invalid combination
        raise ValueError(f"{where}: its 'vitscale.config' metadata is not a valid ViTConfig ({e})") from e


def expected_specs(cfg: ViTConfig) -> dict[str, TensorSpec]:
    """The state dict ``VisionTransformer(cfg)`` would have, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    return {k: _spec(v) for k, v in model.state_dict().items()}


def physical_memory_bytes() -> int | None:
    """This machine's RAM (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_weights_file(
    path: str | os.PathLike[str],
    cfg: ViTConfig,
    *,
    max_bytes: int | None = None,
    allow_resample: bool = False,
    allow_cast: bool = False,
) -> None:
    """Check a safetensors file against the model ``cfg`` declares, before that model is built.

    Reads only the header: every tensor of ``VisionTransformer(cfg)`` must be in the file with
    the same shape and a floating-point dtype (see ``load_weights`` for the two opt-in
    conversions), and the model must fit in ``max_bytes`` (default: this machine's RAM). A
    500-byte file whose config claims width 65536 is refused here instead of allocating 50 GB.

    Raises:
        ValueError: names the config, the first mismatching tensors, or the size.
    """
    where = os.fspath(path)
    specs, _ = read_header(path)
    blocks = {k.split(".")[1] for k in map(_bare_name, specs) if k.startswith("blocks.")}
    if cfg.depth > len(blocks):  # before the meta build: a depth of 10**9 would build 10**9 modules
        raise ValueError(f"{where}: the config declares depth {cfg.depth} but the file holds {len(blocks)} "
                         "blocks; the file is not the model its config describes")
    own = expected_specs(cfg)
    need = sum(s.numel for s in own.values()) * torch.tensor([], dtype=torch.get_default_dtype()).element_size()
    limit = max_bytes if max_bytes is not None else physical_memory_bytes()
    try:
        _plan(specs, own, cfg, strict=True, ignore_head=False, allow_resample=allow_resample,
              allow_cast=allow_cast)
    except ValueError as e:
        raise ValueError(f"{where}: the tensors do not match the config stored with them "
                         f"({cfg.variant or 'ViT'} width {cfg.width}, depth {cfg.depth}, mlp_dim {cfg.mlp_dim}, "
                         f"image_size {cfg.image_size}): {e}") from e
    if limit is not None and need > limit:
        raise ValueError(f"{where}: the model needs {need / 2**30:.1f} GiB, more than the {limit / 2**30:.1f} GiB "
                         "allowed (this machine's memory); load it on a bigger machine")


class _Plan(NamedTuple):
    keys: dict[str, str]  # model key -> the checkpoint's key to load into it
    resample: tuple[tuple[int, int], tuple[int, int]] | None  # (old grid, new grid) of pos_embed
    casts: dict[str, list[str]]  # "int8 -> float32" -> model keys (non-floating checkpoint tensors)


def _grid_of(spec: TensorSpec, prefix: int) -> tuple[int, int] | None:
    n = spec.shape[1] - prefix if len(spec.shape) == 3 else -1
    g = math.isqrt(max(n, 0))
    return (g, g) if n > 0 and g * g == n else None


def check_casts(own: Mapping[str, TensorSpec], src: Mapping[str, TensorSpec], names: Mapping[str, str],
                allow_cast: bool) -> dict[str, list[str]]:
    """The non-float casts loading needs ({"int8 -> float32": [keys]}; ``names``: our key -> the
    checkpoint's); refused unless ``allow_cast``: integer or boolean weights are quantised or
    corrupt, never silently cast."""
    casts: dict[str, list[str]] = {}
    for k in own:
        if k in names and src[names[k]].dtype != own[k].dtype and not (src[names[k]].floating and own[k].floating):
            casts.setdefault(f"{src[names[k]].dtype} -> {own[k].dtype}", []).append(k)
    if casts and not allow_cast:
        lines = "; ".join(f"{what}: {keys[:4]}{' ...' if len(keys) > 4 else ''}" for what, keys in casts.items())
        raise ValueError(f"checkpoint tensors are not floating point ({lines}): quantised or corrupt weights; "
                         "pass allow_cast=True only if a plain cast is really what they mean")
    return casts


def _plan(
    src: Mapping[str, TensorSpec], own: Mapping[str, TensorSpec], cfg: ViTConfig, *, strict: bool,
    ignore_head: bool, allow_resample: bool, allow_cast: bool,
) -> _Plan:
    """What ``load_weights`` will load, from shapes and dtypes alone; raises ValueError for anything
    it must not do (shape mismatch, another grid or a non-float dtype without its opt-in, missing or
    unexpected keys with ``strict``)."""
    names = {_bare_name(k): k for k in src}
    _refuse_unsupported_timm(names)
    if ("dist_token" in names) != cfg.distilled:  # DeiT's distilled layout (timm deit_*_distilled) or not
        have = "is a distilled DeiT (dist_token, head_dist)" if "dist_token" in names else "has no dist_token"
        raise ValueError(f"checkpoint {have} but the model is built with distilled={cfg.distilled}; build it "
                         f"with distilled={'dist_token' in names} (ViTConfig / ViTSpec)")
    skip_own: set[str] = set()
    if ignore_head:  # head.* and a distilled model's head_dist.*
        names = {k: v for k, v in names.items() if not k.startswith(("head.", "head_dist."))}
        skip_own |= {k for k in own if k.startswith(("head.", "head_dist."))}
        if not cfg.representation_size:
            names = {k: v for k, v in names.items() if not k.startswith("pre_logits.")}
        else:
            skip_own |= {k for k in own if k.startswith("pre_logits.") and k not in names}
    resample = None
    if cfg.posemb == "sincos2d":
        names.pop("pos_embed", None)  # a fixed function of the grid: recomputed, never loaded
        skip_own.add("pos_embed")
    elif "pos_embed" in names and "pos_embed" in own:
        have, want = src[names["pos_embed"]], own["pos_embed"]
        if len(have.shape) == 3 and have.shape[-1] == want.shape[-1] and have.shape[1] != want.shape[1]:
            old = _grid_of(have, cfg.num_prefix_tokens)
            if old is None:
                raise ValueError(
                    f"pos_embed: checkpoint has shape {have.shape}, model expects {want.shape} and the checkpoint's "
                    f"{have.shape[1] - cfg.num_prefix_tokens} grid positions are not a square grid to resample")
            if not allow_resample:
                raise ValueError(
                    f"pos_embed: checkpoint is for a {old[0]}x{old[1]} patch grid {have.shape}, the model for "
                    f"{cfg.grid[0]}x{cfg.grid[1]} {want.shape}; pass allow_resample=True (finetune.py does, "
                    "for its --image-size) to interpolate it, the paper's recipe for another resolution")
            resample = (old, cfg.grid)
    bad = [k for k in own if k in names and src[names[k]].shape != own[k].shape
           and not (k == "pos_embed" and resample)]  # model order
    if bad:
        hints = []
        if any(k.startswith("head.") for k in bad):
            hints.append("the head differs (class count or representation_size): pass ignore_head=True to fine-tune "
                         "with a new head")
        if any(k.startswith("patch_embed.") for k in bad):
            hints.append("the patch size, width or input channels differ: build the model the checkpoint came from")
        lines = "; ".join(
            f"{k}: checkpoint has shape {src[names[k]].shape}, model expects {own[k].shape}" for k in bad[:6])
        more = f" (+{len(bad) - 6} more)" if len(bad) > 6 else ""
        raise ValueError(f"{lines}{more}" + "".join(f"; {h}" for h in hints))
    casts = check_casts(own, src, names, allow_cast)
    missing = sorted(set(own) - set(names) - skip_own)
    unexpected = sorted(set(names) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(
            f"checkpoint does not match the model: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
            f"(model {cfg.variant or 'ViT'}; pass strict=False to load the rest)"
        )
    return _Plan({k: names[k] for k in own if k in names}, resample, casts)


def load_weights(
    model: VisionTransformer,
    path_or_sd: str | os.PathLike[str] | Mapping[str, Tensor],
    *,
    strict: bool = True,
    ignore_head: bool = False,
    allow_resample: bool = False,
    allow_cast: bool = False,
) -> VisionTransformer:
    """Load a checkpoint (safetensors path or state dict, ours or timm's) into ``model``.

    Everything is checked from the file's header (names, shapes, dtypes) before a tensor is
    read. Two conversions happen only when asked for, and are logged:

    * ``allow_resample=True``: a learnt position embedding trained on another grid is resampled
      (``resample_pos_embed``), so a 224 checkpoint loads into a 384 model (fine-tuning at a
      higher resolution). Without it, another grid is an error. A ``posemb="sincos2d"`` model
      always keeps its own fixed buffer.
    * ``allow_cast=True``: non-floating tensors (int8, bool, ...) are cast to the model's dtype.
      Floating-point precisions (bf16 -> fp32) are always cast.

    ``ignore_head=True`` keeps the model's (fresh) head and skips the checkpoint's ``head.*``
    (and ``pre_logits.*`` when the model has no representation layer): the paper's fine-tuning
    recipe. ``strict=False`` tolerates missing / unexpected keys, never mismatched shapes.

    Returns ``model`` (loaded in place; tensors are cast to its dtype and device).

    Raises:
        ValueError: a shape mismatch (names the tensor and both shapes), another grid or a
            non-float dtype without its opt-in, or with ``strict`` missing / unexpected keys.
    """
    cfg = model.cfg
    own = {k: _spec(v) for k, v in model.state_dict().items()}
    kw = dict(strict=strict, ignore_head=ignore_head, allow_resample=allow_resample, allow_cast=allow_cast)
    if isinstance(path_or_sd, Mapping):
        plan = _plan({k: _spec(v) for k, v in path_or_sd.items()}, own, cfg, **kw)
        sd = {k: path_or_sd[src] for k, src in plan.keys.items()}
    else:
        from safetensors import safe_open

        plan = _plan(read_header(path_or_sd)[0], own, cfg, **kw)
        with safe_open(os.fspath(path_or_sd), framework="pt") as f:  # only the tensors the model takes
            sd = {k: f.get_tensor(src) for k, src in plan.keys.items()}
    if plan.resample:
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], cfg.grid, cfg.num_prefix_tokens,
                                             old_grid=plan.resample[0])
        log.info("load_weights: resampled pos_embed from a %dx%d to a %dx%d patch grid (allow_resample)",
                 *plan.resample[0], *plan.resample[1])
    for what, keys in plan.casts.items():
        log.warning("load_weights: cast %d non-floating tensor(s) %s (allow_cast): %s", len(keys), what, keys[:4])
    model.load_state_dict(sd, strict=False)
    return model
