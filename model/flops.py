"""Analytic compute of a ViT forward pass, for MFU and scaling-law plots.

Counts multiply-accumulates (MACs) of the matrix products only, the convention of
timm's / fvcore's published "GMACs" (LayerNorm, softmax, GELU and adds are < 1% for ViTs).
"""

from __future__ import annotations

from .vit import ViTConfig


def macs_per_image(cfg: ViTConfig) -> int:
    """Forward multiply-adds for one image.

    patch embedding + per layer (qkv, QK^T, AV, output projection, 2 MLP matmuls)
    + representation layer + head. E.g. B/16 at 224: 17.56e9 (timm lists 17.58 G).
    """
    N, D, M = cfg.seq_len, cfg.width, cfg.mlp_dim
    patch = cfg.num_patches * D * cfg.in_chans * cfg.patch_size**2
    per_layer = (
        N * D * 3 * D  # qkv projection
        + N * N * D  # Q K^T over all heads: h * N * N * d
        + N * N * D  # attention-weighted values
        + N * D * D  # output projection
        + 2 * N * D * M  # MLP fc1 + fc2
    )
    rep = cfg.representation_size or 0
    head_in = rep or D
    return patch + cfg.depth * per_layer + D * rep + head_in * cfg.num_classes


def train_flops_per_image(cfg: ViTConfig) -> float:
    """FLOPs of one training step per image: forward + backward ~= 3 forwards, 2 FLOPs/MAC.

    Activation checkpointing re-runs the forward, but that is not useful work, so MFU
    deliberately does not count it.
    """
    return 3.0 * 2.0 * macs_per_image(cfg)
