"""Launch-level checks of a whole :class:`Experiment`, one line per problem (no I/O).

The component configs check their own fields when they are built; this module adds what only
the whole experiment knows (Ray resources, names that become paths, the model at this image
size, the accumulation that makes the global batch) and the error types every CLI reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from orchestration.experiment.config import Experiment
from training import PROFILES

_GB = 1e9


class OverrideError(ValueError):
    """A ``--set`` override names an unknown key or carries a value of the wrong type."""


class ConfigError(OverrideError):
    """Everything wrong with one configuration; ``problems`` has one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = [" ".join(p.split("\n")) for p in problems]  # one line each, whatever the source
        super().__init__("\n".join(self.problems))


def experiment_problems(exp: Experiment) -> list[str]:
    """Launch-level problems of ``exp``, one line each (empty: it can be launched).

    The model at this image size, and the global batch at every world size the run may have;
    each section (and the experiment's names) checked its own fields when it was built.
    """
    p: list[str] = []
    try:
        exp.model_config(num_classes=2)  # e.g. image_size % patch_size
    except ValueError as e:
        p.append(f"model: {' '.join(str(e).split())}")
    p += decoder_memory_problems(exp)
    if exp.train.objective.kind == "distill" and exp.model.kind == "timm":
        p.append(f"train.objective.kind='distill' trains DeiT's distillation token, which our ViT has and timm's "
                 f"{exp.model.name} does not: make the student model.kind='vit' with model.distilled=true (a timm "
                 "network can be the teacher: train.objective.teacher=timm:ARCH=WEIGHTS.safetensors or its run's export)")
    elif exp.train.objective.kind == "distill" and not exp.model.distilled:
        p.append("train.objective.kind='distill' trains DeiT's distillation head: the student needs one "
                 "(--set model.distilled=true); a model without a class head cannot be distilled into")
    p += beit_problems(exp)
    if exp.model.kind == "dvae" and exp.eval.split is None:
        p.append("eval.split=none: a tokenizer run measures its codebook usage (dead codes fail it) on an eval "
                 "split; name one (--set eval.split=val)")
    r = exp.resources
    low = r.min_workers if r.min_workers is not None else r.workers
    for world in range(low, r.workers + 1):  # elastic: the global batch must fit every size
        try:
            exp.train.accum_for(world)
        except ValueError as e:
            p.append(f"{e} (workers={world}{' of the elastic range' if low < r.workers else ''})")
            break
    return p


def beit_problems(exp: Experiment) -> list[str]:
    """A BEiT objective needs timm's BEiT backbone (the masked forward is written around its modules)."""
    if exp.train.objective.kind != "beit":
        return []
    if exp.model.kind != "timm" or exp.model.family.key != "beit":
        what = exp.model.name if exp.model.kind == "timm" else f"our ViT {exp.model.variant}"
        return [f"train.objective.kind='beit' pre-trains timm's BEiT backbone (relative position bias, LayerScale), "
                f"not {what}: use model.kind='timm' with a beit_* name, e.g. the recipe beit_b16_i21k"]
    return []


def mae_decoder_memory(exp: Experiment) -> tuple[float, float]:
    """(parameter + gradient + optimizer bytes, activation bytes) of an MAE decoder on one GPU at
    ``train.micro_batch``: an estimate from the shapes alone, for :func:`decoder_memory_problems`.

    E decoder width, L its depth, M its MLP width, H its heads, D the encoder's width, S = N + 1
    tokens (every patch and the class token: the decoder sees all of them), P = patch_size^2 * 3
    pixels per patch, b the micro batch, W the workers.

    * parameters: L * (4E^2 + 4E attention + 2EM + M + E MLP + 4E two LayerNorms) + (D + 1) E
      embedding + E mask token + 2E final norm + (E + 1) P pixel head;
    * bytes per parameter (mixed-precision Adam, Rajbhandari et al. 2019 "ZeRO", Section 3.1): w
      weights + w gradients + 8 Adam moments (+ 4 fp32 master weights when w = 2), w = 2 at
      16 bit, 4 at fp32; ZeRO-1 divides the optimizer part by W, ZeRO-2 the gradients too, ZeRO-3
      the weights too;
    * activations kept for the backward (Korthikanti et al. 2022, "Reducing Activation
      Recomputation in Large Transformer Models", Eq. 1: s b h (34 + 5 a s / h) bytes per layer
      at 16 bit): L * b * S * (34 E + 5 H S) * w / 2; the 5 H S attention-matrix term is dropped
      under the flash / memory-efficient kernels, which never store it. The encoder's activation
      checkpointing does not cover the decoder, so nothing is recomputed.
    """
    train = exp.train
    o = train.objective
    E, L, H = o.decoder_width, o.decoder_depth, o.decoder_heads
    shape = exp.model.shape
    S, b, W = (exp.image_size // shape["patch_size"]) ** 2 + 1, train.micro_batch, exp.resources.workers
    params = mae_decoder_params(exp)
    w = 4 if train.engine.precision == "fp32" else 2
    zero = train.engine.zero_stage
    optimizer = 8 + (4 if w == 2 else 0)
    per_param = w / (W if zero >= 3 else 1) + w / (W if zero >= 2 else 1) + optimizer / (W if zero >= 1 else 1)
    profile = PROFILES.get(train.profile)
    attention = 0 if profile is not None and profile.sdpa in ("flash", "mem_efficient") else 5 * H * S
    activations = L * b * S * (34 * E + attention) * w / 2
    return params * per_param, float(activations)


def mae_decoder_params(exp: Experiment) -> int:
    """Trained parameters of ``exp``'s MAE decoder (the formula of :func:`mae_decoder_memory`)."""
    o = exp.train.objective
    E, L, M = o.decoder_width, o.decoder_depth, o.decoder_mlp_dim
    shape = exp.model.shape
    D, P = shape["width"], shape["patch_size"] ** 2 * exp.model.in_chans
    return L * (4 * E * E + 4 * E + 2 * E * M + M + E + 4 * E) + (D + 1) * E + E + 2 * E + (E + 1) * P


def decoder_memory_problems(exp: Experiment) -> list[str]:
    """An MAE decoder that cannot fit on the device of ``train.profile`` (one line), else nothing.

    Only a named GPU profile is checked (``memory_gb``; "auto" is decided on the workers and
    "cpu" trains in host memory). The estimate (:func:`mae_decoder_memory`) counts the decoder
    alone, so a decoder it refuses cannot fit whatever the encoder needs.
    """
    profile = PROFILES.get(exp.train.profile)
    o = exp.train.objective
    if o.kind != "mae" or profile is None or profile.memory_gb is None:
        return []
    try:
        state, acts = mae_decoder_memory(exp)
    except (KeyError, ValueError):
        return []  # the model itself is invalid: reported by the model check
    if state + acts <= profile.memory_gb * _GB:
        return []
    return [f"train.objective.decoder_width={o.decoder_width}, decoder_depth={o.decoder_depth}: the MAE decoder "
            f"needs about {(state + acts) / _GB:.1f} GB per GPU at micro_batch {exp.train.micro_batch} (estimated: "
            f"{state / _GB:.1f} GB of parameters, gradients and optimizer state + {acts / _GB:.1f} GB of "
            f"activations), more than the {profile.name} profile's {profile.memory_gb:g} GB; lower "
            "train.objective.decoder_width or decoder_depth (MAE's decoder is 512 wide, 8 deep), or "
            "train.micro_batch (accumulation keeps the global batch)"]


def validate(exp: Experiment) -> None:
    """Raise :class:`ConfigError` listing every launch-level problem of ``exp``; cheap, no I/O."""
    problems = experiment_problems(exp)
    if problems:
        raise ConfigError(problems)


def with_workers(exp: Experiment, workers: int) -> Experiment:
    """``exp`` on ``workers`` ranks, keeping the global batch (accumulation is re-derived)."""
    try:
        out = replace(exp, resources=replace(exp.resources, workers=workers))
    except ValueError as e:
        raise ConfigError([f"resources.{ln.strip()}" for ln in str(e).splitlines()[1:]] or [str(e)]) from None
    validate(out)
    return out
