"""``DataConfig``: how to read one split, and its validation (every bad field reported at once).

Validation runs in ``__post_init__`` so a launch fails on the driver, naming each field, its
value and the allowed range, before any worker or Ray process starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..decode import DEFAULT_MAX_PIXELS
from ..storage import S3Settings


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How to read one split of a sharded dataset; see :mod:`pipeline.loader` for semantics.

    Train epochs drop the remainder: at most ``world_size * num_workers * batch_size - 1``
    samples per epoch (the tail of that epoch's shard permutation, so different samples each
    epoch) are not read, which is what gives every rank the same batch count.
    ``batch_size`` is per rank. ``read_retries`` / ``read_backoff_s``: attempts (each resuming
    with a Range GET from the byte reached) and initial backoff for a shard stream;
    ``connect_timeout_s`` / ``read_timeout_s``: S3 socket timeouts (a stalled connection fails
    the attempt after ``read_timeout_s`` and resumes). ``train=False`` selects the eval preset (resize + center crop,
    no shuffle, no drop, padded last batches with a ``valid`` mask). ``limit_samples`` keeps
    only the first N samples of the split (writer order is already shuffled across classes),
    for data-size scaling studies. ``output="float"`` yields normalized float32 images;
    ``"uint8"`` yields the raw uint8 pixels and leaves ``loader.normalize(x)`` to the consumer,
    after its copy to the accelerator (the Trainer does this): a quarter of the bytes through
    host memory and the host-to-device copy, and no float conversion on the host, the way
    timm's PrefetchLoader and FFCV normalize on the GPU. With mixup/cutmix the batches are
    float either way (mixing needs float; ``normalize`` passes float through).
    ``dataset_version`` pins a version of the dataset at ``url`` (default: the published one,
    resolved once when the loader is built; the loader's ``state_dict`` records it).
    ``max_bad_fraction``: the loader raises once the bad samples of a pass (an epoch, or its
    rest after a resume) are certain to exceed this fraction of it (:class:`BadSampleLimit`).
    """

    url: str
    split: str = "train"
    image_size: int = 224
    batch_size: int = 32
    num_workers: int = 2
    seed: int = 0
    shuffle_buffer: int = 512
    train: bool = True
    crop_scale: tuple[float, float] = (0.05, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    randaugment: tuple[int, int] | None = None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    eval_crop_pct: float = 0.875
    max_bad_fraction: float = 0.01
    prefetch_shards: int = 2
    read_retries: int = 6
    read_backoff_s: float = 0.2
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    prefetch_batches: int = 2
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    limit_samples: int | None = None
    output: str = "float"
    dataset_version: str | None = None

    def __post_init__(self) -> None:
        # Every problem at once (a launch fails here, on the driver, not after Ray starts).
        errors = _data_config_errors(self)
        if errors:
            raise ValueError("invalid DataConfig:\n  " + "\n  ".join(errors))

    def s3_settings(self) -> S3Settings:
        """The S3 client settings for reading shards (and the dataset's metadata)."""
        return S3Settings(connect_timeout_s=self.connect_timeout_s, read_timeout_s=self.read_timeout_s)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _pair_errors(name: str, v: Any, *, upper: float | None) -> list[str]:
    """``crop_scale`` / ``crop_ratio``: two finite numbers with 0 < min <= max (<= upper)."""
    rng = f"0 < min <= max <= {upper}" if upper is not None else "0 < min <= max, finite"
    ok = isinstance(v, tuple | list) and len(v) == 2 and all(_finite(x) for x in v)
    if ok and 0 < v[0] <= v[1] and (upper is None or v[1] <= upper):
        return []
    return [f"{name}={v!r} must be two numbers with {rng}"]


def _data_config_errors(c: DataConfig) -> list[str]:
    """One line per out-of-range field of ``c``: field, value and the allowed range."""
    errors: list[str] = []

    def at_least(name: str, low: int) -> None:
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            errors.append(f"{name}={v!r} must be an int >= {low}")

    if c.output not in ("float", "uint8"):
        errors.append(f"output={c.output!r} must be 'float' or 'uint8'")
    if not isinstance(c.split, str) or not c.split:
        errors.append(f"split={c.split!r} must be a non-empty split name, e.g. 'train'")
    for name in ("image_size", "batch_size", "prefetch_shards", "prefetch_batches", "max_image_pixels"):
        at_least(name, 1)
    for name in ("num_workers", "shuffle_buffer", "read_retries"):
        at_least(name, 0)
    if c.limit_samples is not None:
        at_least("limit_samples", 1)
    errors += _pair_errors("crop_scale", c.crop_scale, upper=1.0)
    errors += _pair_errors("crop_ratio", c.crop_ratio, upper=None)
    if c.randaugment is not None and not (
        len(c.randaugment) == 2 and c.randaugment[0] >= 1 and 0 <= c.randaugment[1] <= 30
    ):
        errors.append(f"randaugment={c.randaugment!r} must be None or (num_ops >= 1, magnitude in [0, 30])")
    for name in ("mixup_alpha", "cutmix_alpha", "read_backoff_s"):
        v = getattr(c, name)
        if not _finite(v) or v < 0:
            errors.append(f"{name}={v!r} must be a finite number >= 0")
    if not (len(c.mean) == 3 and all(_finite(m) for m in c.mean)):
        errors.append(f"mean={c.mean!r} must be three finite numbers (one per RGB channel)")
    if not (len(c.std) == 3 and all(_finite(s) and s > 0 for s in c.std)):
        errors.append(f"std={c.std!r} must be three finite numbers > 0 (images are divided by it)")
    if not (_finite(c.eval_crop_pct) and 0 < c.eval_crop_pct <= 1):
        errors.append(f"eval_crop_pct={c.eval_crop_pct!r} must be in (0, 1]")
    for name in ("connect_timeout_s", "read_timeout_s"):
        v = getattr(c, name)
        if not _finite(v) or v <= 0:
            errors.append(f"{name}={v!r} must be a finite number of seconds > 0")
    if not (_finite(c.max_bad_fraction) and 0 <= c.max_bad_fraction <= 1):
        errors.append(f"max_bad_fraction={c.max_bad_fraction!r} must be in [0, 1]")
    return errors
