"""The ViT model family: variants, network, weights interop and FLOPs.

Imports only torch, safetensors (``model.weights``) and ``confkit``; see docs/design.md.
"""

from .attention import attention_rollout, cls_attention_maps
from .flops import macs_per_image, train_flops_per_image
from .spec import ViTSpec
from .variants import VARIANTS, parse_variant
from .vit import VisionTransformer, ViTConfig, create_model, vit_config
from .weights import from_timm_state_dict, load_weights, resample_pos_embed, save_weights, to_timm_state_dict

__all__ = [
    "VARIANTS",
    "ViTConfig",
    "ViTSpec",
    "VisionTransformer",
    "attention_rollout",
    "cls_attention_maps",
    "create_model",
    "from_timm_state_dict",
    "load_weights",
    "macs_per_image",
    "parse_variant",
    "resample_pos_embed",
    "save_weights",
    "to_timm_state_dict",
    "train_flops_per_image",
    "vit_config",
]
