"""``ViTSpec``: the model section of an experiment, typed (no free-form dict of overrides).

A spec names a paper variant (``"B/16"``) and the ViTConfig fields a recipe chooses (dropout,
pooling, the pre-training representation layer, a custom shape). What the spec cannot know,
the image size (the experiment's) and the number of classes (the dataset's), is supplied when
the network is built: ``spec.config(num_classes=..., image_size=...)``. Other architectures
(timm's zoo) get a spec of their own with ``kind`` telling them apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from confkit import Checker

from .variants import parse_variant
from .vit import Pool, PosEmb, ViTConfig


@dataclass(frozen=True, kw_only=True)
class ViTSpec:
    """Our ViT: ``variant`` gives width/depth/heads/mlp_dim/patch_size; a non-None shape field
    replaces the variant's (a custom size for a scaling study). The rest are ViTConfig's fields,
    with the same meaning and defaults."""

    kind: Literal["vit"] = "vit"
    variant: str = "B/16"
    patch_size: int | None = None
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    mlp_dim: int | None = None
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

    def __post_init__(self) -> None:
        c = Checker(self)
        c.choice("kind", ("vit",))
        try:
            parse_variant(self.variant)
        except ValueError as e:
            c.fail(f"variant={self.variant!r}: {e}")
        for name in ("patch_size", "width", "depth", "heads", "mlp_dim", "representation_size"):
            c.int(name, ge=1, optional=True)
        c.int("in_chans", ge=1)
        c.choice("pool", ("cls", "gap", "avg"))
        c.choice("posemb", ("learn", "sincos2d"))
        for name in ("dropout", "attention_dropout", "drop_path"):
            c.number(name, ge=0, lt=1)
        c.flag("qkv_bias")
        c.number("head_bias_init")
        if c.flag("distilled") and self.distilled:
            c.require(self.pool == "cls" and self.posemb == "learn" and not self.representation_size,
                      f"distilled=True (DeiT's distillation token) needs pool='cls', posemb='learn' and no "
                      f"representation_size, got pool={self.pool!r}, posemb={self.posemb!r}, "
                      f"representation_size={self.representation_size!r}")
        c.done()

    @property
    def shape(self) -> dict[str, int]:
        """width, depth, heads, mlp_dim and patch_size: the variant's, with this spec's replacements."""
        out = parse_variant(self.variant)
        for name in ("patch_size", "width", "depth", "heads", "mlp_dim"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def of(cls, cfg: ViTConfig, **fields: Any) -> ViTSpec:
        """The spec that rebuilds ``cfg``'s architecture (its shape spelled out), with ``fields``
        replaced (e.g. a fine-tune's new head and regularisation)."""
        variant = cfg.variant or f"B/{cfg.patch_size}"
        size = variant.split("/")[0]
        base = {name: getattr(cfg, name) for name in (
            "patch_size", "width", "depth", "heads", "mlp_dim", "in_chans", "pool", "posemb", "representation_size",
            "dropout", "attention_dropout", "drop_path", "qkv_bias", "head_bias_init", "distilled")}
        return cls(variant=f"{size}/{cfg.patch_size}", **{**base, **fields})

    @property
    def slug(self) -> str:
        """``"B/16" -> "b16"``, ``"mu/4" -> "mu4"`` (registered model names)."""
        return self.variant.replace("/", "").lower()

    def config(self, *, num_classes: int, image_size: int) -> ViTConfig:
        """The ViTConfig of this spec for a dataset with ``num_classes`` labels at ``image_size``
        (ValueError for a combination that cannot be built, e.g. image_size % patch_size)."""
        return ViTConfig(
            image_size=image_size, num_classes=num_classes, variant=self.variant, **self.shape,
            in_chans=self.in_chans, pool=self.pool, posemb=self.posemb, representation_size=self.representation_size,
            dropout=self.dropout, attention_dropout=self.attention_dropout, drop_path=self.drop_path,
            qkv_bias=self.qkv_bias, head_bias_init=self.head_bias_init, distilled=self.distilled,
        )
