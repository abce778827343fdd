"""ViT model sizes, keyed by the names used in the papers.

Sources (width D, depth L, heads, MLP dim):

* ``B``, ``L``, ``H``: Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words",
  Table 1 (ViT-Base / Large / Huge).
* ``Ti``, ``S``: Touvron et al. 2020, "Training data-efficient image transformers"
  (DeiT), Table 1; the same numbers are big_vision's ``decode_variant``
  (big_vision/models/vit.py).
* ``g``, ``G``: Zhai et al. 2021, "Scaling Vision Transformers", Table 2.
* ``mu``: big_vision's tiny test variant ("mu"), made smaller still so unit tests run in
  milliseconds on a CPU. Not a trained model size.

The patch size is part of the name (``"B/16"``, ``"H/14"``), as in the papers.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

#: name -> dict(width, depth, heads, mlp_dim). Read-only; copy before changing.
VARIANTS: Final = MappingProxyType(
    {
        "mu": MappingProxyType(dict(width=32, depth=2, heads=2, mlp_dim=64)),
        "Ti": MappingProxyType(dict(width=192, depth=12, heads=3, mlp_dim=768)),  # DeiT-Ti
        "S": MappingProxyType(dict(width=384, depth=12, heads=6, mlp_dim=1536)),  # DeiT-S
        "B": MappingProxyType(dict(width=768, depth=12, heads=12, mlp_dim=3072)),  # ViT Table 1
        "L": MappingProxyType(dict(width=1024, depth=24, heads=16, mlp_dim=4096)),  # ViT Table 1
        "H": MappingProxyType(dict(width=1280, depth=32, heads=16, mlp_dim=5120)),  # ViT Table 1
        "g": MappingProxyType(dict(width=1408, depth=40, heads=16, mlp_dim=6144)),  # Scaling ViTs
        "G": MappingProxyType(dict(width=1664, depth=48, heads=16, mlp_dim=8192)),  # Scaling ViTs
    }
)


def parse_variant(name: str) -> dict[str, int]:
    """Decode a variant name such as ``"B/16"`` into model dimensions.

    Returns a new dict with keys ``width, depth, heads, mlp_dim, patch_size``.
    The size part is case-sensitive (``"g"`` and ``"G"`` are different models).

    Raises:
        ValueError: unknown size, missing or non-positive patch size; the message lists
            the known names.
    """
    known = ", ".join(f"{k}/P" for k in VARIANTS)
    if not isinstance(name, str) or name.count("/") != 1:
        raise ValueError(
            f"variant {name!r} must be '<size>/<patch>', e.g. 'B/16' or 'mu/8'; known sizes: {known}"
        )
    size, patch = name.split("/")
    if size not in VARIANTS:
        raise ValueError(f"unknown ViT size {size!r} in variant {name!r}; known sizes: {known}")
    if not patch.isdigit() or int(patch) <= 0:
        raise ValueError(f"patch size {patch!r} in variant {name!r} must be a positive integer, e.g. 'B/16'")
    return {**VARIANTS[size], "patch_size": int(patch)}
