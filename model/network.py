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

from torch import Tensor, nn

from .spec import ViTSpec
from .vit import VisionTransformer, ViTConfig
from .zoo import TESTED_TIMM, TimmConfig, TimmSpec, create_timm_model

log = logging.getLogger(__name__)

NetConfig = ViTConfig | TimmConfig
NetSpec = ViTSpec | TimmSpec


def build_network(cfg: NetConfig) -> nn.Module:
    """A freshly initialised network of ``cfg`` (``model.cfg`` is ``cfg`` for both kinds)."""
    if isinstance(cfg, TimmConfig):
        return create_timm_model(cfg)
    return VisionTransformer(cfg)


def config_to_json(cfg: NetConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def config_from_dict(d: Mapping[str, Any]) -> NetConfig:
    """The config a ``config.json`` / ``vitscale.config`` holds: ``kind="timm"`` is a TimmConfig,
    anything else a ViTConfig (written before there were other kinds). ValueError/TypeError for a
    field the config does not have or a value it refuses."""
    from confkit import from_dict

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
    return ViTSpec.of(cfg, **fields)


def load_network_weights(model: nn.Module, path_or_sd: str | os.PathLike[str] | Mapping[str, Tensor], *,
                         strict: bool = True, ignore_head: bool = False, allow_resample: bool = False,
                         allow_cast: bool = False) -> nn.Module:
    """``model.weights.load_weights`` for our ViT, ``model.zoo_weights.load_timm_weights`` for a
    timm network: the same checks and the same opt-in conversions."""
    kw = dict(strict=strict, ignore_head=ignore_head, allow_resample=allow_resample, allow_cast=allow_cast)
    if isinstance(getattr(model, "cfg", None), TimmConfig):
        from .zoo_weights import load_timm_weights

        return load_timm_weights(model, path_or_sd, **kw)
    from .weights import load_weights

    return load_weights(model, path_or_sd, **kw)


def check_network_file(path: str | os.PathLike[str], cfg: NetConfig, *, allow_resample: bool = False,
                       allow_cast: bool = False) -> None:
    """A safetensors file checked against the network ``cfg`` declares, from its header alone."""
    if isinstance(cfg, TimmConfig):
        from .zoo_weights import check_timm_file

        check_timm_file(path, cfg, allow_resample=allow_resample, allow_cast=allow_cast)
    else:
        from .weights import check_weights_file

        check_weights_file(path, cfg, allow_resample=allow_resample, allow_cast=allow_cast)
