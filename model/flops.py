"""Compute of a forward pass, for MFU and the studies' compute axis, the same for every model.

Counts multiply-accumulates (MACs) of the matrix products and convolutions only, the convention
of timm's / fvcore's published "GMACs" (LayerNorm, softmax, GELU and adds are < 1% for ViTs).
Our ViT has an analytic formula (:func:`macs_per_image` of a ViTConfig); every other network
(timm's zoo) is counted by one generic counter, :func:`count_forward_macs`
(``torch.utils.flop_counter.FlopCounterMode`` over a forward on the meta device: nothing is
allocated or computed). Both count the same operations: for our ViT they agree exactly, and for
timm's DeiT to the equivalent ViTConfig's formula within 0.1% (tests/test_zoo.py), so MFU and a
study's FLOPs axis mean the same thing for every architecture.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from .tokenizer import DVAEConfig
from .vit import ViTConfig
from .zoo import TimmConfig, create_timm_model


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


def count_forward_macs(build: Callable[[], nn.Module], in_chans: int, image_size: int) -> int:
    """Multiply-adds of one image's forward through the network ``build()`` makes, counted by
    ``FlopCounterMode`` (which counts 2 FLOPs per MAC) on the meta device.

    The network is built under ``torch.device("meta")`` and run in eval mode (BatchNorm's batch
    statistics are not a one-image problem) with autograd on: a forward under ``no_grad`` trips
    the counter's module tracker on some timm blocks (CaiT's), and on the meta device the graph
    costs nothing. The meta device also matters for attention: on CPU, ``scaled_dot_product_attention``
    runs a kernel the counter does not know, and QK^T / AV would go uncounted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build()
    model.eval()
    x = torch.zeros(1, in_chans, image_size, image_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.enable_grad():
        model(x)
    return int(counter.get_total_flops()) // 2


@functools.lru_cache(maxsize=512)
def _timm_macs(cfg: TimmConfig) -> int:
    return count_forward_macs(lambda: create_timm_model(cfg), cfg.in_chans, cfg.image_size)


@functools.lru_cache(maxsize=64)
def _dvae_macs(cfg: DVAEConfig) -> int:
    from .tokenizer import DiscreteVAE

    return count_forward_macs(lambda: DiscreteVAE(cfg), cfg.channels, cfg.image_size)


def macs_per_image(cfg: ViTConfig | TimmConfig | DVAEConfig) -> int:
    """Forward multiply-adds for one image.

    Our ViT, analytically: patch embedding + per layer (qkv, QK^T, AV, output projection, 2 MLP
    matmuls) + representation layer + head. E.g. B/16 at 224: 17.56e9 (timm lists 17.58 G). A
    timm network: counted (:func:`count_forward_macs`, cached per config), e.g. Swin-T at 224:
    4.49e9 (timm lists 4.51 G).
    """
    if isinstance(cfg, TimmConfig):
        return _timm_macs(cfg)
    if isinstance(cfg, DVAEConfig):  # a tokenizer: counted like a timm network
        return _dvae_macs(cfg)
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


def train_flops_per_image(cfg: ViTConfig | TimmConfig | DVAEConfig) -> float:
    """FLOPs of one training step per image: forward + backward ~= 3 forwards, 2 FLOPs/MAC.

    Activation checkpointing re-runs the forward, but that is not useful work, so MFU
    deliberately does not count it.
    """
    return 3.0 * 2.0 * macs_per_image(cfg)
