"""The ViT model family: variants, our network, timm's zoo, weights interop and FLOPs.

Imports only torch, safetensors, timm (``model.zoo``, lazily) and ``confkit``; see docs/design.md.
"""

from .attention import attention_rollout, cls_attention_maps
from .flops import count_forward_macs, macs_per_image, train_flops_per_image
from .network import build_network, config_from_dict, load_network_weights, spec_of
from .spec import ViTSpec
from .variants import VARIANTS, parse_variant
from .vit import VisionTransformer, ViTConfig, create_model, vit_config
from .weights import from_timm_state_dict, load_weights, resample_pos_embed, save_weights, to_timm_state_dict
from .zoo import TimmConfig, TimmSpec, create_timm_model

__all__ = [
    "VARIANTS",
    "TimmConfig",
    "TimmSpec",
    "ViTConfig",
    "ViTSpec",
    "VisionTransformer",
    "attention_rollout",
    "build_network",
    "config_from_dict",
    "count_forward_macs",
    "create_timm_model",
    "cls_attention_maps",
    "create_model",
    "from_timm_state_dict",
    "load_network_weights",
    "load_weights",
    "macs_per_image",
    "parse_variant",
    "resample_pos_embed",
    "save_weights",
    "spec_of",
    "to_timm_state_dict",
    "train_flops_per_image",
    "vit_config",
]
