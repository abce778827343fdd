"""Analytic compute of a ViT forward pass, for MFU and scaling-law plots.

Counts multiply-accumulates (MACs) of the matrix products only, the convention of
timm's / fvcore's published "GMACs" (LayerNorm, softmax, GELU and adds are < 1% for ViTs).
"""

from __future__ import annotations

from .vit import ViTConfig


def blocks_macs(tokens: int, width: int, mlp_dim: int, depth: int) -> int:
    """Forward multiply-adds of ``depth`` pre-norm Transformer blocks over ``tokens`` tokens."""
    N, D, M = tokens, width, mlp_dim
    per_layer = (
        N * D * 3 * D  # qkv projection
        + N * N * D  # Q K^T over all heads: h * N * N * d
        + N * N * D  # attention-weighted values
        + N * D * D  # output projection
        + 2 * N * D * M  # MLP fc1 + fc2
    )
    return depth * per_layer


def macs_per_image(cfg: ViTConfig) -> int:
    """Forward multiply-adds for one image.

    patch embedding + per layer (qkv, QK^T, AV, output projection, 2 MLP matmuls)
    + representation layer + head. E.g. B/16 at 224: 17.56e9 (timm lists 17.58 G).
    """
    D = cfg.width
    patch = cfg.num_patches * D * cfg.in_chans * cfg.patch_size**2
    rep = cfg.representation_size or 0
    head_in = rep or D
    return patch + blocks_macs(cfg.seq_len, D, cfg.mlp_dim, cfg.depth) + D * rep + head_in * cfg.num_classes


def mae_macs_per_image(cfg: ViTConfig, decoder_width: int, decoder_depth: int, decoder_mlp_dim: int,
                       visible: int) -> int:
    """Forward multiply-adds of MAE for one image: the patch embedding of every patch, the encoder
    on the class token and ``visible`` patches, the decoder (embedding, blocks and pixel
    prediction) on the class token and every patch. E.g. B/16 at 224, 49 visible, decoder
    8 x 512: 9.8e9, 0.56 of the supervised 17.56e9."""
    D, E, N = cfg.width, decoder_width, cfg.num_patches
    patch = N * D * cfg.in_chans * cfg.patch_size**2
    encoder = blocks_macs(1 + visible, D, cfg.mlp_dim, cfg.depth)
    decoder = (1 + visible) * D * E + blocks_macs(1 + N, E, decoder_mlp_dim, decoder_depth)
    predict = (1 + N) * E * cfg.patch_size**2 * cfg.in_chans
    return patch + encoder + decoder + predict


def train_flops_per_image(cfg: ViTConfig) -> float:
    """FLOPs of one training step per image: forward + backward ~= 3 forwards, 2 FLOPs/MAC.

    Activation checkpointing re-runs the forward, but that is not useful work, so MFU
    deliberately does not count it.
    """
    return 3.0 * 2.0 * macs_per_image(cfg)
