"""The frozen models an objective loads by URI: the distillation teacher (``train.objective.teacher``,
``training.objectives.distill``) and BEiT's tokenizer (``train.objective.tokenizer``,
``training.objectives.beit``): where they come from, loading them on every rank, and the checks
that refuse a bad one before Ray starts.

A frozen model is any model the project can load, never by unpickling:

* ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` (``latest`` too) or ``runs:/RUN_ID/PATH``: a
  registered model or a run's logged weights (``orchestration.tracking.load_model``);
* a run's export or a model of ours: a ``.safetensors`` file with its config, or a model folder
  (``model.safetensors`` + ``config.json``), as a path, ``file://`` or ``s3://`` URL;
* teachers only, ``timm:ARCH=WEIGHTS.safetensors``: an architecture of the timm zoo (``model.zoo``:
  ViT/DeiT, CaiT, BEiT, Swin, PVT-v2, ResNet, RegNetY; built with ``pretrained=False``, never a hub
  download) with a local safetensors state dict in timm's layout, e.g. DeiT's
  ``timm:regnety_160=/weights/regnety_160.safetensors``.

A teacher must predict the dataset's classes and take the student's images; a tokenizer must be an
``model.tokenizer.ImageTokenizer`` (the dVAE a tokenizer run exports) with the student's patch
size, image size and the MIM head's vocabulary. Either is loaded on every rank (each holds its
own copy, like the data), frozen and in eval mode; the Trainer runs it under ``no_grad`` on each
training batch. :func:`pin_frozen` resolves a registry alias once, on the driver, so every rank and
every restart uses the same version (and a resume after the alias moved is refused by the config
hash, naming both versions).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from torch import nn

    from orchestration.experiment.config import Experiment

TIMM = "timm:"
#: Objective kind -> the field of its section naming its frozen model.
FROZEN_FIELD = {"distill": "teacher", "beit": "tokenizer"}
_FORMS = ("models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH, a .safetensors file or model folder "
          "(path, file:// or s3://), or timm:ARCH=WEIGHTS.safetensors")
#: The first bytes of the files torch.save / pickle write (a zip archive, or pickle protocol 2-5).
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass(frozen=True)
class TeacherSource:
    """A parsed teacher spec: ``kind`` "registry" (models:/ and runs:/ URIs), "file" (ours, by path
    or URL) or "timm" (``arch`` + safetensors ``ref``)."""

    kind: Literal["registry", "file", "timm"]
    ref: str
    arch: str = ""


def parse_teacher(spec: str) -> TeacherSource:
    """The teacher ``spec`` names; ValueError for one that names none of the forms."""
    spec = spec.strip()
    if spec.startswith(("models:/", "runs:/")):
        return TeacherSource("registry", spec)
    if spec.startswith(TIMM):
        arch, eq, weights = spec[len(TIMM):].partition("=")
        if not arch or not eq or not weights:
            raise ValueError(f"teacher {spec!r}: write timm:ARCH=WEIGHTS.safetensors (e.g. "
                             "timm:regnety_160=/weights/regnety_160.safetensors); timm never downloads weights here")
        return TeacherSource("timm", weights, arch)
    if not spec or ("://" in spec and not spec.startswith(("file://", "s3://"))):
        raise ValueError(f"teacher {spec!r} is none of {_FORMS}")
    return TeacherSource("file", spec)


def _local(url: str, tmp: Path) -> Path:
    """A local path of ``url`` (an s3:// object is downloaded into ``tmp``)."""
    from orchestration.launch.checkpoint_store import fetch

    return fetch(url, tmp / url.rstrip("/").rsplit("/", 1)[-1])


def _refuse_pickle(path: Path, spec: str) -> None:
    """UnsafeModelError for a file that is not safetensors (a pickle is named as one, never opened by pickle)."""
    from orchestration.tracking import UnsafeModelError

    if not path.is_file():
        raise FileNotFoundError(f"teacher {spec!r}: no such file {path}")
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(_PICKLE_MAGIC) or path.suffix in (".pth", ".pt", ".pkl", ".pickle", ".bin", ".ckpt"):
        raise UnsafeModelError(f"teacher {spec!r}: {path.name} is a pickle (torch.save / pickle format); vitscale "
                               "never unpickles weights because loading a pickle runs arbitrary code. Convert it "
                               "once, where you trust it: safetensors.torch.save_file(torch.load(...), "
                               "'teacher.safetensors')")
    if path.suffix != ".safetensors":
        raise UnsafeModelError(f"teacher {spec!r}: {path.name} is not a .safetensors file; give the weights as "
                               "safetensors")


def _timm_teacher(src: TeacherSource, spec: str, num_classes: int, image_size: int | None, tmp: Path) -> nn.Module:
    """A zoo network (``model.zoo``: the families vitscale builds, DeiT's RegNetY and ResNet teachers
    among them) of ``src.arch`` with the file's weights, checked from its header before a tensor is read."""
    from model.weights import read_header
    from model.zoo import TimmSpec, create_timm_model, name_problem
    from model.zoo_weights import head_prefixes, load_timm_weights

    path = _local(src.ref, tmp)
    _refuse_pickle(path, spec)
    try:
        specs, _ = read_header(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"teacher {spec!r}: {path.name} is not a valid safetensors file ({e})") from e
    problem = name_problem(src.arch)  # an unknown name lists timm's closest; a hub tag is refused
    if problem:
        raise ValueError(f"teacher {spec!r}: {problem}")
    size = image_size or 224  # a caller without a student (tests, tools): timm's default input
    try:
        cfg = TimmSpec(name=src.arch).config(num_classes=num_classes, image_size=size)
    except ValueError as e:  # the architecture cannot take the student's images
        raise ValueError(f"teacher {spec!r}: {' '.join(str(e).split())}") from e
    model = create_timm_model(cfg)
    for head in head_prefixes(model):
        have = specs.get(f"{head}weight")
        if have is not None and have.shape[0] != num_classes:
            raise ValueError(f"teacher {spec!r} predicts {have.shape[0]} classes ({head}weight is {have.shape}), "
                             f"the dataset has {num_classes}: distil from a teacher trained on the same classes")
    try:
        load_timm_weights(model, path)
    except ValueError as e:  # missing / unexpected keys, shapes: another architecture's weights
        raise ValueError(f"teacher {spec!r}: the weights do not fit timm's {src.arch} at image_size {size} "
                         f"({' '.join(str(e).split())[:400]}); timm:ARCH builds timm's own shape of ARCH: a network "
                         "trained here with other shape fields is a teacher as its run's export (the .safetensors "
                         "that carries its config)") from e
    return model


def _size_problem(model: nn.Module, image_size: int) -> str | None:
    """Why ``model`` cannot take the student's ``image_size`` images (None: it can). Our ViT and
    the timm families whose position embeddings / windows are built for one size need that size;
    a convnet (or PVT-v2) takes any size its stages can downsample."""
    from model.zoo import TimmConfig, probe

    cfg = getattr(model, "cfg", None)
    size = getattr(cfg, "image_size", None)
    if size is None or size == image_size:
        return None
    if isinstance(cfg, TimmConfig) and not cfg.family.img_size:
        try:
            probe(replace(cfg, image_size=image_size))
        except ValueError as e:
            return " ".join(str(e).split())
        return None
    what = cfg.name if isinstance(cfg, TimmConfig) else "ViT"
    return (f"is a {what} for {size}x{size} images, the student sees {image_size}x{image_size}: train the teacher "
            f"at image_size={image_size} (or fine-tune it there: finetune.py --image-size {image_size})")


def _load_frozen(spec: str, tracking_uri: str | None, timm: Callable[[TeacherSource, Path], nn.Module] | None,
                 what: str = "teacher") -> nn.Module:
    """The model ``spec`` names (registry, file of ours, or through ``timm`` for a timm:ARCH spec),
    never unpickled."""
    from orchestration.tracking import load_model, model_from_path

    src = parse_teacher(spec)
    with tempfile.TemporaryDirectory() as tmp:
        if src.kind == "registry":
            return load_model(spec, tracking_uri)
        if src.kind == "file":
            path = _local(src.ref, Path(tmp))
            if path.is_file():  # a folder is checked file by file by model_from_path
                _refuse_pickle(path, spec)
            return model_from_path(path, spec)
        if timm is None:
            raise ValueError(f"{what} {spec!r}: a timm:ARCH network cannot be a {what}; give a model of ours (a "
                             f"run's export or a registered model: models:/NAME@ALIAS)")
        return timm(src, Path(tmp))


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def load_teacher(spec: str, num_classes: int, *, image_size: int | None = None,
                 tracking_uri: str | None = None) -> nn.Module:
    """The frozen, eval-mode teacher ``spec`` names, checked to predict ``num_classes`` classes and
    to take the student's ``image_size`` images. Raises ValueError / UnsafeModelError /
    FileNotFoundError / LookupError naming the spec and what is wrong."""
    from training.objectives.distill import class_count

    model = _load_frozen(spec, tracking_uri,
                         lambda src, tmp: _timm_teacher(src, spec, num_classes, image_size, tmp))
    have = class_count(model)
    if have != num_classes:
        what = "has no class head (an MAE encoder or a feature extractor)" if not have else f"predicts {have} classes"
        raise ValueError(f"teacher {spec!r} {what}, the dataset has {num_classes}: distil from a teacher trained on "
                         "the same classes")
    problem = _size_problem(model, image_size) if image_size is not None else None
    if problem:
        raise ValueError(f"teacher {spec!r} {problem}")
    return _freeze(model)


def _what_it_is(model: nn.Module) -> str:
    """A model in words, for a refusal: ``a ViT classifier (10 classes)``, ``timm's resnet18 ...``."""
    cfg = getattr(model, "cfg", None)
    classes = getattr(cfg, "num_classes", None)
    name = getattr(cfg, "name", None) or ("ViT" if cfg is not None else type(model).__name__)
    role = f"classifier ({classes} classes)" if classes else "encoder without a head"
    return f"a {name} {role}"


def load_tokenizer(spec: str, *, vocab_size: int, patch_size: int, image_size: int,
                   tracking_uri: str | None = None) -> nn.Module:
    """The frozen, eval-mode image tokenizer ``spec`` names (``model.tokenizer.ImageTokenizer``),
    checked to give one token per ``patch_size`` patch of ``image_size`` images over ``vocab_size``
    tokens. Only the part that tokenizes is kept (a dVAE's decoder is dropped: half the memory on
    every rank). Raises like :func:`load_teacher`."""
    from model.tokenizer import DiscreteVAE, ImageTokenizer
    from training.objectives.beit import tokenizer_fit_problem

    model = _load_frozen(spec, tracking_uri, None, what="tokenizer")
    if not isinstance(model, ImageTokenizer):
        raise ValueError(f"tokenizer {spec!r} is {_what_it_is(model)}, not an image tokenizer: give the export or "
                         "registered model of a tokenizer run (train.objective.kind='dvae', e.g. "
                         "models:/dvae-v8192p16-NAME@champion)")
    problem = tokenizer_fit_problem(model, vocab_size, patch_size, image_size)
    if problem:
        raise ValueError(f"tokenizer {spec!r}: {problem}")
    if isinstance(model, DiscreteVAE):
        from torch import nn

        model.decoder = nn.Identity()  # tokenize() reads the encoder only
    return _freeze(model)


def _patch_size(exp: Experiment) -> int:
    from model.zoo import probe

    cfg = exp.model_config(num_classes=0)
    return int(probe(cfg).patch_size) if cfg.kind == "timm" else int(cfg.patch_size)  # type: ignore[union-attr, arg-type]


def frozen_for(exp: Experiment, num_classes: int, tracking_uri: str | None = None) -> nn.Module | None:
    """The frozen model of ``exp``'s objective for this rank: the distillation teacher, BEiT's
    tokenizer (None for an objective with none)."""
    obj = exp.train.objective
    if obj.kind == "beit":
        return load_tokenizer(obj.tokenizer, vocab_size=obj.vocab_size, patch_size=_patch_size(exp),
                              image_size=exp.image_size, tracking_uri=tracking_uri)
    return teacher_for(exp, num_classes, tracking_uri)


def teacher_for(exp: Experiment, num_classes: int, tracking_uri: str | None = None) -> nn.Module | None:
    """The teacher of ``exp`` for this rank (None unless its objective distils)."""
    obj = exp.train.objective
    if obj.kind != "distill":
        return None
    return load_teacher(obj.teacher, num_classes, image_size=exp.image_size, tracking_uri=tracking_uri)


def pin_frozen(exp: Experiment, tracking_uri: str | None = None) -> Experiment:
    """``exp`` with its objective's frozen model (teacher, tokenizer) given as ``models:/NAME@ALIAS``
    (or ``/latest``) resolved to ``models:/NAME/VERSION``."""
    obj = exp.train.objective
    field = FROZEN_FIELD.get(obj.kind)
    spec = getattr(obj, field, "") if field else ""
    if not spec.startswith("models:/"):
        return exp
    from orchestration.tracking import resolve_model_source

    pinned = resolve_model_source(spec, tracking_uri)["uri"]
    return replace(exp, train=replace(exp.train, objective=replace(obj, **{field: pinned})))


def frozen_problems(exp: Experiment, data_url: str, tracking_uri: str | None = None) -> list[str]:
    """On the driver, before Ray: the objective's frozen model loads (no pickle) and fits (see
    :func:`teacher_problems`, :func:`load_tokenizer`); one line each."""
    obj = exp.train.objective
    if obj.kind != "beit":
        return teacher_problems(exp, data_url, tracking_uri)
    key = "train.objective.tokenizer"
    try:
        parse_teacher(obj.tokenizer)
        load_tokenizer(obj.tokenizer, vocab_size=obj.vocab_size, patch_size=_patch_size(exp),
                       image_size=exp.image_size, tracking_uri=tracking_uri)
    except Exception as e:  # noqa: BLE001 - every reason a worker would fail on, as one line
        return [f"{key}: {' '.join(str(e).split())}"]
    return []


def teacher_problems(exp: Experiment, data_url: str, tracking_uri: str | None = None) -> list[str]:
    """On the driver, before Ray: the teacher of a distilling ``exp`` loads (no pickle), predicts the
    classes of the dataset at ``data_url`` and takes the student's images; one line each."""
    obj = exp.train.objective
    if obj.kind != "distill":
        return []
    from orchestration.experiment.validation import one_line
    from pipeline import build_loader

    key = "train.objective.teacher"  # every message below names the teacher spec itself
    try:
        parse_teacher(obj.teacher)
    except ValueError as e:
        return [f"{key}: {one_line(e)}"]
    try:
        num_classes = int(build_loader(exp.data.replace(**{"source.url": data_url}), rank=0, world_size=1).num_classes)
    except Exception:  # noqa: BLE001 - the dataset's own check reports it
        return []
    try:
        load_teacher(obj.teacher, num_classes, image_size=exp.image_size, tracking_uri=tracking_uri)
    except Exception as e:  # noqa: BLE001 - every reason a worker would fail on, as one line
        return [f"{key}: {' '.join(str(e).split())}"]
    return []
