"""Experiment recipes: one Python function per thing we train, plus typed ``--set`` overrides.

A recipe returns a frozen :class:`Experiment` that bundles the component configs
(``pipeline.DataConfig``, ``training.TrainConfig``) with the model variant and the Ray
resources. Variants of a recipe are made with :func:`dataclasses.replace`, never by copying
a recipe body. Command-line overrides go through :func:`apply_overrides`, which checks every
key and value against the dataclass field types *before* any Ray worker starts.

Paper numbers cite Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words"
(arXiv:2010.11929), Appendix B.1, Table 3 ("Hyperparameters for training. All models are
trained with a batch size of 4096 and learning rate warmup of 10k steps. For ImageNet we found
it beneficial to additionally apply gradient clipping at global norm 1. Training resolution is
224.") and Section 4.1 ("We train all models, including ResNets, using Adam with β1 = 0.9,
β2 = 0.999, a batch size of 4096 and apply a high weight decay of 0.1"; "linear learning rate
warmup and decay"; the pre-training head is "a MLP with one hidden layer", Section 3.1).

Weight decay mapping. The paper's weight decay is *decoupled* and scaled by the learning rate:
the original vit_jax code used ``flax.optim.Adam(weight_decay=wd)``, whose update is
``p <- p - lr_t * (adam_update + wd * p)``, i.e. a per-step decay of ``lr_t * wd``. PyTorch
``torch.optim.AdamW(weight_decay=wd)`` (and DeepSpeed's AdamW) applies ``p <- p * (1 - lr_t * wd)``,
the same per-step decay. So ``TrainConfig.weight_decay`` takes the paper's value unchanged
(0.1 for JFT, 0.03 for ImageNet-21k); it is NOT divided by the learning rate (that would be
the mapping for optax/big_vision-style ``wd`` that multiplies only the schedule, not lr).
"""

from __future__ import annotations

import ast
import dataclasses
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from model import ViTConfig, parse_variant, vit_config
from pipeline import DataConfig
from training import TrainConfig

# Paper dataset sizes, used only to turn Table 3's epochs into optimizer steps.
I21K_IMAGES = 14_000_000  # "ImageNet-21k ... 21k classes and 14M images" (Section 4.1)
JFT_IMAGES = 303_000_000  # "JFT ... 18k classes and 303M high-resolution images" (Section 4.1)
PAPER_BATCH = 4096  # Table 3 caption
PAPER_WARMUP = 10_000  # Table 3 caption


def _epochs_to_steps(epochs: float, images: int, batch: int = PAPER_BATCH) -> int:
    return int(round(epochs * images / batch))


def variant_slug(variant: str) -> str:
    """``"B/16" -> "b16"``, ``"mu/4" -> "mu4"`` (used in registered model names)."""
    return variant.replace("/", "").lower()


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """Everything one pre-training (or fine-tuning) launch needs; only orchestration sees it.

    ``image_size`` is the single source of truth for resolution and ``train.micro_batch`` for
    the per-rank batch: :func:`apply_overrides` keeps ``data.image_size`` / ``data.batch_size``
    in step, and :func:`validate` rejects an experiment where they disagree.
    ``workers * cpus_per_worker`` CPUs (and ``gpus_per_worker`` GPUs each) are asked of Ray.
    """

    name: str
    variant: str  # paper name, e.g. "B/16" (model.parse_variant)
    image_size: int
    data: DataConfig
    train: TrainConfig
    model_overrides: dict[str, Any] = field(default_factory=dict)  # extra ViTConfig fields
    workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    dataset_name: str = "dataset"
    registered_model_name: str = ""  # "" -> "vit-<variant>-<dataset>"
    eval_split: str | None = "val"  # None: no eval loader
    max_failures: int = 2  # Ray Train FailureConfig: worker-group restarts before giving up

    @property
    def model_name(self) -> str:
        """Registry name: ``vit-<variant>-<dataset>`` unless the recipe set one."""
        return self.registered_model_name or f"vit-{variant_slug(self.variant)}-{self.dataset_name}"

    @property
    def global_batch(self) -> int:
        return self.train.micro_batch * self.grad_accum * self.workers

    @property
    def grad_accum(self) -> int:
        """Accumulation steps so that micro_batch x accum x workers == train.global_batch."""
        return self.train.accum_for(self.workers)

    def model_config(self, num_classes: int) -> ViTConfig:
        """The ViTConfig this experiment trains, for a dataset with ``num_classes`` labels."""
        return vit_config(
            self.variant, num_classes=num_classes, image_size=self.image_size, **self.model_overrides
        )


# ---------------------------------------------------------------------------------------------
# Paper recipes (Table 3). Launch on a GPU Ray cluster; batch 4096 = micro x accum x workers.
# ---------------------------------------------------------------------------------------------


def _paper_train(*, lr: float, weight_decay: float, total_steps: int, micro_batch: int, **kw: Any) -> TrainConfig:
    return TrainConfig(
        global_batch=PAPER_BATCH,  # Table 3 caption: "batch size of 4096"
        micro_batch=micro_batch,
        optimizer="adamw",  # Section 4.1: Adam (decoupled weight decay, see module docstring)
        lr=lr,
        betas=(0.9, 0.999),  # Section 4.1: "β1 = 0.9, β2 = 0.999"
        weight_decay=weight_decay,
        warmup_steps=PAPER_WARMUP,  # Table 3 caption: "warmup of 10k steps"
        total_steps=total_steps,
        decay="linear",  # Table 3 "LR decay" column: linear
        grad_clip=1.0,  # Table 3 caption: "gradient clipping at global norm 1"
        loss="softmax",
        precision="bf16",
        log_every=50,
        eval_every=5000,
        checkpoint_every=2000,
        **kw,
    )


def _paper_data(url: str, *, micro_batch: int) -> DataConfig:
    # JFT pre-processing is "inception crop + random horizontal flip"; the DataConfig defaults
    # (crop_scale (0.05, 1.0), hflip) are exactly that. Paper normalises to [-1, 1].
    return DataConfig(url=url, image_size=224, batch_size=micro_batch, num_workers=8)


def vit_b16_i21k() -> Experiment:
    """ViT-B/16 on ImageNet-21k, paper Table 3 row "ViT-B/{16,32} | ImageNet-21k | 90 | 10^-3 | linear | 0.03 | 0.1".

    8 GPUs x micro 128 x accum 4 = 4096. Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe vit_b16_i21k --data s3://BUCKET/imagenet21k --resume auto
    """
    mb = 128
    return Experiment(
        name="vit_b16_i21k",
        variant="B/16",
        image_size=224,  # Table 3 caption: "Training resolution is 224"
        # Table 3 dropout column 0.1 for ImageNet-21k; pre-training head = MLP with one hidden
        # layer of the model width (Section 3.1 / released i21k checkpoints: 768 for B).
        model_overrides={"dropout": 0.1, "representation_size": 768},
        data=_paper_data("s3://datasets/imagenet21k", micro_batch=mb),
        train=_paper_train(
            lr=1e-3,  # Table 3: base LR 10^-3 (ImageNet-21k)
            weight_decay=0.03,  # Table 3: weight decay 0.03 (ImageNet-21k)
            total_steps=_epochs_to_steps(90, I21K_IMAGES),  # Table 3: 90 epochs
            micro_batch=mb,
            zero_stage=1,
        ),
        workers=8,
        cpus_per_worker=8,
        gpus_per_worker=1,
        dataset_name="i21k",
    )


def vit_l16_i21k() -> Experiment:
    """ViT-L/16 on ImageNet-21k, paper Table 3 row "ViT-L/{16,32} | ImageNet-21k | 30/90 | 10^-3 | linear | 0.03 | 0.1".

    16 GPUs x micro 64 x accum 4 = 4096; ZeRO-2 with activation checkpointing. Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe vit_l16_i21k --data s3://BUCKET/imagenet21k --resume auto
    """
    mb = 64
    base = vit_b16_i21k()
    return replace(
        base,
        name="vit_l16_i21k",
        variant="L/16",
        model_overrides={"dropout": 0.1, "representation_size": 1024},  # Table 3 dropout 0.1
        data=replace(base.data, batch_size=mb),
        train=replace(
            base.train,
            micro_batch=mb,
            lr=1e-3,  # Table 3: base LR 10^-3
            weight_decay=0.03,  # Table 3: weight decay 0.03
            total_steps=_epochs_to_steps(90, I21K_IMAGES),  # Table 3: "30/90" epochs; we use 90
            zero_stage=2,
            activation_checkpointing=True,
        ),
        workers=16,
    )


def vit_b16_jft() -> Experiment:
    """ViT-B/16 on JFT-300M, paper Table 3 row "ViT-B/{16,32} | JFT-300M | 7 | 8·10^-4 | linear | 0.1 | 0.0".

    Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe vit_b16_jft --data s3://BUCKET/jft300m --resume auto
    """
    base = vit_b16_i21k()
    return replace(
        base,
        name="vit_b16_jft",
        model_overrides={"dropout": 0.0, "representation_size": 768},  # Table 3 dropout 0.0 (JFT)
        data=replace(base.data, url="s3://datasets/jft300m"),
        train=replace(
            base.train,
            lr=8e-4,  # Table 3: base LR 8·10^-4
            weight_decay=0.1,  # Table 3: weight decay 0.1 (JFT)
            total_steps=_epochs_to_steps(7, JFT_IMAGES),  # Table 3: 7 epochs
            loss="sigmoid",  # JFT is multi-label
        ),
        dataset_name="jft",
    )


def vit_h14_jft() -> Experiment:
    """ViT-H/14 on JFT-300M, paper Table 3 row "ViT-H/14 | JFT-300M | 14 | 3·10^-4 | linear | 0.1 | 0.0".

    32 GPUs x micro 32 x accum 4 = 4096; ZeRO-3 + activation checkpointing. Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe vit_h14_jft --data s3://BUCKET/jft300m --resume auto
    """
    mb = 32
    base = vit_b16_jft()
    return replace(
        base,
        name="vit_h14_jft",
        variant="H/14",
        model_overrides={"dropout": 0.0, "representation_size": 1280},  # Table 3 dropout 0.0
        data=replace(base.data, batch_size=mb),
        train=replace(
            base.train,
            micro_batch=mb,
            lr=3e-4,  # Table 3: base LR 3·10^-4
            weight_decay=0.1,  # Table 3: weight decay 0.1
            total_steps=_epochs_to_steps(14, JFT_IMAGES),  # Table 3: 14 epochs
            zero_stage=3,
            activation_checkpointing=True,
        ),
        workers=32,
    )


def vit_l16_jft() -> Experiment:
    """ViT-L/16 on JFT-300M, paper Table 3 row "ViT-L/16 | JFT-300M | 7/14 | 4·10^-4 | linear | 0.1 | 0.0".

    Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe vit_l16_jft --data s3://BUCKET/jft300m --resume auto
    """
    base = vit_l16_i21k()
    return replace(
        base,
        name="vit_l16_jft",
        model_overrides={"dropout": 0.0, "representation_size": 1024},  # Table 3 dropout 0.0
        data=replace(base.data, url="s3://datasets/jft300m"),
        train=replace(
            base.train,
            lr=4e-4,  # Table 3: base LR 4·10^-4
            weight_decay=0.1,  # Table 3: weight decay 0.1
            total_steps=_epochs_to_steps(7, JFT_IMAGES),  # Table 3: "7/14" epochs; we use 7
            loss="sigmoid",
        ),
        dataset_name="jft",
    )


# ---------------------------------------------------------------------------------------------
# Small recipes: one T4, and CPU.
# ---------------------------------------------------------------------------------------------


def vit_s16_t4() -> Experiment:
    """ViT-S/16 on a single T4 (16 GB, fp16): width 384, 6 heads, 12 layers, MLP 1536, 224 px.

    Micro batch 32 x accumulation 4 = 128 images per optimizer step; AdamW lr 1e-3,
    weight decay 0.1, 1000 warmup steps, 50000 steps, fp16. ``make smoke`` uses it when a CUDA
    GPU is present (with ``--set train.total_steps=...`` to keep it short). Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe vit_s16_t4 --data s3://BUCKET/demo --resume auto
    """
    mb = 32
    return Experiment(
        name="vit_s16_t4",
        variant="S/16",
        image_size=224,
        # Spelled out (not just "S/16") so the T4 shape is pinned here even if the table changes.
        model_overrides={"width": 384, "heads": 6, "depth": 12, "mlp_dim": 1536, "patch_size": 16},
        data=DataConfig(url="s3://vitscale/demo", image_size=224, batch_size=mb, num_workers=4),
        train=TrainConfig(
            global_batch=mb * 4,  # micro 32 x accumulation 4 x 1 GPU
            grad_accum=None,  # derived: 128 / (32 x 1 worker) = 4 (more GPUs -> less accumulation)
            micro_batch=mb,
            optimizer="adamw",
            lr=1e-3,
            betas=(0.9, 0.999),
            weight_decay=0.1,
            warmup_steps=1000,
            total_steps=50_000,
            decay="linear",
            grad_clip=1.0,
            precision="fp16",  # T4 has no bf16
            zero_stage=0,
            log_every=20,
            eval_every=2000,
            checkpoint_every=1000,
        ),
        workers=1,
        cpus_per_worker=4,
        gpus_per_worker=1,
        dataset_name="demo",
    )


def vit_mu_smoke() -> Experiment:
    """Tiny ViT ("mu/4") on the digits demo shards at 32 px: 2 CPU workers, DeepSpeed ZeRO-1 on gloo.

    A few hundred steps; what ``make smoke`` and the integration tests run on a laptop. Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe vit_mu_smoke --data s3://vitscale/digits --resume auto
    """
    mb = 32
    return Experiment(
        name="vit_mu_smoke",
        variant="mu/4",
        image_size=32,
        data=DataConfig(
            url="s3://vitscale/digits",
            image_size=32,
            batch_size=mb,
            num_workers=1,
            shuffle_buffer=256,
            crop_scale=(0.6, 1.0),  # 8x8-pixel digits: aggressive crops erase the digit
            hflip=False,  # a mirrored 2 is not a 2
        ),
        train=TrainConfig(
            global_batch=mb * 2,  # micro 32 x 2 workers, no accumulation
            micro_batch=mb,
            optimizer="adamw",
            lr=3e-3,
            betas=(0.9, 0.999),
            weight_decay=0.05,
            warmup_steps=30,
            total_steps=300,
            decay="linear",
            grad_clip=1.0,
            precision="fp32",
            zero_stage=1,
            log_every=10,
            eval_every=100,
            checkpoint_every=100,
        ),
        workers=2,
        cpus_per_worker=1,
        gpus_per_worker=0,
        dataset_name="digits",
    )


RECIPES: dict[str, Callable[[], Experiment]] = {
    f.__name__: f
    for f in (vit_b16_i21k, vit_l16_i21k, vit_b16_jft, vit_l16_jft, vit_h14_jft, vit_s16_t4, vit_mu_smoke)
}


def get_recipe(name: str) -> Experiment:
    """The experiment of recipe ``name``; unknown names list the valid ones."""
    try:
        return RECIPES[name]()
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(sorted(RECIPES))}") from None


# ---------------------------------------------------------------------------------------------
# Typed overrides: "section.key=value"
# ---------------------------------------------------------------------------------------------


class OverrideError(ValueError):
    """A ``--set`` override names an unknown key or carries a value of the wrong type."""


_SECTIONS: dict[str, type] = {"data": DataConfig, "train": TrainConfig, "model": ViTConfig}
# Fields the experiment derives itself; overriding them would be silently undone.
_MODEL_FIXED = {"num_classes", "image_size", "variant"}
_EXP_FIXED = {"data", "train", "model_overrides"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in {"true", "1", "yes", "on"}:
        return True
    if low in {"false", "0", "no", "off"}:
        return False
    raise ValueError(text)


def _literal_or_text(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_typed(text: str, tp: Any) -> Any:
    """Parse ``text`` as a value of type ``tp`` (int, float, bool, str, Literal, tuples, unions).

    Raises ValueError when it does not fit. ``none``/``null`` is accepted for optional types.
    Tuples accept ``0.9,0.999`` or ``(0.9, 0.999)``.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _literal_or_text(text)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in {"none", "null"}:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_typed(text, arg)
            except ValueError:
                continue
        raise ValueError(text)
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text.strip():
                return choice
        raise ValueError(text)
    if origin is tuple:
        raw = text.strip()
        if raw.startswith(("(", "[")):
            items = ast.literal_eval(raw)
            parts = [repr(x) if not isinstance(x, str) else x for x in items]
        else:
            parts = [p.strip() for p in raw.split(",") if p.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_typed(p, args[0]) for p in parts)
        if len(parts) != len(args):
            raise ValueError(text)
        return tuple(parse_typed(p, a) for p, a in zip(parts, args, strict=True))
    if tp is bool:
        return _parse_bool(text)
    if tp is int:
        value = text.strip().replace("_", "")
        if value.lower().endswith(("k", "m")) and value[:-1].isdigit():
            return int(value[:-1]) * (1000 if value[-1].lower() == "k" else 1_000_000)
        return int(value)
    if tp is float:
        return float(text)
    if tp is str:
        return text
    if origin in (list, Sequence) or tp in (list, dict) or origin is dict:
        value = ast.literal_eval(text)
        if not isinstance(value, origin or tp):
            raise ValueError(text)
        return value
    raise ValueError(text)


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise OverrideError(f"override {item!r} is not of the form key=value (e.g. train.lr=3e-4)")
    key, value = item.split("=", 1)
    return key.strip(), value


def _valid_keys(cls: type, exclude: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    return sorted(f.name for f in dataclasses.fields(cls) if f.name not in exclude)


def _parse_one(item: str, top: dict[str, Any], sections: dict[str, dict[str, Any]]) -> None:
    """Parse one ``key=value`` into ``top`` / ``sections``; OverrideError names key, type and value."""
    key, text = _split(item)
    if "." in key:
        section, name = key.split(".", 1)
        if section not in _SECTIONS:
            raise OverrideError(
                f"unknown section {section!r} in {key!r}; valid sections: data, model, train "
                f"(or a top-level key: {', '.join(_valid_keys(Experiment, _EXP_FIXED))})"
            )
        cls = _SECTIONS[section]
        exclude = _MODEL_FIXED if section == "model" else set()
        hints = _hints(cls)
        if name not in hints or name in exclude or name not in {f.name for f in dataclasses.fields(cls)}:
            raise OverrideError(
                f"unknown key {key!r}; valid keys of {section!r}: "
                + ", ".join(f"{section}.{k}" for k in _valid_keys(cls, exclude))
            )
        tp, target = hints[name], sections[section]
    else:
        name = key
        hints = _hints(Experiment)
        if name not in hints or name in _EXP_FIXED:
            raise OverrideError(
                f"unknown key {key!r}; valid top-level keys: {', '.join(_valid_keys(Experiment, _EXP_FIXED))}"
                " (and data.*, train.*, model.*)"
            )
        tp, target = hints[name], top
    try:
        target[name] = parse_typed(text, tp)
    except (ValueError, SyntaxError, TypeError):
        raise OverrideError(f"bad value for {key!r}: expected {_type_name(tp)}, got {text!r}") from None


def _build(section: str, make: Callable[[], Any], problems: list[str]) -> Any:
    """``make()`` a component config; on ValueError add its lines to ``problems`` and return None."""
    try:
        return make()
    except (ValueError, TypeError) as e:
        problems.extend(component_problems(section, e))
        return None


def apply_overrides(exp: Experiment, overrides: Sequence[str]) -> Experiment:
    """Return ``exp`` with ``["train.lr=3e-4", "data.batch_size=64", "workers=2", ...]`` applied.

    Keys: top-level Experiment fields (``workers``, ``image_size``, ...), ``data.<field>``,
    ``train.<field>``, ``model.<ViTConfig field>`` (stored in ``model_overrides``). Values are
    parsed to the field's annotated type. Unknown keys raise :class:`OverrideError` listing the
    valid keys of that section; values of the wrong type name key, expected type and value.
    ``image_size`` and ``data.image_size`` move together, as do ``train.micro_batch`` and
    ``data.batch_size``; ``train.global_batch`` (the optimisation hyper-parameter) stays, and the
    gradient accumulation is re-derived from it. The result is checked with :func:`validate`.

    Every problem is collected (unparsable overrides, each component config's own range checks,
    the launch-level checks of :func:`experiment_problems`) and raised at once as a
    :class:`ConfigError`, one line per problem.
    """
    problems: list[str] = []
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {"data": {}, "train": {}, "model": {}}
    for item in overrides:
        try:
            _parse_one(item, top, sections)
        except OverrideError as e:
            problems.append(str(e))

    # Keep the duplicated fields in step (one override moves both).
    if "image_size" in top and "image_size" not in sections["data"]:
        sections["data"]["image_size"] = top["image_size"]
    if "image_size" in sections["data"] and "image_size" not in top:
        top["image_size"] = sections["data"]["image_size"]
    if "micro_batch" in sections["train"] and "batch_size" not in sections["data"]:
        sections["data"]["batch_size"] = sections["train"]["micro_batch"]
    if "batch_size" in sections["data"] and "micro_batch" not in sections["train"]:
        sections["train"]["micro_batch"] = sections["data"]["batch_size"]

    data = _build("data", lambda: replace(exp.data, **sections["data"]), problems)
    train = _build("train", lambda: replace(exp.train, **sections["train"]), problems)
    model_overrides = {**exp.model_overrides, **sections["model"]}
    # A component that failed is replaced by the recipe's own, so the remaining checks still run.
    out = replace(exp, data=data or exp.data, train=train or exp.train, model_overrides=model_overrides, **top)
    problems += experiment_problems(out, consistency=data is not None and train is not None)
    if problems:
        raise ConfigError(problems)
    return out


def with_workers(exp: Experiment, workers: int) -> Experiment:
    """``exp`` on ``workers`` ranks, keeping the global batch (accumulation is re-derived)."""
    out = replace(exp, workers=workers)
    validate(out)
    return out


class ConfigError(OverrideError):
    """Everything wrong with one configuration; ``problems`` has one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = [" ".join(p.split("\n")) for p in problems]  # one line each, whatever the source
        super().__init__("\n".join(self.problems))


def component_problems(section: str, error: Exception) -> list[str]:
    """Lines of a component config's ValueError (``invalid TrainConfig:`` then ``lr=inf ...``), each
    prefixed with ``section.`` so it names the key the user sets (``train.lr=inf ...``)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("invalid ") and lines[0].endswith(":"):
        lines = lines[1:]
    return [f"{section}.{ln}" if _SAFE_NAME.match(ln.split("=", 1)[0].split(" ", 1)[0]) else f"{section}: {ln}"
            for ln in lines]


#: A name that is safe as one path component, an MLflow name and a Ray Train run name.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def name_problems(key: str, value: Any) -> list[str]:
    """``[]`` if ``value`` is safe as a path component (run folders, registry names), else one line."""
    if isinstance(value, str) and _SAFE_NAME.match(value) and ".." not in value:
        return []
    return [f"{key}={value!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "and without '..' (it names folders and registry entries)"]


def experiment_problems(exp: Experiment, *, consistency: bool = True) -> list[str]:
    """Launch-level problems of ``exp``, one line each (empty: it can be launched).

    Ray resources, retries and names here; the component configs checked their own fields when
    they were built. ``consistency=False`` skips the checks that read ``data``/``train`` (used
    when one of them could not be built, so those lines would only repeat its errors).
    """
    p: list[str] = []
    for key, low, why in (("workers", 1, ""), ("cpus_per_worker", 1, " (Ray packs workers without CPUs "
                          "onto one node without limit)"), ("gpus_per_worker", 0, ""),
                          ("max_failures", 0, " (-1, Ray's 'retry forever', would repeat a deterministic "
                           "failure without end)"), ("image_size", 1, "")):
        v = getattr(exp, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            p.append(f"{key}={v!r} must be an int >= {low}{why}")
    p += name_problems("name", exp.name) + name_problems("dataset_name", exp.dataset_name)
    if exp.registered_model_name:
        p += name_problems("registered_model_name", exp.registered_model_name)
    if exp.eval_split is not None and not exp.eval_split:
        p.append("eval_split='' must be a split name or none")
    try:
        parse_variant(exp.variant)
    except ValueError as e:
        p.append(f"variant={exp.variant!r}: {e}")
    else:
        if not any(x.startswith("image_size=") for x in p):  # a bad image_size is reported once
            _build("model", lambda: exp.model_config(num_classes=2), p)  # e.g. image_size % patch_size
    if consistency:
        p += _consistency_problems(exp)
    return p


def _consistency_problems(exp: Experiment) -> list[str]:
    p: list[str] = []
    if exp.data.image_size != exp.image_size:
        p.append(f"data.image_size {exp.data.image_size} != image_size {exp.image_size}; "
                 "set image_size=N (moves both)")
    if exp.data.batch_size != exp.train.micro_batch:
        p.append(f"data.batch_size {exp.data.batch_size} != train.micro_batch {exp.train.micro_batch}; "
                 "set one of them (the other follows)")
    if isinstance(exp.workers, int) and exp.workers >= 1:
        try:
            exp.train.accum_for(exp.workers)
        except ValueError as e:
            p.append(f"{e} (workers={exp.workers})")
    return p


def validate(exp: Experiment) -> None:
    """Raise :class:`ConfigError` listing every launch-level problem of ``exp``; cheap, no I/O."""
    problems = experiment_problems(exp)
    if problems:
        raise ConfigError(problems)


def flatten_experiment(exp: Experiment) -> dict[str, Any]:
    """``{"train.lr": 1e-3, "data.url": ..., "model.dropout": 0.1, "workers": 2, ...}`` (for tracking)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(exp):
        value = getattr(exp, f.name)
        if f.name in ("data", "train"):
            for sub in dataclasses.fields(value):
                out[f"{f.name}.{sub.name}"] = getattr(value, sub.name)
        elif f.name == "model_overrides":
            for k, v in sorted(value.items()):
                out[f"model.{k}"] = v
        else:
            out[f.name] = value
    out["grad_accum"] = exp.grad_accum
    out["global_batch"] = exp.global_batch
    out["registered_model_name"] = exp.model_name
    return out


def experiment_to_dict(exp: Experiment) -> dict[str, Any]:
    """JSON-able nested dict of the experiment (tuples become lists)."""
    return dataclasses.asdict(exp)


def experiment_from_dict(d: dict[str, Any]) -> Experiment:
    """Inverse of :func:`experiment_to_dict` (lists back to tuples where the field is a tuple)."""

    def build(cls: type, values: dict[str, Any]) -> Any:
        hints = _hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if not f.init or f.name not in values:
                continue
            v = values[f.name]
            tp = hints[f.name]
            if isinstance(v, list) and _is_tuple_type(tp):
                v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
            kwargs[f.name] = v
        return cls(**kwargs)

    d = dict(d)
    data = build(DataConfig, d.pop("data"))
    train = build(TrainConfig, d.pop("train"))
    return build(Experiment, {**d, "data": data, "train": train})


def _is_tuple_type(tp: Any) -> bool:
    if typing.get_origin(tp) is tuple:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(typing.get_origin(a) is tuple for a in typing.get_args(tp))
    return False
