"""What a served model needs besides its weights: the eval transform, class names, limits.

A :class:`ServingSpec` is written as ``serving.json`` next to ``model.safetensors`` and
``config.json`` when a model is registered (from the run's ``Experiment``: the preprocessing
the model was trained and evaluated with, the dataset's class names), so nobody re-types a mean,
a crop or a class list when serving it. Every server (``mlflow models serve``, Ray Serve) and
the batch predictor read it through :class:`orchestration.serving.predictor.Predictor`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from confkit.checks import Checker
from pipeline.decode import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from model import ViTConfig
    from orchestration.experiment.config import Experiment

log = logging.getLogger(__name__)

SERVING_FILE = "serving.json"
SPEC_VERSION = 1

#: Limits of one request, the same in every server (a request over them is refused, 4xx).
MAX_ROWS = 256
MAX_IMAGE_BYTES = 16 << 20  # one encoded image
MAX_REQUEST_BYTES = 64 << 20  # the HTTP body (base64 JSON is ~4/3 of the images)

Activation = Literal["softmax", "sigmoid", "none"]


@dataclass(frozen=True, kw_only=True)
class ServingSpec:
    """The eval transform and outputs of one registered model.

    Pixels: ``decode_eval(data, size=image_size, crop_pct=crop_pct, max_pixels=max_pixels)``
    (resize the short side to ``image_size / crop_pct``, centre crop) then ``(x/255 - mean) / std``,
    exactly the loader's eval path. ``activation``: how logits become scores (``softmax`` for a
    single-label classifier, ``sigmoid`` for a multi-label one, ``none`` for a model without a
    head, which serves its embedding only). ``class_names`` has one name per logit.
    """

    image_size: int
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_pixels: int = DEFAULT_MAX_PIXELS
    activation: Activation = "softmax"
    class_names: tuple[str, ...] = ()
    top_k: int = 5
    max_rows: int = MAX_ROWS
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_request_bytes: int = MAX_REQUEST_BYTES
    source: dict[str, str] = field(default_factory=dict)  # where the values came from (for people)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        c = Checker(self)
        c.int("image_size", ge=1)
        c.number("crop_pct", gt=0, le=1)
        c.numbers("mean", 3, why=" (one per RGB channel)")
        c.numbers("std", 3, gt=0, why=" (images are divided by it)")
        c.int("max_pixels", ge=1)
        c.choice("activation", ("softmax", "sigmoid", "none"))
        c.int("top_k", ge=1)
        for name in ("max_rows", "max_image_bytes", "max_request_bytes"):
            c.int(name, ge=1)
        c.require(all(isinstance(n, str) for n in self.class_names), "class_names must be strings")
        c.require(self.activation == "none" or bool(self.class_names),
                  f"activation={self.activation!r} needs class_names (one per logit); a model without a head "
                  "has activation='none'")
        c.done()

    @property
    def embedding_only(self) -> bool:
        """No head: the model answers with its embedding (an MAE encoder, a feature extractor)."""
        return self.activation == "none"

    def check_model(self, cfg: ViTConfig, where: str) -> None:
        """Raise ValueError (naming ``where``) unless this spec fits the model ``cfg`` describes."""
        problems = []
        if cfg.image_size != self.image_size:
            problems.append(f"the model takes {cfg.image_size} px images but {SERVING_FILE} crops to "
                            f"{self.image_size} px")
        if self.embedding_only != (cfg.num_classes == 0):
            problems.append(f"activation={self.activation!r} with a model of num_classes={cfg.num_classes}")
        elif not self.embedding_only and len(self.class_names) != cfg.num_classes:
            problems.append(f"{len(self.class_names)} class names for a head of {cfg.num_classes} classes")
        if problems:
            raise ValueError(f"{where}: {SERVING_FILE} does not fit the model: {'; '.join(problems)}; "
                             "re-register the model (orchestration.tracking.log_and_register_model)")

    def to_json(self) -> str:
        return json.dumps({"spec_version": SPEC_VERSION, **dataclasses.asdict(self)}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> ServingSpec:
        """Parse ``serving.json``; ValueError naming ``where`` and the problem."""
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError(f"a JSON {type(raw).__name__}, not an object")
            version = raw.pop("spec_version", None)
            if version != SPEC_VERSION:
                raise ValueError(f"spec_version {version!r}, this reader knows {SPEC_VERSION}")
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(raw) - known)
            if unknown:
                raise ValueError(f"unknown fields {unknown}")
            return cls(**raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where} is not a valid {SERVING_FILE} ({e})") from e


def default_spec(cfg: ViTConfig, class_names: Sequence[str] | None = None, **source: str) -> ServingSpec:
    """A spec for a model registered without its experiment: the project's default eval
    transform (``PreprocessConfig()``: mean/std 0.5, crop 0.875) at the model's image size, and
    class names ``"0" .. "N-1"`` unless given. ``source`` notes where the values came from."""
    from pipeline.loader.config import PreprocessConfig

    pre = PreprocessConfig()
    names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(cfg.num_classes))
    return ServingSpec(image_size=cfg.image_size, crop_pct=pre.eval_crop_pct, mean=pre.mean, std=pre.std,
                       activation="softmax" if cfg.num_classes else "none", class_names=names if cfg.num_classes else (),
                       source={"preprocess": "PreprocessConfig() defaults", **source})


def spec_for_experiment(exp: Experiment, cfg: ViTConfig, data_url: str = "") -> ServingSpec:
    """The spec of a model trained by ``exp``: its eval transform (``exp.data.preprocess``,
    ``exp.image_size``, ``exp.data.io.max_image_pixels``), its loss (sigmoid for multi-label) and
    the class names of its dataset (``classes.json`` at ``data_url``, checked against the manifest)."""
    obj = exp.train.objective
    if getattr(cfg, "num_classes", 0) == 0:  # an encoder, or a tokenizer (no head at all)
        activation: Activation = "none"
    else:
        activation = "sigmoid" if getattr(obj, "loss", "softmax") == "sigmoid" else "softmax"
    names: tuple[str, ...] = ()
    where = "indices"
    if activation != "none":
        names = tuple(str(i) for i in range(cfg.num_classes))
        if data_url:
            from pipeline import format as fmt

            try:  # at the end of a long run: a flaky read must not lose the registration
                classes = fmt.read_classes(fmt.resolve(data_url))
            except Exception as e:  # noqa: BLE001 - storage or format error: index names, said in the spec
                log.warning("class names of %s unreadable (%s): serving class indices instead", data_url, e)
                classes, where = [], f"indices ({data_url}/classes.json unreadable)"
            if len(classes) == cfg.num_classes:
                names, where = tuple(classes), data_url
            elif classes:
                where = f"indices ({data_url} has {len(classes)} classes, the head {cfg.num_classes})"
    pre = exp.data.preprocess
    return ServingSpec(image_size=cfg.image_size, crop_pct=pre.eval_crop_pct, mean=pre.mean, std=pre.std,
                       max_pixels=exp.data.io.max_image_pixels, activation=activation, class_names=names,
                       source={"preprocess": f"recipe {exp.name}", "classes": where})

