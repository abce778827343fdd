"""One way to build, describe and load any network of the project: our ViT or a timm zoo network.

Everything above ``model/`` (the launch, the registry, fine-tuning, evaluation) goes through these
functions, so a new kind of model is added here once, not at every call site.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .spec import ViTSpec
from .tokenizer import DiscreteVAE, DVAEConfig, DVAESpec
from .vit import VisionTransformer, ViTConfig
from .zoo import TESTED_TIMM, TimmConfig, TimmSpec, create_timm_model

log = logging.getLogger(__name__)

NetConfig = ViTConfig | TimmConfig | DVAEConfig
NetSpec = ViTSpec | TimmSpec | DVAESpec


def build_network(cfg: NetConfig) -> nn.Module:
    """A freshly initialised network of ``cfg`` (``model.cfg`` is ``cfg`` for every kind)."""
    if isinstance(cfg, TimmConfig):
        return create_timm_model(cfg)
    if isinstance(cfg, DVAEConfig):
        return DiscreteVAE(cfg)
    return VisionTransformer(cfg)


def config_to_json(cfg: NetConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def config_from_dict(d: Mapping[str, Any]) -> NetConfig:
    """The config a ``config.json`` / ``vitscale.config`` holds: ``kind="timm"`` is a TimmConfig,
    ``kind="dvae"`` a tokenizer's DVAEConfig, anything else a ViTConfig (written before there were
    other kinds). ValueError/TypeError for a field the config does not have or a value it refuses."""
    from confkit import from_dict

    if d.get("kind") == "dvae":
        return from_dict(DVAEConfig, d)
    if d.get("kind") == "timm":
        cfg = from_dict(TimmConfig, d)
        installed = _timm_version()
        if cfg.timm_version and cfg.timm_version != installed:
            log.warning("%s was saved with timm %s, this is timm %s; its tensors are checked against the network "
                        "timm %s builds (a changed architecture is refused by the shape check)", cfg.name,
                        cfg.timm_version, installed, installed)
        return cfg
    return ViTConfig(**d)


def _timm_version() -> str:
    try:
        import timm

        return str(timm.__version__)
    except ImportError:  # pragma: no cover - timm is a dependency
        return TESTED_TIMM


def spec_of(cfg: NetConfig, **fields: Any) -> NetSpec:
    """The experiment model section that rebuilds ``cfg``'s architecture, with ``fields`` replaced."""
    if isinstance(cfg, TimmConfig):
        return TimmSpec.of(cfg, **fields)
    if isinstance(cfg, DVAEConfig):
        return DVAESpec.of(cfg, **fields)
    return ViTSpec.of(cfg, **fields)


def load_network_weights(model: nn.Module, path_or_sd: str | os.PathLike[str] | Mapping[str, Tensor], *,
                         strict: bool = True, ignore_head: bool = False, allow_resample: bool = False,
                         allow_cast: bool = False) -> nn.Module:
    """``model.weights.load_weights`` for our ViT, ``model.zoo_weights.load_timm_weights`` for a
    timm network: the same checks and the same opt-in conversions."""
    kw = dict(strict=strict, ignore_head=ignore_head, allow_resample=allow_resample, allow_cast=allow_cast)
    if isinstance(getattr(model, "cfg", None), DVAEConfig):
        return _load_plain(model, path_or_sd, strict=strict, allow_cast=allow_cast)
    if isinstance(getattr(model, "cfg", None), TimmConfig):
        from .zoo_weights import load_timm_weights

        return load_timm_weights(model, path_or_sd, **kw)
    from .weights import load_weights

    return load_weights(model, path_or_sd, **kw)


def check_network_file(path: str | os.PathLike[str], cfg: NetConfig, *, allow_resample: bool = False,
                       allow_cast: bool = False) -> None:
    """A safetensors file checked against the network ``cfg`` declares, from its header alone."""
    if isinstance(cfg, DVAEConfig):
        from .weights import read_header

        with torch.device("meta"):
            _plain_plan(read_header(path)[0], build_network(cfg), strict=True, allow_cast=allow_cast)
    elif isinstance(cfg, TimmConfig):
        from .zoo_weights import check_timm_file

        check_timm_file(path, cfg, allow_resample=allow_resample, allow_cast=allow_cast)
    else:
        from .weights import check_weights_file

        check_weights_file(path, cfg, allow_resample=allow_resample, allow_cast=allow_cast)


def _plain_plan(src: Mapping[str, Any], model: nn.Module, *, strict: bool, allow_cast: bool) -> dict[str, str]:
    """Our key -> the checkpoint's for a network loaded as it is saved (a tokenizer): the same names
    (less DDP/DeepSpeed/compile prefixes), the same shapes, float dtypes unless ``allow_cast``.
    ``src``: name -> TensorSpec (or anything with ``shape``/``dtype``)."""
    from .weights import TensorSpec, _bare_name, check_casts

    def spec(t: Any) -> TensorSpec:
        return t if isinstance(t, TensorSpec) else TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."))

    srcs = {_bare_name(k): (k, spec(v)) for k, v in src.items()}
    own = {k: spec(v) for k, v in model.state_dict().items()}
    names = {k: srcs[k][0] for k in own if k in srcs}
    wrong = [f"{k}: checkpoint {srcs[k][1].shape}, network {own[k].shape}" for k in names
             if srcs[k][1].shape != own[k].shape]
    missing, unexpected = sorted(set(own) - set(srcs)), sorted(set(srcs) - set(own))
    problems = ([f"shape mismatch: {'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}"] if wrong else [])
    if strict and (missing or unexpected):
        problems.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, unexpected "
                        f"{unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    if problems:
        raise ValueError(f"checkpoint does not fit the {type(model).__name__} of {model.cfg}: {'; '.join(problems)}")
    check_casts(own, {names[k]: srcs[k][1] for k in names}, names, allow_cast)
    return names


def _load_plain(model: nn.Module, path_or_sd: str | os.PathLike[str] | Mapping[str, Tensor], *, strict: bool,
                allow_cast: bool) -> nn.Module:
    if isinstance(path_or_sd, Mapping):
        names = _plain_plan(path_or_sd, model, strict=strict, allow_cast=allow_cast)
        sd = {k: path_or_sd[src] for k, src in names.items()}
    else:
        from safetensors import safe_open

        from .weights import read_header

        names = _plain_plan(read_header(path_or_sd)[0], model, strict=strict, allow_cast=allow_cast)
        with safe_open(os.fspath(path_or_sd), framework="pt") as f:
            sd = {k: f.get_tensor(src) for k, src in names.items()}
    model.load_state_dict(sd, strict=False)
    return model
