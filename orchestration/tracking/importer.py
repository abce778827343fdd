"""Import released ViT weights into the registry: the paper's ``.npz`` files and timm safetensors.

``python orchestration/import_weights.py FILE --name NAME`` runs :func:`import_weights`: the file is
read without pickle (``model.npz`` for ``.npz``, safetensors for ``.safetensors``; anything else,
a ``.pth`` included, is refused), the config is read off the arrays' shapes (``--variant`` checks
it), and the model is registered as a pyfunc like a trained one, with lineage: the source file's
name, size and sha256, its layout, and for AugReg files the training settings parsed from the name
(``B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestration.serving.spec import ServingSpec
from orchestration.tracking import runs
from orchestration.tracking.registry import log_and_register_model

IMPORT_EXPERIMENT = "vitscale-imports"
#: The eval transform of Google's released ViTs (timm's pretrained configs for the AugReg and
#: original files: inputs scaled to [-1, 1]; centre crop 0.9 at 224 px, none at 384 px).
GOOGLE_MEAN = GOOGLE_STD = (0.5, 0.5, 0.5)

_AUGREG = re.compile(r"^(?P<model>[A-Za-z0-9]+_\d+)-(?P<data>[a-z0-9]+)-(?P<epochs>\d+)ep-(?P<settings>[^-]*(?:-[^-]+)*?)"
                     r"(?:--(?P<ft>.+))?$")


def parse_augreg_name(filename: str) -> dict[str, str]:
    """Tags from an AugReg file name ("How to train your ViT?", Steiner et al. 2021), e.g.
    ``B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384``
    -> variant B/16, pre-training on i21k for 300 epochs with those settings, fine-tuned on
    imagenet2012 for 20k steps at lr 0.01 and 384 px. {} for a name that is not AugReg's."""
    stem = Path(filename).name.removesuffix(".npz")
    m = _AUGREG.match(stem)
    if not m:
        return {}
    model = m["model"]
    size, _, patch = model.rpartition("_")
    tags = {"augreg.model": model, "augreg.variant": f"{size}/{patch}" if not size.startswith("R") else model,
            "augreg.pretrain_dataset": m["data"], "augreg.pretrain_epochs": m["epochs"]}
    for part in m["settings"].split("-"):
        key, _, value = part.partition("_")
        if key and value:
            tags[f"augreg.pretrain_{key}"] = value
    if m["ft"]:
        ft_parts = m["ft"].split("-")
        tags["augreg.finetune_dataset"] = ft_parts[0]
        for part in ft_parts[1:]:
            key, _, value = part.partition("_")
            if key and value:
                tags[f"augreg.finetune_{key}"] = value
    return tags


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path: Path, *, variant: str = "", image_size: int | None = None,
                    num_classes: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(model, description) from an ``.npz`` or a timm ``.safetensors`` file; ValueError naming
    the problem for anything else (a pickle is refused before a byte of it is interpreted)."""
    from model.npz import CheckpointError, load_npz

    with path.open("rb") as f:
        head = f.read(8)
    if head[:1] == b"\x80" or path.suffix in (".pth", ".pt", ".pkl", ".pickle", ".bin", ".ckpt"):
        raise CheckpointError(f"{path} is a pickle (or a PyTorch checkpoint, which is a pickle): loading it would run "
                              "arbitrary code, so it is refused. Import the .npz or .safetensors release of the "
                              "same weights, or convert it where you trust it (safetensors.torch.save_file)")
    if head[:2] == b"PK" or path.suffix == ".npz":
        model, info = load_npz(path, variant=variant, image_size=image_size, num_classes=num_classes)
        return model, {**info, "format": f"npz-{info['layout']}"}
    if path.suffix == ".safetensors":
        return _read_timm_safetensors(path, variant=variant, image_size=image_size, num_classes=num_classes)
    raise CheckpointError(f"{path}: not an .npz (JAX/Flax) or .safetensors file")


def _read_timm_safetensors(path: Path, *, variant: str, image_size: int | None,
                           num_classes: int | None) -> tuple[Any, dict[str, Any]]:
    """A timm ``VisionTransformer`` safetensors file (or one of ours, with its config inside)."""
    import dataclasses

    import torch
    from safetensors import safe_open

    from model import VARIANTS, VisionTransformer, ViTConfig
    from model.npz import CheckpointError
    from model.variants import parse_variant
    from model.weights import from_timm_state_dict, load_weights, read_header
    from orchestration.tracking.registry import model_from_path

    specs, meta = read_header(path)
    if "vitscale.config" in meta:
        model = model_from_path(path, str(path))
        return _resized(model, image_size, num_classes), {"format": "vitscale-safetensors",
                                                          "config": dataclasses.asdict(model.cfg)}
    from_timm_state_dict({k: None for k in specs})  # refuses timm features we lack, naming them

    def shape(key: str) -> tuple[int, ...]:
        if key not in specs:
            raise CheckpointError(f"{path}: missing tensor {key!r} (not a timm VisionTransformer state dict)")
        return specs[key].shape

    width, in_chans, patch, _ = shape("patch_embed.proj.weight")
    depth = len({k.split(".")[1] for k in specs if k.startswith("blocks.")})
    mlp_dim = shape("blocks.0.mlp.fc1.weight")[0]
    cls = "cls_token" in specs
    n = shape("pos_embed")[1]
    pos_has_cls = cls and math.isqrt(n - 1) ** 2 == n - 1
    grid = math.isqrt(n - int(pos_has_cls))
    if grid * grid != n - int(pos_has_cls):
        raise CheckpointError(f"{path}: pos_embed has {n} positions, not a square grid (+ a class token)")
    fields: dict[str, Any] = dict(patch_size=patch, in_chans=in_chans, width=width, depth=depth, mlp_dim=mlp_dim,
                                  image_size=grid * patch, num_classes=shape("head.weight")[0] if "head.weight" in specs
                                  else 0, qkv_bias="blocks.0.attn.qkv.bias" in specs)
    if "fc_norm.weight" in specs:
        if not cls:
            raise CheckpointError(f"{path}: average pooling with fc_norm and no class token is not implemented")
        fields["pool"] = "avg"
    else:
        fields["pool"] = "cls" if cls else "gap"
    if variant:
        dims = parse_variant(variant)
        bad = {k: (fields[k], v) for k, v in dims.items() if k in fields and fields[k] != v}
        if bad:
            raise CheckpointError(f"{path}: --variant {variant} does not match the file: "
                                  + ", ".join(f"{k} {a} in the file, {b} for {variant}" for k, (a, b) in bad.items()))
        fields["heads"] = dims["heads"]
    else:
        matches = [f"{s}/{patch}" for s, d in VARIANTS.items()
                   if (d["width"], d["depth"], d["mlp_dim"]) == (width, depth, mlp_dim)]
        if len(matches) != 1:
            raise CheckpointError(f"{path}: a timm state dict does not say how many attention heads it has, and its "
                                  f"shape (width {width}, depth {depth}, mlp {mlp_dim}) is not one known variant "
                                  f"(matches: {matches or 'none'}); pass --variant (e.g. B/16)")
        variant = matches[0]
        fields["heads"] = parse_variant(variant)["heads"]
    fields["variant"] = variant
    cfg = ViTConfig(**fields)
    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in specs}
    if cls and not pos_has_cls:  # timm no_embed_class: the class token has no position; our slot is zero
        sd["pos_embed"] = torch.cat([sd["pos_embed"].new_zeros(1, 1, width), sd["pos_embed"]], 1)
    model = load_weights(VisionTransformer(cfg), sd)
    return _resized(model, image_size, num_classes), {"format": "timm-safetensors", "config": dataclasses.asdict(cfg)}


def _resized(model: Any, image_size: int | None, num_classes: int | None) -> Any:
    import dataclasses

    from model import VisionTransformer
    from model.weights import load_weights

    cfg = model.cfg
    if (image_size in (None, cfg.image_size)) and (num_classes in (None, cfg.num_classes)):
        return model.eval()
    new = dataclasses.replace(cfg, image_size=image_size or cfg.image_size,
                              num_classes=cfg.num_classes if num_classes is None else num_classes)
    return load_weights(VisionTransformer(new), model.state_dict(), allow_resample=True,
                        ignore_head=new.num_classes != cfg.num_classes).eval()


def read_class_names(path: str | None, num_classes: int) -> tuple[str, ...] | None:
    """Class names from a JSON list or a text file (one per line); None without a file."""
    if not path:
        return None
    text = Path(path).read_text()
    try:
        names = json.loads(text)
    except ValueError:
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"--classes {path}: want a JSON list of strings or one name per line")
    if len(names) != num_classes:
        raise ValueError(f"--classes {path}: {len(names)} names for a head of {num_classes} classes")
    return tuple(names)


def import_weights(path: Path, *, name: str, variant: str = "", image_size: int | None = None,
                   num_classes: int | None = None, classes: str | None = None, crop_pct: float | None = None,
                   mean: Sequence[float] = GOOGLE_MEAN, std: Sequence[float] = GOOGLE_STD,
                   uri: str | None = None, experiment: str = IMPORT_EXPERIMENT) -> dict[str, Any]:
    """Read ``path`` (see :func:`read_checkpoint`) and register it as a new version of ``name``.

    Returns ``{"name", "version", "uri", "run_id", "tags"}``. The MLflow run of the import
    (experiment ``vitscale-imports``) carries the same lineage tags as the version.
    """
    model, info = read_checkpoint(path, variant=variant, image_size=image_size, num_classes=num_classes)
    cfg = model.cfg
    names = read_class_names(classes, cfg.num_classes)
    crop = crop_pct if crop_pct is not None else (1.0 if cfg.image_size >= 384 else 0.9)
    spec = ServingSpec(image_size=cfg.image_size, crop_pct=crop, mean=tuple(mean), std=tuple(std),
                       activation="softmax" if cfg.num_classes else "none",
                       class_names=(names or tuple(str(i) for i in range(cfg.num_classes))) if cfg.num_classes else (),
                       source={"preprocess": "Google's released ViTs (timm pretrained cfg)" if crop_pct is None
                               else "--crop-pct", "classes": classes or "indices"})
    tags = {"source_file": path.name, "source_sha256": sha256_file(path), "source_bytes": os.path.getsize(path),
            "source_format": info["format"], "variant": cfg.variant, "image_size": cfg.image_size,
            "num_classes": cfg.num_classes, "git_commit": runs.git_commit(),
            **({"source_layout_prefix": info["prefix"], "source_stacked_blocks": info["stacked"]}
               if "prefix" in info else {}),
            **parse_augreg_name(path.name)}
    run_id = runs.start_run(experiment, run_name=f"import {path.name}", tags=tags, uri=uri)
    try:
        version = log_and_register_model(model, run_id=run_id, name=name, tags=tags, uri=uri, serving=spec,
                                         description=f"{cfg.variant or 'ViT'} imported from {path.name}")
    except BaseException:
        runs.end_run(run_id, "FAILED", uri=uri)
        raise
    runs.end_run(run_id, uri=uri)
    return {"name": name, "version": version, "uri": f"models:/{name}/{version}", "run_id": run_id, "tags": tags}
