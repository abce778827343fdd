"""timm's model zoo as the second kind of model: the ViT family's other members and convnet teachers.

Our own ``VisionTransformer`` stays the paper's model; the architectures that followed it come
from timm (the library our parity tests already use as the reference) instead of being
rewritten: DeiT (timm's ``VisionTransformer``), Swin, PVT-v2, CaiT, BEiT, and ResNet / RegNetY
(DeiT's convnet teachers). :class:`TimmSpec` is the experiment's model section for them
(``kind="timm"``; typed shape overrides, no free-form dict), :class:`TimmConfig` the built
network's config (what ``model.cfg`` of a timm network is, what the registry's ``config.json``
holds, with the timm version that built it).

Never a hub download: networks are created with ``pretrained=False``, names with a pretrained
tag (``.augreg_in21k``) or a hub prefix (``hf-hub:``) are refused, and weights come from local
files or the registry (``model.zoo_weights``). timm is imported lazily, so ``import model`` stays
cheap for ViT-only runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from torch import nn

from confkit import Checker

#: The timm release these adapters are tested with (pyproject pins it; docs/design.md, convention 15).
TESTED_TIMM = "1.0.31"

#: Shape fields of a spec, each mapped per family to a timm keyword argument.
SHAPE_FIELDS = ("patch_size", "embed_dim", "depths", "num_heads", "mlp_ratio", "window_size", "class_depth",
                "sr_ratios")


@dataclass(frozen=True)
class Family:
    """How one timm architecture family is driven: which timm modules define its names, which of
    our shape fields it takes (and as which keyword), and what it supports."""

    key: str
    title: str  # for messages and docs: "Swin (Liu et al. 2021)"
    example: str  # a timm name of the family
    modules: tuple[str, ...]  # timm.models.<module> defining the family's entrypoints
    kwargs: Mapping[str, str]  # our shape field -> timm keyword
    scalar: frozenset[str] = frozenset()  # tuple fields timm takes as one value (given as a 1-tuple here)
    img_size: bool = True  # the constructor takes img_size (position embeddings / windows depend on it)
    patch_grid: bool = True  # non-overlapping patches: image_size must be a multiple of the patch size
    class_token: bool = False  # a global class token (attention maps and rollout)


_COLUMNAR = {"patch_size": "patch_size", "embed_dim": "embed_dim", "depths": "depth", "num_heads": "num_heads",
             "mlp_ratio": "mlp_ratio"}
_ONE = frozenset({"embed_dim", "depths", "num_heads"})

FAMILIES: tuple[Family, ...] = (
    Family("vit", "ViT / DeiT (Dosovitskiy et al. 2020; Touvron et al. 2021)", "deit_tiny_patch16_224",
           ("vision_transformer", "deit"), _COLUMNAR, _ONE, class_token=True),
    Family("cait", "CaiT (Touvron et al. 2021, class-attention and LayerScale)", "cait_xxs24_224", ("cait",),
           {**_COLUMNAR, "class_depth": "depth_token_only"}, _ONE, class_token=True),
    Family("beit", "BEiT (Bao et al. 2021, relative position bias and LayerScale)", "beit_base_patch16_224",
           ("beit",), _COLUMNAR, _ONE, class_token=True),
    Family("swin", "Swin (Liu et al. 2021, shifted windows)", "swin_tiny_patch4_window7_224", ("swin_transformer",),
           {"patch_size": "patch_size", "embed_dim": "embed_dim", "depths": "depths", "num_heads": "num_heads",
            "window_size": "window_size", "mlp_ratio": "mlp_ratio"}, frozenset({"embed_dim"})),
    Family("pvt_v2", "PVT-v2 (Wang et al. 2022, pyramid)", "pvt_v2_b0", ("pvt_v2",),
           {"embed_dim": "embed_dims", "depths": "depths", "num_heads": "num_heads", "mlp_ratio": "mlp_ratios",
            "sr_ratios": "sr_ratios"}, img_size=False, patch_grid=False),
    Family("resnet", "ResNet (He et al. 2016)", "resnet50", ("resnet",), {"depths": "layers"}, img_size=False,
           patch_grid=False),
    Family("regnet", "RegNetY (Radosavovic et al. 2020)", "regnety_016", ("regnet",), {}, img_size=False,
           patch_grid=False),
)
_BY_MODULE = {m: f for f in FAMILIES for m in f.modules}


@functools.cache
def _timm_module(name: str) -> str:
    import timm.models

    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def name_problem(name: Any) -> str | None:
    """Why ``name`` is not a timm architecture we build (None: it is one). An unknown name lists
    the closest timm names; a pretrained tag or hub name is refused (we never download)."""
    import timm

    if not isinstance(name, str) or not name:
        return f"name={name!r} must be a timm model name, e.g. {', '.join(f.example for f in FAMILIES[:3])}"
    if ":" in name or "/" in name:
        return (f"name={name!r}: a hub name; vitscale never downloads models: use the architecture's timm name "
                "and load weights from a local file or the registry (finetune.py --from)")
    if "." in name:
        return (f"name={name!r}: {name.split('.', 1)[1]!r} is a pretrained-weights tag; vitscale builds timm models "
                f"without hub weights (pretrained=False): use name={name.split('.', 1)[0]!r} and load weights from "
                "a local file or the registry (finetune.py --from)")
    if not timm.models.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        return (f"name={name!r} is not a timm {timm.__version__} model; {hint}(python -c \"import timm; "
                f"print(timm.list_models('*{name.split('_')[0]}*'))\" lists a family's names)")
    module = _timm_module(name)
    if module not in _BY_MODULE:
        return (f"name={name!r} is timm's {module} family, which vitscale does not drive (yet); supported: "
                + "; ".join(f"{f.title} e.g. {f.example}" for f in FAMILIES))
    return None


def family_of(name: str) -> Family:
    """The family of a valid timm ``name`` (ValueError naming the problem otherwise)."""
    problem = name_problem(name)
    if problem:
        raise ValueError(problem)
    return _BY_MODULE[_timm_module(name)]


@dataclass(frozen=True, kw_only=True)
class TimmArch:
    """The architecture: a timm model name and typed overrides of its shape (empty / None: the named
    model's own). Which fields a family takes (others are refused):

    * ViT/DeiT, CaiT, BEiT: ``patch_size``, ``embed_dim`` (one value), ``depths`` (one value: the
      depth), ``num_heads`` (one value), ``mlp_ratio``; CaiT also ``class_depth`` (its
      class-attention layers, ``depth_token_only``);
    * Swin: ``patch_size``, ``embed_dim`` (one value: the first stage's width), ``depths`` and
      ``num_heads`` (per stage), ``window_size``, ``mlp_ratio``;
    * PVT-v2: ``embed_dim``, ``depths``, ``num_heads``, ``sr_ratios`` (per stage), ``mlp_ratio``;
    * ResNet: ``depths`` (blocks per stage, timm's ``layers``); RegNetY: none.

    ``dropout`` is timm's ``drop_rate`` (before the head), ``drop_path`` its stochastic depth.
    """

    name: str = "deit_tiny_patch16_224"
    in_chans: int = 3
    patch_size: int | None = None
    embed_dim: tuple[int, ...] = ()
    depths: tuple[int, ...] = ()
    num_heads: tuple[int, ...] = ()
    mlp_ratio: float | None = None
    window_size: int | None = None
    class_depth: int | None = None
    sr_ratios: tuple[int, ...] = ()
    dropout: float = 0.0
    drop_path: float = 0.0

    def _check_arch(self, c: Checker) -> Family | None:
        c.int("in_chans", ge=1)
        for name in ("patch_size", "window_size", "class_depth"):
            c.int(name, ge=1, optional=True)
        for name in ("embed_dim", "depths", "num_heads", "sr_ratios"):
            v = getattr(self, name)
            c.require(isinstance(v, tuple) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                                                   for x in v),
                      f"{name}={v!r} must be ints >= 1 (e.g. 2,2,6,2), or empty for the named model's own")
        c.number("mlp_ratio", gt=0, optional=True)
        for name in ("dropout", "drop_path"):
            c.number(name, ge=0, lt=1)
        problem = name_problem(self.name)
        if problem:
            c.fail(problem)
            return None
        fam = family_of(self.name)
        takes = [f for f in SHAPE_FIELDS if f in fam.kwargs]
        for f in SHAPE_FIELDS:
            v = getattr(self, f)
            if v in (None, ()):
                continue
            if f not in fam.kwargs:
                c.fail(f"{f}={v!r}: {self.name} is a {fam.title} model, which takes no {f}; its shape fields: "
                       f"{', '.join(takes) or 'none (choose another named size)'}")
            elif f in fam.scalar and len(v) != 1:
                c.fail(f"{f}={v!r}: {fam.title} takes one value for {f}"
                       + (" (the first stage's width; each later stage doubles it)" if fam.key == "swin" else ""))
        stages = {f: len(getattr(self, f)) for f in ("embed_dim", "depths", "num_heads", "sr_ratios")
                  if f in fam.kwargs and f not in fam.scalar and getattr(self, f)}
        if len(set(stages.values())) > 1:
            c.fail(f"{', '.join(f'{k}={getattr(self, k)!r}' for k in stages)}: give the same number of stages "
                   f"to each ({fam.title})")
        return fam

    @property
    def family(self) -> Family:
        return family_of(self.name)

    def arch_fields(self) -> dict[str, Any]:
        """The architecture fields by name (what a fine-tune keeps from its source)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TimmArch)}

    def shape_kwargs(self) -> dict[str, Any]:
        """timm keyword arguments of the shape overrides and regularisation (no size, no classes)."""
        fam = self.family
        kw: dict[str, Any] = {}
        for f, kwarg in fam.kwargs.items():
            v = getattr(self, f)
            if v in (None, ()):
                continue
            kw[kwarg] = v[0] if f in fam.scalar else v
        if fam.key == "pvt_v2" and self.mlp_ratio is not None:  # one ratio per stage in timm
            kw["mlp_ratios"] = (self.mlp_ratio,) * (len(self.depths) or 4)
        kw["drop_rate"] = self.dropout
        kw["drop_path_rate"] = self.drop_path
        return kw


@dataclass(frozen=True, kw_only=True)
class TimmSpec(TimmArch):
    """The experiment's model section for a timm architecture (``kind="timm"``); see :class:`TimmArch`.

    ``spec.config(num_classes=..., image_size=...)`` gives the network's :class:`TimmConfig` and
    checks that the architecture can take that image size (a forward on the meta device: nothing
    is allocated), so a bad size is refused before Ray starts.
    """

    kind: Literal["timm"] = "timm"

    def __post_init__(self) -> None:
        c = Checker(self)
        c.choice("kind", ("timm",))
        self._check_arch(c)
        c.done()

    @property
    def variant(self) -> str:
        """The label tags, registry descriptions and studies use: the timm name."""
        return self.name

    @property
    def slug(self) -> str:
        """Registered model names: the timm name (letters, digits and ``_``)."""
        return self.name

    @classmethod
    def of(cls, cfg: TimmConfig, **fields: Any) -> TimmSpec:
        """The spec that rebuilds ``cfg``'s architecture, with ``fields`` replaced (a fine-tune's
        regularisation, a Swin's window size)."""
        return cls(**{**cfg.arch_fields(), **fields})

    def config(self, *, num_classes: int, image_size: int) -> TimmConfig:
        """The network's config for ``num_classes`` labels at ``image_size``; ValueError when the
        architecture cannot take that size (names the size and the fix)."""
        import timm

        cfg = TimmConfig(**self.arch_fields(), num_classes=num_classes, image_size=image_size,
                         timm_version=timm.__version__)
        probe(cfg)
        return cfg


@dataclass(frozen=True, kw_only=True)
class TimmConfig(TimmArch):
    """A built timm network's config: ``model.cfg`` of every network :func:`create_timm_model` makes,
    saved as ``vitscale.config`` in its safetensors file and as the registry's ``config.json``
    (``kind`` tells it from a ViTConfig; ``timm_version`` is the timm that built it)."""

    kind: Literal["timm"] = "timm"
    num_classes: int = 1000
    image_size: int = 224
    timm_version: str = ""

    def __post_init__(self) -> None:
        c = Checker(self)
        c.choice("kind", ("timm",))
        self._check_arch(c)
        c.int("num_classes", ge=0, why=" (0: no head)")
        c.int("image_size", ge=1)
        c.require(isinstance(self.timm_version, str), f"timm_version={self.timm_version!r} must be a string")
        c.done()

    def timm_kwargs(self) -> dict[str, Any]:
        """Everything ``timm.create_model(name, pretrained=False, **kwargs)`` gets."""
        kw = {"num_classes": self.num_classes, "in_chans": self.in_chans, **self.shape_kwargs()}
        if self.family.img_size:
            kw["img_size"] = self.image_size
        return kw

    @property
    def variant(self) -> str:
        return self.name

    @property
    def class_token(self) -> bool:
        """Whether the token sequence starts with a global class token (DeiT, CaiT, BEiT)."""
        return probe(self).num_prefix_tokens > 0

    @property
    def num_prefix_tokens(self) -> int:
        return probe(self).num_prefix_tokens

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid (gh, gw) of a patch-token family; ValueError for the others."""
        g = probe(self).grid
        if g is None:
            raise ValueError(f"{self.name} ({self.family.title}) has no single patch grid")
        return g


class Probe(NamedTuple):
    """What a meta-device forward tells about a config."""

    patch_size: int | None
    grid: tuple[int, int] | None
    num_prefix_tokens: int


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@functools.lru_cache(maxsize=512)
def probe(cfg: TimmConfig) -> Probe:
    """Build ``cfg`` on the meta device and run one image through it (nothing allocated, nothing
    computed); ValueError when timm cannot build it or the architecture cannot take
    ``cfg.image_size``, naming the size and a fix."""
    import torch

    fam = cfg.family
    try:
        with torch.device("meta"):
            m = create_timm_model(cfg)
    except Exception as e:  # noqa: BLE001 - timm raises assertions, TypeErrors, ValueErrors
        raise ValueError(f"timm cannot build {cfg.name} with {cfg.shape_kwargs()}: {_one_line(e)}") from None
    pe = getattr(m, "patch_embed", None)
    patch = getattr(pe, "patch_size", None) if fam.patch_grid else None
    p = int(patch[0]) if isinstance(patch, tuple | list) else patch
    if p and cfg.image_size % p:
        down, up = cfg.image_size // p * p, -(-cfg.image_size // p) * p
        raise ValueError(f"image_size {cfg.image_size} is not divisible by {cfg.name}'s patch size {p} (timm would drop "
                         f"the last {cfg.image_size - down} pixel rows); use image_size={down or up} or {up}")
    m.eval()  # BatchNorm in eval: a 1-image probe of a convnet is not a batch-statistics problem
    try:
        m(torch.zeros(1, cfg.in_chans, cfg.image_size, cfg.image_size, device="meta"))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{cfg.name} ({fam.title}) cannot take image_size {cfg.image_size}: {_one_line(e)}; use a "
                         "larger image size (or smaller patches / fewer stages)") from None
    grid = tuple(int(g) for g in pe.grid_size) if p and fam.class_token else None
    prefix = int(getattr(m, "num_prefix_tokens", 0)) if fam.class_token else 0
    return Probe(p, grid, prefix)  # type: ignore[arg-type]


def create_timm_model(cfg: TimmConfig) -> nn.Module:
    """A freshly initialised timm network of ``cfg`` (``pretrained=False``: never a download), with
    ``model.cfg = cfg`` (what the project reads: image size, FLOPs, the registry's config)."""
    import timm

    model = timm.create_model(cfg.name, pretrained=False, **cfg.timm_kwargs())
    model.cfg = cfg
    return model


def is_timm_model(module: nn.Module) -> bool:
    return isinstance(getattr(module, "cfg", None), TimmConfig)


def lr_layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """(parameter name -> lr layer, the top layer) for layer-wise lr decay of a timm network: timm's
    own ``group_matcher`` grouping (what ``timm.optim.param_groups_layer_decay`` uses), stem
    first, head last."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        raise ValueError(f"layer-wise lr decay: {model.cfg.name} has no timm group_matcher to map its parameters "
                         "to layers; set train.optim.layer_decay=none")
    ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    return {k: int(v) for k, v in ids.items()}, max(ids.values())
