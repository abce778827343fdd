"""Building blocks of the ViT encoder.

Module and parameter names follow timm's ``vision_transformer.py`` (``patch_embed.proj``,
``blocks.i.attn.qkv``, ``blocks.i.mlp.fc1`` ...), so moving weights between the two is a
rename-free copy. Numerics follow timm too (exact-erf GELU, LayerNorm eps 1e-6), so the
same weights give the same logits. Initialisation follows big_vision / the ViT paper code.

Shape legend: B batch, N tokens (patches + prefix), D width, h heads, d = D / h.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LN_EPS = 1e-6  # big_vision / flax default, and timm's ViT; torch's default is 1e-5.


def layer_norm(dim: int) -> nn.LayerNorm:
    """LayerNorm with the ViT epsilon (1e-6)."""
    return nn.LayerNorm(dim, eps=LN_EPS)


@torch.no_grad()
def lecun_normal_(w: Tensor) -> Tensor:
    """flax ``lecun_normal``: truncated normal (±2 std) with variance 1/fan_in.

    The 0.8796 factor undoes the variance lost by truncating at two standard deviations,
    as jax's ``variance_scaling(1.0, "fan_in", "truncated_normal")`` does.
    """
    fan_in = w[0].numel()  # (out, in, *kernel) -> in * prod(kernel)
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


@torch.no_grad()
def xavier_uniform_chunks_(w: Tensor, chunks: int) -> Tensor:
    """Xavier-uniform init of a fused projection as ``chunks`` separate matrices.

    big_vision / flax initialise q, k and v as three (D, D) kernels; a fused (3D, D) qkv
    weight initialised as one matrix would get a smaller bound (fan_out 3D instead of D).
    """
    out, fan_in = w.shape
    bound = math.sqrt(6.0 / (out // chunks + fan_in))
    return w.uniform_(-bound, bound)


def posemb_sincos_2d(grid: tuple[int, int], width: int, temperature: float = 10_000.0) -> Tensor:
    """Fixed 2-D sin-cos position embedding, big_vision ``posemb_sincos_2d``.

    Returns (1, gh*gw, width) float32, row-major over the grid (the patch order of
    ``PatchEmbed``). Channel layout: [sin(x), cos(x), sin(y), cos(y)], each width/4 wide.
    """
    gh, gw = grid
    if width % 4:
        raise ValueError(f"width {width} must be divisible by 4 for posemb='sincos2d'")
    y, x = torch.meshgrid(
        torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij"
    )
    q = width // 4
    omega = torch.arange(q, dtype=torch.float32) / max(q - 1, 1)
    omega = 1.0 / temperature**omega  # (q,)
    ys = y.flatten()[:, None] * omega[None]  # (gh*gw, q)
    xs = x.flatten()[:, None] * omega[None]
    pe = torch.cat([xs.sin(), xs.cos(), ys.sin(), ys.cos()], dim=1)  # (gh*gw, width)
    return pe[None]


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the survivors."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Non-overlapping PxP patches -> linear embedding (a strided conv, as in the paper)."""

    def __init__(self, patch_size: int, in_chans: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), row-major patch order

    @torch.no_grad()
    def init_weights(self) -> None:
        lecun_normal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm's weight layout).

    ``forward`` uses ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on
    GPU, a fused kernel on CPU); ``forward_with_weights`` materialises the (B, h, N, N)
    softmax for visualisation and must give the same output.
    """

    def __init__(self, width: int, heads: int, *, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, D = x.shape
        # (B, N, 3D) -> (3, B, h, N, d): views only; SDPA accepts the strides as they are.
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = self._qkv(x)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        o = o.transpose(1, 2).reshape(B, N, D)  # (B, h, N, d) -> (B, N, D)
        return self.proj_drop(self.proj(o))

    def forward_with_weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Same output as ``forward`` plus the attention probabilities (B, h, N, N)."""
        B, N, D = x.shape
        q, k, v = self._qkv(x)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, N, N)
        p = F.dropout(attn, self.attn_drop, self.training) if self.attn_drop > 0 else attn
        o = (p @ v).transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(o)), attn

    @torch.no_grad()
    def init_weights(self) -> None:
        xavier_uniform_chunks_(self.qkv.weight, 3)
        nn.init.xavier_uniform_(self.proj.weight)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)


class Mlp(nn.Module):
    """Transformer MLP: Linear -> GELU -> Dropout -> Linear -> Dropout.

    GELU is the exact (erf) form, as timm and torch; flax's ``nn.gelu`` default is the tanh
    approximation (relative difference < 1e-3), so JAX checkpoints shift logits slightly.
    """

    def __init__(self, width: int, mlp_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))  # (B, N, mlp_dim)
        return self.drop(self.fc2(x))  # (B, N, D)

    @torch.no_grad()
    def init_weights(self) -> None:
        # big_vision MlpBlock: xavier_uniform kernels, normal(1e-6) biases.
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)


class Block(nn.Module):
    """Pre-norm encoder block: x + Attn(LN(x)), then x + MLP(LN(x)) (paper eq. 2-3)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, *, qkv_bias: bool = True, dropout: float = 0.0,
                 attention_dropout: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = layer_norm(width)
        self.attn = Attention(width, heads, qkv_bias=qkv_bias, attn_drop=attention_dropout, proj_drop=dropout)
        self.norm2 = layer_norm(width)
        self.mlp = Mlp(width, mlp_dim, drop=dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))  # (B, N, D)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward_with_weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``forward`` that also returns this block's attention probabilities (B, h, N, N)."""
        y, attn = self.attn.forward_with_weights(self.norm1(x))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x))), attn

    @torch.no_grad()
    def init_weights(self) -> None:
        for n in (self.norm1, self.norm2):
            nn.init.ones_(n.weight)
            nn.init.zeros_(n.bias)
        self.attn.init_weights()
        self.mlp.init_weights()


class PreLogits(nn.Module):
    """The paper's pre-training "representation" layer: Linear(D, R) -> tanh.

    Named ``pre_logits.fc`` like timm < 0.6 and the JAX-converted checkpoints.
    """

    def __init__(self, width: int, size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, size)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc(x))  # (B, R)

    @torch.no_grad()
    def init_weights(self) -> None:
        lecun_normal_(self.fc.weight)  # flax Dense default
        nn.init.zeros_(self.fc.bias)
