"""Discrete image tokenizers for BEiT's masked image modelling (Bao et al. 2021, "BEiT: BERT
Pre-Training of Image Transformers"; microsoft/unilm ``beit/``).

BEiT predicts, at masked patches, the *visual token* a separate tokenizer assigns to each patch.
BEiT v1 took DALL-E's discrete VAE (Ramesh et al. 2021) as the tokenizer; its weights cannot be
downloaded here, and a user pre-training on their own domain wants a tokenizer fitted to their
data anyway, so the pipeline trains one: :class:`DiscreteVAE`, a convolutional dVAE whose
encoder maps every ``patch_size`` x ``patch_size`` patch to logits over a ``vocab_size``
codebook, relaxed with Gumbel-softmax during training (temperature annealed by the objective),
and whose decoder reconstructs the pixels from the (soft) codes.

The seam BEiT uses is :class:`ImageTokenizer`: ``vocab_size``, ``patch_size``, ``image_size``
(what it was trained at) and ``tokenize(images) -> (B, N) int64`` (row-major patch grid, the
same order as the ViT's patch tokens and ``pipeline.masking``). BEiT v2's VQ-KD tokenizer
(tokens distilled from a teacher's features) is another implementation of the same protocol.

Shape legend: B batch, C channels, H x W image, h x w = H/p x W/p token grid, V vocabulary,
E code embedding width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from confkit import Checker


@runtime_checkable
class ImageTokenizer(Protocol):
    """What BEiT needs from a tokenizer (see the module docstring)."""

    vocab_size: int
    patch_size: int
    image_size: int

    def tokenize(self, images: Tensor) -> Tensor:
        """(B, C, H, W) normalised images -> (B, H/p * W/p) int64 token ids, row-major."""
        ...


@dataclass(frozen=True, kw_only=True)
class DVAEConfig:
    """A dVAE tokenizer. ``vocab_size``: the codebook (BEiT v1 and DALL-E: 8192); ``patch_size`` (a
    power of two): the encoder's downsampling, one token per patch of the student's size;
    ``hidden``: the first stage's channels (doubled per stage, up to 4x); ``embed_dim``: a code's
    embedding width; ``res_blocks``: residual blocks per stage; ``image_size``: the size it is
    trained at (BEiT checks the student's against it)."""

    kind: Literal["dvae"] = "dvae"
    vocab_size: int = 8192
    patch_size: int = 16
    image_size: int = 224
    hidden: int = 64
    embed_dim: int = 256
    res_blocks: int = 1
    channels: int = 3

    def __post_init__(self) -> None:
        c = Checker(self)
        c.choice("kind", ("dvae",))
        c.int("vocab_size", ge=2)
        if c.int("patch_size", ge=2):
            c.require(self.patch_size & (self.patch_size - 1) == 0,
                      f"patch_size={self.patch_size} must be a power of two (the encoder halves the image per stage)")
        if c.int("image_size", ge=1) and isinstance(self.patch_size, int) and self.patch_size >= 1:
            c.require(self.image_size % self.patch_size == 0,
                      f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        for name in ("hidden", "embed_dim", "channels"):
            c.int(name, ge=1)
        c.int("res_blocks", ge=0)
        c.done()

    @property
    def num_classes(self) -> int:
        """No classifier head (what code written for classifiers and encoders reads)."""
        return 0

    @property
    def in_chans(self) -> int:
        """The input channels, as a ViTConfig / TimmConfig names them."""
        return self.channels

    @property
    def stages(self) -> int:
        return int(math.log2(self.patch_size))

    def widths(self) -> list[int]:
        """Channels after each downsampling stage (the decoder mirrors them)."""
        return [self.hidden * min(2 ** (i + 1), 4) for i in range(self.stages)]


@dataclass(frozen=True, kw_only=True)
class DVAESpec:
    """The experiment's model section of a tokenizer run (``model.kind="dvae"``): DVAEConfig's shape
    fields; the image size is the experiment's and a tokenizer has no classes."""

    kind: Literal["dvae"] = "dvae"
    vocab_size: int = 8192
    patch_size: int = 16
    hidden: int = 64
    embed_dim: int = 256
    res_blocks: int = 1
    channels: int = 3

    def __post_init__(self) -> None:
        self.config(num_classes=0, image_size=self.patch_size if isinstance(self.patch_size, int) else 16)

    @classmethod
    def of(cls, cfg: DVAEConfig, **fields: Any) -> DVAESpec:
        base = {name: getattr(cfg, name) for name in ("vocab_size", "patch_size", "hidden", "embed_dim",
                                                       "res_blocks", "channels")}
        return cls(**{**base, **fields})

    @property
    def slug(self) -> str:
        """Registered model names: ``dvae-v8192p16``."""
        return f"v{self.vocab_size}p{self.patch_size}"

    @property
    def variant(self) -> str:
        """What tags and descriptions call the architecture (a ViT's "B/16"): ``dvae-v8192p16``."""
        return f"dvae-{self.slug}"

    @property
    def shape(self) -> dict[str, int]:
        """The fields a student (BEiT) must agree with: ``patch_size`` and ``vocab_size``."""
        return {"patch_size": self.patch_size, "vocab_size": self.vocab_size}

    def config(self, *, num_classes: int, image_size: int) -> DVAEConfig:
        if num_classes:
            raise ValueError(f"a dVAE tokenizer has no classifier head (asked for {num_classes} classes): train it "
                             "with the tokenizer objective (train.objective.kind='dvae')")
        return DVAEConfig(vocab_size=self.vocab_size, patch_size=self.patch_size, image_size=image_size,
                          hidden=self.hidden, embed_dim=self.embed_dim, res_blocks=self.res_blocks,
                          channels=self.channels)


class _ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _stage(cin: int, cout: int, blocks: int, *, down: bool) -> nn.Sequential:
    """One resolution step: a stride-2 conv (encoder) or nearest upsample + conv (decoder), then
    residual blocks at the new size."""
    step = (nn.Conv2d(cin, cout, 4, stride=2, padding=1) if down
            else nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1)))
    return nn.Sequential(step, *[_ResBlock(cout) for _ in range(blocks)])


class Codebook(nn.Module):
    """The (V, E) code embeddings. A module of its own so that its weight is only read inside its
    own ``forward`` (ZeRO-3 gathers a partitioned parameter for its module's forward, not for a
    parent's): one-hot or soft codes (B, V, h, w) -> (B, E, h, w), or token ids (B, N) -> (B, N, E)."""

    def __init__(self, vocab_size: int, embed_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab_size, embed_dim))  # nn.Embedding's init

    def forward(self, codes: Tensor) -> Tensor:
        if not codes.dtype.is_floating_point:
            return F.embedding(codes, self.weight)
        return torch.einsum("bvhw,ve->behw", codes.to(self.weight.dtype), self.weight)


class DiscreteVAE(nn.Module):
    """The dVAE (see the module docstring). ``forward(images, tau)`` -> (reconstruction, logits);
    the objective owns the loss (reconstruction + KL to the uniform prior) and the schedules."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size, self.patch_size, self.image_size = cfg.vocab_size, cfg.patch_size, cfg.image_size
        widths = cfg.widths()
        enc: list[nn.Module] = [nn.Conv2d(cfg.channels, cfg.hidden, 3, padding=1)]
        cin = cfg.hidden
        for w in widths:
            enc.append(_stage(cin, w, cfg.res_blocks, down=True))
            cin = w
        enc += [nn.ReLU(), nn.Conv2d(cin, cfg.vocab_size, 1)]
        self.encoder = nn.Sequential(*enc)
        self.codebook = Codebook(cfg.vocab_size, cfg.embed_dim)
        dec: list[nn.Module] = [nn.Conv2d(cfg.embed_dim, widths[-1], 1)]
        cin = widths[-1]
        for w in [*reversed(widths[:-1]), cfg.hidden]:
            dec.append(_stage(cin, w, cfg.res_blocks, down=False))
            cin = w
        dec += [nn.ReLU(), nn.Conv2d(cin, cfg.channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        #: Per-token counts (V,) of the last evaluation over the whole eval split, set by the tokenizer
        #: objective (``training.objectives.dvae``) for the usage histogram; not a weight.
        self.usage_counts: Tensor | None = None

    def logits(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, V, h, w) code logits."""
        p = self.patch_size
        if images.shape[-1] % p or images.shape[-2] % p:
            raise ValueError(f"images of {tuple(images.shape[-2:])} px are not a multiple of the tokenizer's "
                             f"patch_size {p}")
        return self.encoder(images)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """(B, V, h, w) one-hot or soft codes -> (B, C, H, W) reconstruction."""
        return self.decoder(self.codebook(codes))

    def decode_tokens(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, h*w) token ids -> (B, C, H, W) reconstruction (for figures)."""
        z = self.codebook(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, *grid)  # (B, E, h, w)
        return self.decoder(z)

    def forward(self, images: Tensor, tau: float = 1.0, *, hard: bool = False,
                noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Gumbel-softmax relaxation of the codes at temperature ``tau``. ``noise``: the (B, V, h, w)
        Gumbel noise to add (the objective draws it from the step and the micro-batch's place, so
        that any number of ranks draws the same); None: drawn from the global generator."""
        logits = self.logits(images)
        if noise is None:
            codes = F.gumbel_softmax(logits.float(), tau=tau, hard=hard, dim=1)
        else:
            codes = ((logits.float() + noise) / tau).softmax(dim=1)
            if hard:  # the argmax's one-hot codes; straight-through (the soft codes' gradient) under autograd
                one_hot = F.one_hot(codes.argmax(dim=1), codes.shape[1]).permute(0, 3, 1, 2).to(codes.dtype)
                codes = one_hot - codes.detach() + codes if torch.is_grad_enabled() else one_hot
        return self.decode_codes(codes), logits

    @torch.no_grad()
    def tokenize(self, images: Tensor) -> Tensor:
        logits = self.logits(images)  # (B, V, h, w)
        return logits.argmax(dim=1).flatten(1)  # (B, h*w), row-major like the ViT's patch tokens


def codebook_usage(counts: Tensor) -> dict[str, float]:
    """From per-token counts over a dataset: ``used`` (fraction of the vocabulary used at least
    once), ``dead`` (tokens never used), ``perplexity`` (exp of the usage entropy: V when every
    token is used equally, 1 when one token takes everything)."""
    counts = counts.double()
    total = counts.sum().clamp_min(1.0)
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {"used": used / counts.numel(), "dead": float(counts.numel() - used), "perplexity": float(entropy.exp())}
