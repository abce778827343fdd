"""The Vision Transformer ("An Image is Worth 16x16 Words", Dosovitskiy et al. 2020).

``ViTConfig`` describes one network; ``VisionTransformer`` builds it; ``create_model`` /
``vit_config`` build either from a paper variant name such as ``"B/16"``.

Parameter names equal timm's ``VisionTransformer`` for the common case (``cls`` pooling,
learnt position embedding, no representation layer), so timm checkpoints load as they are
(see ``model.weights``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .layers import Block, PatchEmbed, PreLogits, layer_norm, posemb_sincos_2d
from .variants import parse_variant

Pool = Literal["cls", "gap", "avg"]
PosEmb = Literal["learn", "sincos2d"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """Hyper-parameters of one ViT; validated on construction.

    ``pool="cls"`` prepends a class token and classifies from it (the paper);
    ``pool="gap"`` has no class token and averages the normalised patch tokens
    (big_vision's ``gap``); ``pool="avg"`` keeps the class token but averages the patch tokens
    and normalises the average instead of the tokens (MAE's fine-tuning head: timm's
    ``global_pool="avg", fc_norm=True``; the LayerNorm is called ``fc_norm``). ``posemb="learn"`` is a trained (1, seq_len, D) parameter that
    also covers the class token (timm / paper layout); ``"sincos2d"`` is a fixed buffer over
    the patches only. ``representation_size`` adds the paper's pre-training tanh layer.
    ``head_bias_init=-10`` is big_vision's setting for sigmoid training on multi-label data.
    ``num_classes=0`` builds no head: ``forward`` returns pooled features.
    ``distilled=True`` is DeiT's student (Touvron et al. 2020, and timm's ``deit_*_distilled``
    layout): a distillation token after the class token, with its own position slot, read by a
    second head ``head_dist``; ``forward`` returns the mean of the two heads' logits (DeiT's
    inference), ``forward_heads`` both. It needs ``pool="cls"`` and a learnt position embedding.
    """

    image_size: int = 224
    patch_size: int = 16
    width: int
    depth: int
    heads: int
    mlp_dim: int
    num_classes: int = 1000
    in_chans: int = 3
    pool: Pool = "cls"
    posemb: PosEmb = "learn"
    representation_size: int | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    qkv_bias: bool = True
    head_bias_init: float = 0.0
    distilled: bool = False
    activation_checkpointing: bool = False
    variant: str = ""

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim", "in_chans"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0 = no head), got {self.num_classes!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
                f"use e.g. image_size={self.image_size // self.patch_size * self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.pool not in ("cls", "gap", "avg"):
            raise ValueError(f"pool must be 'cls', 'gap' or 'avg', got {self.pool!r}")
        if self.posemb not in ("learn", "sincos2d"):
            raise ValueError(f"posemb must be 'learn' or 'sincos2d', got {self.posemb!r}")
        if self.posemb == "sincos2d" and self.width % 4:
            raise ValueError(f"posemb='sincos2d' needs width divisible by 4, got width {self.width}")
        if self.representation_size is not None and (
            not isinstance(self.representation_size, int) or self.representation_size <= 0
        ):
            raise ValueError(f"representation_size must be None or a positive int, got {self.representation_size!r}")
        for name in ("dropout", "attention_dropout", "drop_path"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if self.distilled and (self.pool != "cls" or self.posemb != "learn" or self.representation_size):
            raise ValueError(
                f"distilled=True (DeiT's distillation token) needs pool='cls', posemb='learn' and no "
                f"representation_size, got pool={self.pool!r}, posemb={self.posemb!r}, "
                f"representation_size={self.representation_size!r}")

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (gh, gw) = (image_size / P, image_size / P)."""
        g = self.image_size // self.patch_size
        return (g, g)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def class_token(self) -> bool:
        """Whether the sequence starts with a class token (``pool`` "cls" or "avg")."""
        return self.pool in ("cls", "avg")

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: 1 (class token) for ``pool`` "cls" and "avg", 2 with DeiT's
        distillation token, else 0."""
        return (1 + int(self.distilled)) if self.class_token else 0

    @property
    def seq_len(self) -> int:
        """Encoder sequence length N: patches plus the class token if any."""
        return self.num_patches + self.num_prefix_tokens


def vit_config(name: str, *, num_classes: int, image_size: int = 224, **overrides: Any) -> ViTConfig:
    """``ViTConfig`` for a paper variant (``"B/16"``), with any field overridden.

    Raises ValueError for an unknown variant or field, or an invalid combination.
    """
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ViTConfig field(s) {unknown}; known: {sorted(fields)}")
    kw: dict[str, Any] = {**parse_variant(name), "variant": name, **overrides}
    return ViTConfig(num_classes=num_classes, image_size=image_size, **kw)


def create_model(name: str, *, num_classes: int, image_size: int = 224, **overrides: Any) -> VisionTransformer:
    """Build a freshly initialised ``VisionTransformer`` from a variant name (``"S/16"``).

    Under ``with torch.device("meta"):`` nothing is allocated (for counting parameters or
    for ZeRO-3 style deferred materialisation: ``model.to_empty(device=d); model.init_weights()``).
    """
    return VisionTransformer(vit_config(name, num_classes=num_classes, image_size=image_size, **overrides))


class VisionTransformer(nn.Module):
    """ViT: patch embedding -> [cls] + position embedding -> pre-norm encoder -> norm -> head.

    Input (B, in_chans, image_size, image_size); output logits (B, num_classes).
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.grad_checkpointing = cfg.activation_checkpointing
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.distilled else None
        if cfg.posemb == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_len, D))  # covers the cls (and dist) slots
        else:
            # Persistent so checkpoints carry it (timm with no_embed_class=True loads it as is).
            self.register_buffer("pos_embed", posemb_sincos_2d(cfg.grid, D), persistent=True)  # (1, N_p, D)
        self.pos_drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear rule (DeiT)
        self.blocks = nn.Sequential(
            *(
                Block(D, cfg.heads, cfg.mlp_dim, qkv_bias=cfg.qkv_bias, dropout=cfg.dropout,
                      attention_dropout=cfg.attention_dropout, drop_path=p)
                for p in dpr
            )
        )
        # pool="avg" normalises the pooled patch tokens (fc_norm), not the tokens (norm).
        self.norm: nn.Module = nn.Identity() if cfg.pool == "avg" else layer_norm(D)
        self.fc_norm: nn.Module = layer_norm(D) if cfg.pool == "avg" else nn.Identity()
        rep = cfg.representation_size
        self.pre_logits: nn.Module = PreLogits(D, rep) if rep else nn.Identity()
        self.head: nn.Module = self._new_head(cfg.num_classes)
        if cfg.distilled:  # registered only when distilled: the state dict of a plain ViT is unchanged
            self.head_dist: nn.Module = self._new_head(cfg.num_classes)
        self.init_weights()

    def _new_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.cfg.representation_size or self.cfg.width, num_classes) if num_classes else nn.Identity()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter as big_vision / the paper code does.

        Patch embedding lecun-normal; q, k, v, proj and MLP kernels xavier-uniform (MLP
        biases normal(1e-6)); learnt position embedding normal(0.02); class token zero;
        head weight zero with bias ``head_bias_init``. Also recomputes the sincos buffer, so
        a model built on the meta device can be ``to_empty(device=...)``-ed and initialised.
        """
        cfg = self.cfg
        self.patch_embed.init_weights()
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        if self.dist_token is not None:  # DeiT: trunc_normal(std=0.02)
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        if cfg.posemb == "learn":
            nn.init.normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed.copy_(posemb_sincos_2d(cfg.grid, cfg.width))
        for blk in self.blocks:
            blk.init_weights()
        for norm in (self.norm, self.fc_norm):
            if isinstance(norm, nn.LayerNorm):
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
        if isinstance(self.pre_logits, PreLogits):
            self.pre_logits.init_weights()
        self._init_head()

    def _heads(self) -> list[nn.Module]:
        return [self.head, self.head_dist] if self.cfg.distilled else [self.head]

    @torch.no_grad()
    def _init_head(self) -> None:
        for head in self._heads():
            if isinstance(head, nn.Linear):
                nn.init.zeros_(head.weight)
                nn.init.constant_(head.bias, self.cfg.head_bias_init)

    # -- public API --------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Names (as in ``named_parameters()``) to exclude from weight decay.

        Position embedding, class (and distillation) token, every bias and every LayerNorm parameter.
        """
        out = set()
        for name, p in self.named_parameters():
            if name in ("pos_embed", "cls_token", "dist_token") or name.endswith(".bias") or p.ndim <= 1:
                out.add(name)
        return out

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh zero-initialised one (fine-tuning); updates ``cfg``.

        The representation layer, if any, is kept; drop it by building a new config with
        ``representation_size=None`` and loading with ``ignore_head=True`` (the paper's recipe).
        """
        p = next(self.parameters())
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes)
        self.head = self._new_head(num_classes).to(device=p.device, dtype=p.dtype)
        if self.cfg.distilled:
            self.head_dist = self._new_head(num_classes).to(device=p.device, dtype=p.dtype)
        self._init_head()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (saves memory, ~1/3 more compute)."""
        self.grad_checkpointing = enable
        self.cfg = dataclasses.replace(self.cfg, activation_checkpointing=enable)

    def _check_input(self, x: Tensor) -> None:
        cfg = self.cfg
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, {cfg.in_chans}, H, W), got {tuple(x.shape)}")
        if x.shape[1] != cfg.in_chans:
            raise ValueError(
                f"expected {cfg.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)}); "
                f"convert the images or build the model with in_chans={x.shape[1]}"
            )
        if x.shape[2] != cfg.image_size or x.shape[3] != cfg.image_size:
            raise ValueError(
                f"expected {cfg.image_size}x{cfg.image_size} images, got {x.shape[2]}x{x.shape[3]}; "
                f"resize them, or build the model with image_size={x.shape[2]} and load the "
                "checkpoint with model.weights.load_weights (it resamples the position embedding)"
            )

    def _embed(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Patch tokens plus position, only those in ``keep`` (B, K) if given, class token first."""
        self._check_input(x)
        x = self.patch_embed(x)  # (B, N_p, D)
        pos, cls = self.pos_embed, self.cls_token  # learn: (1, N, D) with the cls (and dist) slots first
        if self.dist_token is not None:  # DeiT: [cls, dist] + their two position slots
            cls = torch.cat([cls, self.dist_token], dim=1)  # (1, 2, D)
        n = self.cfg.num_prefix_tokens
        if self.cfg.posemb == "learn" and cls is not None:
            cls, pos = cls + pos[:, :n], pos[:, n:]
        x = x + pos  # sincos2d covers the patches only (big_vision): the cls token gets no position
        if keep is not None:  # MAE: the encoder sees the visible patches only
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, D)
        if cls is not None:
            x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)  # (B, prefix + N_p or K, D)
        return self.pos_drop(x)

    def forward_features(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W) -> token features (B, N, D) after the final LayerNorm (none for
        ``pool="avg"``). ``keep`` (B, K) int64 patch indices: encode only those patches (MAE's
        visible set), giving (B, prefix + K, D)."""
        x = self._embed(x, keep)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, feats: Tensor, pre_logits: bool = False) -> Tensor:
        """Token features (B, N, D) -> logits (B, num_classes).

        With ``pre_logits=True`` returns the pooled representation (B, R or D) the head
        would see (after the tanh layer if any): the input of a linear probe. A distilled model
        returns the mean of its two heads' logits (DeiT's prediction), or of the two tokens.
        """
        if self.cfg.distilled:
            cls_logits, dist_logits = self._two_heads(feats, pre_logits)
            return (cls_logits + dist_logits) / 2
        if self.cfg.pool == "cls":
            x = feats[:, 0]  # (B, D)
        else:  # gap / avg: the patch tokens' mean
            x = self.fc_norm(feats[:, self.cfg.num_prefix_tokens:].mean(dim=1))
        x = self.pre_logits(x)
        return x if pre_logits else self.head(x)

    def _two_heads(self, feats: Tensor, pre_logits: bool = False) -> tuple[Tensor, Tensor]:
        x, x_dist = feats[:, 0], feats[:, 1]  # (B, D) each: the class and distillation tokens
        if pre_logits:
            return x, x_dist
        return self.head(x), self.head_dist(x_dist)

    def forward_heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """A distilled model's (class-head logits, distillation-head logits), each (B, num_classes):
        what DeiT's distillation loss trains (``training.objectives.distill``)."""
        if not self.cfg.distilled:
            raise ValueError("forward_heads needs a distilled model (ViTConfig(distilled=True): DeiT's "
                             "distillation token and head); this one has a single head: call forward")
        return self._two_heads(self.forward_features(x))

    def forward(self, x: Tensor, *, both_heads: bool = False) -> Tensor:
        """Logits (B, num_classes) (a distilled model's: the mean of its two heads). ``both_heads``:
        :meth:`forward_heads` instead, through ``__call__``, so that a wrapper's forward (DeepSpeed's
        engine: ZeRO-3 gathers, torch.compile) runs it as it runs any forward."""
        if both_heads:
            return self.forward_heads(x)  # type: ignore[return-value]
        return self.forward_head(self.forward_features(x))

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits plus every layer's attention probabilities, each (B, heads, N, N).

        Uses explicit softmax(QK^T / sqrt(d)) instead of SDPA (slower, O(N^2) memory);
        the logits equal ``forward``'s up to float rounding. For visualisation only.
        """
        x = self._embed(x)
        attns = []
        for blk in self.blocks:
            x, a = blk.forward_with_weights(x)
            attns.append(a)
        return self.forward_head(self.norm(x)), attns
