"""The paper's own checkpoints: JAX/Flax ``.npz`` files -> a ``VisionTransformer``.

Reads the two layouts Google released ViT weights in, without numpy and without pickle:

* **classic** (google-research/vision_transformer, AugReg ``B_16-i21k-300ep-...npz``): arrays
  ``embedding/kernel``, ``cls``, ``Transformer/posembed_input/pos_embedding`` (class token slot
  first), blocks ``Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1,
  LayerNorm_2, MlpBlock_3}``, ``Transformer/encoder_norm``, ``pre_logits``, ``head``;
* **big_vision** (``params/`` prefix, ``params/img/`` in two-tower files, ``opt/target/`` in
  optimizer dumps): ``pos_embedding`` at the top over the patches only, blocks
  ``{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}``, either one folder
  per block or all blocks stacked along a leading depth axis (``Transformer/encoderblock/...``,
  ``scan=True``).

The config (width, depth, heads, MLP size, patch, image size, classes, pooling, representation
layer) is read off the arrays' shapes. Kernels are HWIO / (in, out) / (D, heads, head_dim) in
Flax; they are transposed into torch's layouts here. A big_vision class token gets no position
embedding; ours has a slot for it, filled with zeros (cls + 0 = cls: the same function).

An ``.npz`` is a zip of ``.npy`` files; :func:`read_npz` parses them itself and accepts plain
numeric arrays only: an object array (``dtype=object``, which numpy would unpickle), a member
that is not ``.npy`` (a PyTorch zip's ``data.pkl``) or a plain pickle file is refused.
"""

from __future__ import annotations

import ast
import math
import os
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .variants import VARIANTS
from .vit import VisionTransformer, ViTConfig

_NPY_MAGIC = b"\x93NUMPY"
_PICKLE_MAGIC = (b"\x80",)  # protocol 2+ pickles start with PROTO (0x80)
_DTYPES = {"f2": torch.float16, "f4": torch.float32, "f8": torch.float64, "i1": torch.int8, "i2": torch.int16,
           "i4": torch.int32, "i8": torch.int64, "u1": torch.uint8, "b1": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be imported; the message names the array or member."""


# --------------------------------------------------------------------------- .npz reading
def _parse_npy(name: str, data: bytes) -> Tensor:
    """One ``.npy`` member -> a tensor (numeric dtypes only; never unpickles)."""
    if not data.startswith(_NPY_MAGIC) or len(data) < 10:
        raise CheckpointError(f"array {name!r} is not a .npy array (bad magic)")
    major = data[6]
    if major == 1:
        (hlen,), start = struct.unpack("<H", data[8:10]), 10
    elif major in (2, 3):
        (hlen,), start = struct.unpack("<I", data[8:12]), 12
    else:
        raise CheckpointError(f"array {name!r}: unknown .npy format version {major}")
    try:
        header = ast.literal_eval(data[start:start + hlen].decode("utf-8" if major == 3 else "latin1"))
        descr, fortran, shape = header["descr"], bool(header["fortran_order"]), tuple(int(d) for d in header["shape"])
    except (ValueError, SyntaxError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"array {name!r}: unreadable .npy header ({e})") from e
    if not isinstance(descr, str) or descr.lstrip("<>|=")[:1] in ("O", "V", "U", "S") or descr[1:] not in _DTYPES:
        what = "Python objects (loading them would unpickle)" if "O" in str(descr) else f"dtype {descr!r}"
        raise CheckpointError(f"array {name!r} holds {what}; only float/int arrays are imported (convert "
                              "bfloat16 arrays to float32 first)")
    dtype = _DTYPES[descr[1:]]
    itemsize = torch.tensor([], dtype=dtype).element_size()
    body = data[start + hlen:]
    need = math.prod(shape) * itemsize
    if len(body) != need:
        raise CheckpointError(f"array {name!r}: shape {shape} {descr} needs {need} bytes, the member has {len(body)} "
                              "(truncated or damaged file)")
    flat = torch.frombuffer(bytearray(body), dtype=torch.uint8) if need else torch.empty(0, dtype=torch.uint8)
    if descr[0] == ">" and itemsize > 1:  # big-endian on disk
        flat = flat.view(-1, itemsize).flip(-1).reshape(-1)
    t = flat.view(dtype)
    if fortran:
        return t.reshape(shape[::-1]).permute(*reversed(range(len(shape)))).contiguous()
    return t.reshape(shape)


def read_npz(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Every array of an ``.npz`` file by name (member name without ``.npy``).

    Raises CheckpointError for a pickle file, a zip with anything but ``.npy`` members (a
    PyTorch checkpoint's ``data.pkl``), object arrays, or a member whose bytes do not match its
    header; the message names the member.
    """
    where = os.fspath(path)
    with open(where, "rb") as f:
        head = f.read(4)
    if head[:1] in _PICKLE_MAGIC:
        raise CheckpointError(f"{where} is a pickle file; loading it would run arbitrary code, so it is refused. "
                              "Convert it to safetensors where you trust it (safetensors.torch.save_file)")
    if not zipfile.is_zipfile(where):
        raise CheckpointError(f"{where} is not an .npz archive (a zip of .npy arrays)")
    out: dict[str, Tensor] = {}
    with zipfile.ZipFile(where) as z:
        names = [i.filename for i in z.infolist() if not i.is_dir()]
        pickles = [n for n in names if n.endswith((".pkl", ".pickle")) or n.rsplit("/", 1)[-1] == "data.pkl"]
        if pickles:
            raise CheckpointError(f"{where} is a PyTorch (pickle) checkpoint, not an .npz (members {pickles[:3]}); "
                                  "pickles are refused: convert it to safetensors where you trust it")
        others = [n for n in names if not n.endswith(".npy")]
        if others:
            raise CheckpointError(f"{where} has members that are not .npy arrays: {others[:5]}")
        for info in z.infolist():
            if info.is_dir():
                continue
            name = info.filename[:-4]
            out[name] = _parse_npy(name, z.read(info))
    return out


# --------------------------------------------------------------------------- layout
_CLASSIC = {"ln1": "LayerNorm_0", "attn": "MultiHeadDotProductAttention_1", "ln2": "LayerNorm_2", "mlp": "MlpBlock_3"}
_BIG_VISION = {"ln1": "LayerNorm_0", "attn": "MultiHeadDotProductAttention_0", "ln2": "LayerNorm_1",
               "mlp": "MlpBlock_0"}
_UNSUPPORTED = (("conv_root/kernel", "a hybrid ResNet+ViT (R50+ViT) stem"), ("MAPHead_0/", "attention pooling "
                "(MAP head)"))
_PREFIXES = ("", "params/", "params/img/", "opt/target/")


class _Arrays:
    """Arrays under one prefix, each fetched with a shape check that names it."""

    def __init__(self, arrays: Mapping[str, Tensor], prefix: str, where: str) -> None:
        self.arrays, self.prefix, self.where = arrays, prefix, where

    def has(self, key: str) -> bool:
        return self.prefix + key in self.arrays

    def get(self, key: str, shape: tuple[int, ...] | None = None, why: str = "") -> Tensor:
        name = self.prefix + key
        if name not in self.arrays:
            raise CheckpointError(f"{self.where}: missing array {name!r}{why}")
        t = self.arrays[name]
        if shape is not None and tuple(t.shape) != shape:
            raise CheckpointError(f"{self.where}: array {name!r} has shape {tuple(t.shape)}, expected {shape}{why}")
        if not (t.is_floating_point()):
            raise CheckpointError(f"{self.where}: array {name!r} is {t.dtype}, not floating point")
        return t.float()


def _prefix(arrays: Mapping[str, Tensor], where: str) -> str:
    for p in _PREFIXES:
        if p + "embedding/kernel" in arrays:
            return p
    hits = [k for k in arrays if k.endswith("embedding/kernel")]
    if hits:
        return hits[0][: -len("embedding/kernel")]
    sample = sorted(arrays)[:6]
    raise CheckpointError(f"{where}: no 'embedding/kernel' array under any of the prefixes {list(_PREFIXES)}; not a "
                          f"ViT checkpoint of google-research/vision_transformer or big_vision (arrays: {sample} ...)")


def describe_npz(arrays: Mapping[str, Tensor], where: str = "checkpoint") -> dict[str, Any]:
    """The layout of a ViT ``.npz``: prefix, block naming, stacked or not, and the ``ViTConfig``
    fields its shapes imply (``config``)."""
    prefix = _prefix(arrays, where)
    a = _Arrays(arrays, prefix, where)
    for key, what in _UNSUPPORTED:
        if any(k.startswith(prefix) and key in k[len(prefix):] for k in arrays):
            raise CheckpointError(f"{where}: the checkpoint uses {what}, which model.VisionTransformer does not "
                                  f"implement (arrays matching {key!r})")
    stacked = a.has("Transformer/encoderblock/LayerNorm_0/scale")
    block0 = "Transformer/encoderblock/" if stacked else "Transformer/encoderblock_0/"
    names = _BIG_VISION if a.has(block0 + "MultiHeadDotProductAttention_0/query/kernel") else _CLASSIC
    if not a.has(block0 + names["attn"] + "/query/kernel"):
        raise CheckpointError(f"{where}: missing array {prefix + block0 + names['attn'] + '/query/kernel'!r} (no "
                              "attention in the first encoder block: neither the classic nor the big_vision layout)")
    kernel = a.get("embedding/kernel")
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1]:
        raise CheckpointError(f"{where}: array {prefix + 'embedding/kernel'!r} has shape {tuple(kernel.shape)}, "
                              "expected (P, P, in_chans, width)")
    patch, _, in_chans, width = kernel.shape
    q = a.get(block0 + names["attn"] + "/query/kernel")
    if stacked:
        depth, q = q.shape[0], q[0]
    else:
        depth = sum(1 for k in arrays if k.startswith(prefix + "Transformer/encoderblock_") and
                    k.endswith("/" + names["ln1"] + "/scale"))
    if q.ndim != 3 or q.shape[0] != width:
        raise CheckpointError(f"{where}: array {prefix + block0 + names['attn'] + '/query/kernel'!r} has shape "
                              f"{tuple(q.shape)}, expected (width {width}, heads, head_dim)")
    heads = q.shape[1]
    fc1 = a.get(block0 + names["mlp"] + "/Dense_0/kernel")
    mlp_dim = fc1.shape[-1]
    cls = a.has("cls")
    big_vision = names is _BIG_VISION
    pos_key = "pos_embedding" if a.has("pos_embedding") else "Transformer/posembed_input/pos_embedding"
    if a.has(pos_key):
        # The classic layout's table has a row for the class token; big_vision's covers the patches only.
        posemb, pos_has_cls = "learn", pos_key != "pos_embedding" and cls
        n = a.get(pos_key).shape[-2] - int(pos_has_cls)
    elif big_vision:
        n, posemb, pos_has_cls = None, "sincos2d", False
    else:
        raise CheckpointError(f"{where}: missing array {prefix + pos_key!r} (the position embedding)")
    grid = math.isqrt(n) if n else None
    if n is not None and (grid is None or grid * grid != n):
        raise CheckpointError(f"{where}: array {prefix + pos_key!r} has {n} patch positions, not a square grid")
    rep = a.get("pre_logits/kernel").shape[-1] if a.has("pre_logits/kernel") else None
    num_classes = a.get("head/kernel").shape[-1] if a.has("head/kernel") else 0
    cfg = dict(patch_size=int(patch), in_chans=int(in_chans), width=int(width), depth=int(depth), heads=int(heads),
               mlp_dim=int(mlp_dim), num_classes=int(num_classes), pool="cls" if cls else "gap", posemb=posemb,
               representation_size=int(rep) if rep else None, qkv_bias=a.has(block0 + names["attn"] + "/query/bias"))
    if grid:
        cfg["image_size"] = int(grid * patch)
    return {"prefix": prefix, "stacked": stacked, "names": names, "layout": "big_vision" if big_vision else "classic",
            "pos_key": pos_key if posemb == "learn" else None, "pos_has_cls": pos_has_cls, "config": cfg}


def variant_of(cfg: Mapping[str, Any]) -> str:
    """The paper name (``"B/16"``) of a shape, or "" when no entry of ``VARIANTS`` has it."""
    for size, dims in VARIANTS.items():
        if all(cfg.get(k) == v for k, v in dims.items()):
            return f"{size}/{cfg['patch_size']}"
    return ""


def npz_state_dict(arrays: Mapping[str, Tensor], layout: Mapping[str, Any], cfg: ViTConfig,
                   where: str = "checkpoint") -> dict[str, Tensor]:
    """Our state dict from the arrays of a layout :func:`describe_npz` found, every shape checked
    against ``cfg`` (a wrong or missing array is named)."""
    a = _Arrays(arrays, layout["prefix"], where)
    D, H, M, P, C = cfg.width, cfg.heads, cfg.mlp_dim, cfg.patch_size, cfg.in_chans
    hd = D // H
    nm = layout["names"]
    sd: dict[str, Tensor] = {
        "patch_embed.proj.weight": a.get("embedding/kernel", (P, P, C, D)).permute(3, 2, 0, 1),  # HWIO -> OIHW
        "patch_embed.proj.bias": a.get("embedding/bias", (D,)),
        "norm.weight": a.get("Transformer/encoder_norm/scale", (D,)),
        "norm.bias": a.get("Transformer/encoder_norm/bias", (D,)),
    }
    if cfg.class_token:
        sd["cls_token"] = a.get("cls", (1, 1, D))
    if cfg.posemb == "learn":
        n_p = cfg.num_patches
        if layout["pos_has_cls"]:
            sd["pos_embed"] = a.get(layout["pos_key"], (1, n_p + 1, D))
        else:
            pos = a.get(layout["pos_key"], (1, n_p, D))
            # big_vision adds no position to the class token; our slot for it is zero (same function).
            sd["pos_embed"] = torch.cat([pos.new_zeros(1, 1, D), pos], 1) if cfg.class_token else pos
    depth = cfg.depth

    def blk(i: int, key: str, shape: tuple[int, ...]) -> Tensor:
        if layout["stacked"]:
            t = a.get(f"Transformer/encoderblock/{key}", (depth, *shape), f" (block {i} of {depth}, stacked)")
            return t[i]
        return a.get(f"Transformer/encoderblock_{i}/{key}", shape, f" (block {i} of {depth})")

    for i in range(depth):
        p, att, mlp = f"blocks.{i}.", nm["attn"], nm["mlp"]
        sd[p + "norm1.weight"] = blk(i, nm["ln1"] + "/scale", (D,))
        sd[p + "norm1.bias"] = blk(i, nm["ln1"] + "/bias", (D,))
        sd[p + "attn.qkv.weight"] = torch.cat([blk(i, f"{att}/{n}/kernel", (D, H, hd)).reshape(D, D).T
                                               for n in ("query", "key", "value")])  # (3D, D)
        if cfg.qkv_bias:
            sd[p + "attn.qkv.bias"] = torch.cat([blk(i, f"{att}/{n}/bias", (H, hd)).reshape(D)
                                                 for n in ("query", "key", "value")])
        sd[p + "attn.proj.weight"] = blk(i, f"{att}/out/kernel", (H, hd, D)).reshape(D, D).T
        sd[p + "attn.proj.bias"] = blk(i, f"{att}/out/bias", (D,))
        sd[p + "norm2.weight"] = blk(i, nm["ln2"] + "/scale", (D,))
        sd[p + "norm2.bias"] = blk(i, nm["ln2"] + "/bias", (D,))
        sd[p + "mlp.fc1.weight"] = blk(i, f"{mlp}/Dense_0/kernel", (D, M)).T
        sd[p + "mlp.fc1.bias"] = blk(i, f"{mlp}/Dense_0/bias", (M,))
        sd[p + "mlp.fc2.weight"] = blk(i, f"{mlp}/Dense_1/kernel", (M, D)).T
        sd[p + "mlp.fc2.bias"] = blk(i, f"{mlp}/Dense_1/bias", (D,))
    rep = cfg.representation_size
    if rep:
        sd["pre_logits.fc.weight"] = a.get("pre_logits/kernel", (D, rep)).T
        sd["pre_logits.fc.bias"] = a.get("pre_logits/bias", (rep,))
    if cfg.num_classes:
        sd["head.weight"] = a.get("head/kernel", (rep or D, cfg.num_classes)).T
        sd["head.bias"] = a.get("head/bias", (cfg.num_classes,))
    return {k: v.contiguous() for k, v in sd.items()}


def load_npz(path: str | os.PathLike[str], *, variant: str = "", image_size: int | None = None,
             num_classes: int | None = None) -> tuple[VisionTransformer, dict[str, Any]]:
    """A ``VisionTransformer`` with the weights of a ViT ``.npz`` and a description of what was read.

    ``variant`` (``"B/16"``) is checked against the shapes (a mismatch names both); ``image_size``
    other than the checkpoint's resamples the position embedding (the paper's recipe for another
    resolution); ``num_classes=0`` drops the head (an embedding model). Returns (model in eval
    mode, ``{"layout", "prefix", "stacked", "config"}``).
    """
    from .weights import load_weights

    where = os.fspath(path)
    arrays = read_npz(path)
    layout = describe_npz(arrays, where)
    fields = dict(layout["config"])
    found = variant_of(fields)
    if variant:
        from .variants import parse_variant

        want = parse_variant(variant)
        diff = {k: (fields[k], v) for k, v in want.items() if fields.get(k) != v}
        if diff:
            raise CheckpointError(f"{where}: --variant {variant} does not match the checkpoint: "
                                  + ", ".join(f"{k} {have} in the file, {w} for {variant}" for k, (have, w) in diff.items()))
    fields["variant"] = variant or found
    if "image_size" not in fields:  # sincos2d: the grid is not stored
        if image_size is None:
            raise CheckpointError(f"{where}: the checkpoint has a fixed sin-cos position embedding, so its image size "
                                  "is not stored; pass --image-size")
        fields["image_size"] = image_size
    native = ViTConfig(**fields)
    sd = npz_state_dict(arrays, layout, native, where)
    del arrays
    model = load_weights(VisionTransformer(native), sd)
    if (image_size and image_size != native.image_size) or (num_classes is not None and num_classes != native.num_classes):
        import dataclasses

        cfg = dataclasses.replace(native, image_size=image_size or native.image_size,
                                  num_classes=native.num_classes if num_classes is None else num_classes)
        model = load_weights(VisionTransformer(cfg), model.state_dict(), allow_resample=True,
                             ignore_head=cfg.num_classes != native.num_classes)
    return model.eval(), {k: layout[k] for k in ("layout", "prefix", "stacked")} | {"config": layout["config"]}
