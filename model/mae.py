"""MAE: masked autoencoder pre-training of our ViT (He et al. 2021, "Masked Autoencoders Are
Scalable Vision Learners"; facebookresearch/mae ``models_mae.py``).

The encoder is a plain :class:`~model.vit.VisionTransformer` (class token, fixed 2-D sin-cos
position embedding, no head) that sees only the visible patches; a light decoder gets the
encoded visible tokens back in place among learnt mask tokens, adds its own fixed position
embedding, and predicts every patch's pixels. The loss is the mean squared error on the masked
patches only, against per-patch normalised pixels by default (``norm_pix_loss``).

Which patches are masked is *given* (a (B, N) bool tensor, True = masked), not drawn here: the
data pipeline draws it per sample from the sample's own seed (``pipeline.masking``), so a batch
gets the same masks on 1 or 64 ranks and after a resume, and the same module serves MAE's
random masking and BEiT's blockwise masking. Every row must mask the same number of patches
(MAE's fixed ratio): the visible tokens of a batch are one dense (B, K, D) tensor.

Shape legend: B batch, N patches, K visible patches, D encoder width, E decoder width,
P = patch_size**2 * channels pixel values per patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from confkit import Checker

from .layers import Block, layer_norm, posemb_sincos_2d
from .vit import VisionTransformer


@dataclass(frozen=True, kw_only=True)
class MAEDecoderConfig:
    """The decoder (MAE's defaults: 8 blocks of width 512, 16 heads, MLP ratio 4, for B, L and H)."""

    width: int = 512
    depth: int = 8
    heads: int = 16
    mlp_dim: int = 2048

    def __post_init__(self) -> None:
        c = Checker(self)
        for name in ("width", "depth", "heads", "mlp_dim"):
            c.int(name, ge=1)
        if isinstance(self.width, int) and isinstance(self.heads, int) and self.heads >= 1:
            c.require(self.width % self.heads == 0, f"width {self.width} is not divisible by heads {self.heads}")
            c.require(self.width % 4 == 0, f"width {self.width} must be divisible by 4 (2-D sin-cos position "
                                           "embedding)")
        c.done()


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches row-major, pixels (row, column, channel) within a
    patch (MAE's ``patchify``)."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches: Tensor, patch_size: int, channels: int = 3) -> Tensor:
    """Inverse of :func:`patchify`: (B, N, p*p*C) -> (B, C, H, W) for a square grid."""
    B, N, _ = patches.shape
    g, p = int(round(N**0.5)), patch_size
    x = patches.reshape(B, g, g, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, g * p, g * p)


def mask_order(mask: Tensor) -> tuple[Tensor, Tensor, int]:
    """(keep (B, K) visible patch indices in position order, restore (B, N) the permutation that
    puts [visible..., masked...] back in position order, K). Raises when rows mask different
    numbers of patches or a row masks everything."""
    counts = mask.sum(1)
    if (counts != counts[0]).any():
        raise ValueError(f"every sample must mask the same number of patches, got {sorted(set(counts.tolist()))}")
    n_visible = mask.shape[1] - int(counts[0])
    if n_visible < 1:
        raise ValueError("the mask leaves no visible patch")
    shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible first, each group in order
    restore = torch.argsort(shuffle, dim=1)
    return shuffle[:, :n_visible], restore, n_visible


class MaskedAutoencoder(nn.Module):
    """MAE around ``encoder``: ``forward(images, mask) -> (loss, pred)``.

    ``encoder`` must have a class token, ``posemb="sincos2d"`` and no head (``num_classes=0``),
    as MAE's. ``pred`` (B, N, P) is the decoder's pixel prediction of every patch (in the
    normalised-pixel space when ``norm_pix_loss``).
    """

    def __init__(self, encoder: VisionTransformer, decoder: MAEDecoderConfig, *, norm_pix_loss: bool = True) -> None:
        super().__init__()
        cfg = encoder.cfg
        if cfg.pool != "cls" or cfg.posemb != "sincos2d" or cfg.num_classes != 0:
            raise ValueError(f"an MAE encoder needs pool='cls', posemb='sincos2d' and num_classes=0 (got pool="
                             f"{cfg.pool!r}, posemb={cfg.posemb!r}, num_classes={cfg.num_classes})")
        self.encoder = encoder
        self.decoder_cfg = decoder
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = cfg.patch_size
        E = decoder.width
        self.decoder_embed = nn.Linear(cfg.width, E)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, E))
        # Fixed, like the encoder's; the class token's position is zero (MAE's cls_token=True layout).
        pos = torch.cat([torch.zeros(1, 1, E), posemb_sincos_2d(cfg.grid, E)], dim=1)  # (1, 1 + N, E)
        self.register_buffer("decoder_pos_embed", pos, persistent=True)
        self.decoder_blocks = nn.ModuleList(
            Block(E, decoder.heads, decoder.mlp_dim, qkv_bias=True) for _ in range(decoder.depth))
        self.decoder_norm = layer_norm(E)
        self.decoder_pred = nn.Linear(E, cfg.patch_size**2 * cfg.in_chans)
        self.init_decoder()

    @torch.no_grad()
    def init_decoder(self) -> None:
        """MAE's initialisation of the decoder: mask token normal(0.02), Linear xavier-uniform
        with zero bias, LayerNorm (1, 0); the encoder keeps its own (``VisionTransformer.init_weights``)."""
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules(), self.decoder_norm]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.decoder_pos_embed[:, 1:].copy_(posemb_sincos_2d(self.encoder.cfg.grid, self.decoder_cfg.width))

    def no_weight_decay(self) -> set[str]:
        """The encoder's (position embedding, class token, biases, norms) plus the mask token,
        the decoder's biases and norms."""
        out = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        for name, p in self.named_parameters():
            if not name.startswith("encoder.") and (name == "mask_token" or name.endswith(".bias") or p.ndim <= 1):
                out.add(name)
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def decode(self, latent: Tensor, restore: Tensor) -> Tensor:
        """Encoded [cls, visible...] tokens (B, 1 + K, D) -> pixel predictions of every patch (B, N, P)."""
        x = self.decoder_embed(latent)  # (B, 1 + K, E)
        B, N = restore.shape
        masked = self.mask_token.expand(B, N - (x.shape[1] - 1), -1)  # (B, N - K, E)
        x_ = torch.cat([x[:, 1:], masked], dim=1)  # [visible..., masked...]
        x_ = torch.gather(x_, 1, restore[..., None].expand(-1, -1, x.shape[-1]))  # back in position order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1 + N, E)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, N, P): the class token's row dropped

    def target(self, images: Tensor) -> Tensor:
        """The pixels to predict, (B, N, P): per-patch normalised when ``norm_pix_loss`` (MAE:
        mean and unbiased variance over the patch's values, eps 1e-6)."""
        t = patchify(images.float(), self.patch_size)
        if self.norm_pix_loss:
            mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1.0e-6) ** 0.5
        return t

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(mean squared error over the masked patches, predictions (B, N, P))."""
        keep, restore, _ = mask_order(mask)
        latent = self.encoder.forward_features(images, keep=keep)  # (B, 1 + K, D)
        pred = self.decode(latent, restore)
        per_patch = ((pred.float() - self.target(images)) ** 2).mean(dim=-1)  # (B, N)
        m = mask.to(per_patch.dtype)
        return (per_patch * m).sum() / m.sum(), pred
