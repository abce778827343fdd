"""``DataConfig``: how to read one split, in sections, each validating its own fields.

Validation runs in ``__post_init__`` so a launch fails on the driver, naming each field, its
value and the allowed range, before any worker or Ray process starts.

* ``source``: which data (dataset URL, split, pinned version, a sample limit);
* ``augment``: the random training transform (crop, flip, RandAugment, mixup/cutmix);
* ``preprocess``: the deterministic part (normalisation, the eval centre crop), the same for
  training, evaluation and serving;
* ``io``: how it is read (workers, prefetching, retries, timeouts, the bad-sample budget).

The top level keeps what every consumer sets: resolution, per-rank batch, train/eval preset,
seed and output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from confkit import Checker, replace_paths

from ..decode import DEFAULT_MAX_PIXELS
from ..masking import MaskConfig
from ..storage import S3Settings


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """``url``: the dataset (``s3://bucket/ds`` or a folder, written by write_shards).
    ``dataset_version`` pins a version of it (default: the published one, resolved once when the
    loader is built; the loader's ``state_dict`` records it). ``limit_samples`` keeps only the
    first N samples of the split (writer order is already shuffled across classes), for
    data-size scaling studies."""

    url: str
    split: str = "train"
    dataset_version: str | None = None
    limit_samples: int | None = None

    def __post_init__(self) -> None:
        c = Checker(self)
        c.require(isinstance(self.url, str), f"url={self.url!r} must be a dataset URL or folder")
        c.require(isinstance(self.split, str) and bool(self.split),
                  f"split={self.split!r} must be a non-empty split name, e.g. 'train'")
        c.require(self.dataset_version is None or (isinstance(self.dataset_version, str) and bool(self.dataset_version)),
                  f"dataset_version={self.dataset_version!r} must be a version id or none")
        c.int("limit_samples", ge=1, optional=True)
        c.done()


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """The training transform: inception crop of ``crop_scale`` of the area and ``crop_ratio``
    aspect, horizontal flip, RandAugment ``(num_ops, magnitude)`` (None: off), random erasing
    with probability ``random_erasing`` (DeiT / MAE fine-tuning: 0.25; ``transforms.random_erase``),
    mixup / cutmix (alpha 0: off; with either, batches are float with soft targets).
    ``color_jitter``: brightness, contrast and saturation jitter of that strength (BEiT's
    pre-training: 0.4; 0: off; ``transforms.make_randaugment``).
    ``repeats``: repeated augmentation (DeiT: 3): a training epoch plans every sample ``repeats``
    times, each copy with its own augmentation, the copies on different ranks (``pipeline.plan``)."""

    crop_scale: tuple[float, float] = (0.05, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    randaugment: tuple[int, int] | None = None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    random_erasing: float = 0.0
    repeats: int = 1
    color_jitter: float = 0.0

    def __post_init__(self) -> None:
        c = Checker(self)
        c.numbers("crop_scale", 2, gt=0, le=1.0, ordered=True)
        c.number("color_jitter", ge=0, le=1, why=" (brightness / contrast / saturation jitter; 0: off)")
        c.numbers("crop_ratio", 2, gt=0, ordered=True)
        c.flag("hflip")
        r = self.randaugment
        c.require(r is None or (isinstance(r, tuple | list) and len(r) == 2 and r[0] >= 1 and 0 <= r[1] <= 30),
                  f"randaugment={r!r} must be None or (num_ops >= 1, magnitude in [0, 30])")
        c.number("mixup_alpha", ge=0)
        c.number("cutmix_alpha", ge=0)
        c.number("random_erasing", ge=0, le=1, why=" (the probability of erasing a rectangle of a training image)")
        c.int("repeats", ge=1, why=" (copies of each sample per epoch; 1: no repeated augmentation)")
        c.done()


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """Pixels -> model input, the same in training, evaluation and serving: ``(x/255 - mean) / std``
    per RGB channel (the paper normalises to [-1, 1]); eval images are resized so that a centre
    crop of ``eval_crop_pct`` of the short side is ``image_size``."""

    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    eval_crop_pct: float = 0.875

    def __post_init__(self) -> None:
        c = Checker(self)
        c.numbers("mean", 3, why=" (one per RGB channel)")
        c.numbers("std", 3, gt=0, why=" (images are divided by it)")
        c.number("eval_crop_pct", gt=0, le=1)
        c.done()


@dataclass(frozen=True, kw_only=True)
class IOConfig:
    """How shards are read.

    ``num_workers`` DataLoader processes per rank, each ``prefetch_shards`` shards and the
    DataLoader ``prefetch_batches`` batches ahead; ``shuffle_buffer`` samples mixed within a
    worker. ``read_retries`` / ``read_backoff_s``: attempts (each resuming with a Range GET from
    the byte reached) and initial backoff for a shard stream; ``connect_timeout_s`` /
    ``read_timeout_s``: S3 socket timeouts (a stalled connection fails the attempt after
    ``read_timeout_s`` and resumes). ``max_bad_fraction``: the loader raises once the bad samples
    of a pass are certain to exceed this fraction of it (``BadSampleLimit``);
    ``max_image_pixels``: larger images are refused as decompression bombs.
    ``metadata_cache``: read a remote dataset's shard table through the node's cache
    (``$TMPDIR/vitscale-meta-{euid}``, by sha256), so the ranks of a node download it once.
    ``persistent_workers``: keep the DataLoader worker processes from pass to pass (epochs,
    resumes, eval after train) instead of starting ``num_workers`` new ones each time; the
    batches are the same either way (:mod:`.workers`).
    """

    num_workers: int = 2
    shuffle_buffer: int = 512
    prefetch_shards: int = 2
    prefetch_batches: int = 2
    read_retries: int = 6
    read_backoff_s: float = 0.2
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_bad_fraction: float = 0.01
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    metadata_cache: bool = True
    persistent_workers: bool = True

    def __post_init__(self) -> None:
        c = Checker(self)
        c.flag("metadata_cache")
        c.flag("persistent_workers")
        for name in ("prefetch_shards", "prefetch_batches", "max_image_pixels"):
            c.int(name, ge=1)
        for name in ("num_workers", "shuffle_buffer", "read_retries"):
            c.int(name, ge=0)
        c.number("read_backoff_s", ge=0)
        c.number("connect_timeout_s", gt=0, unit="seconds")
        c.number("read_timeout_s", gt=0, unit="seconds")
        c.number("max_bad_fraction", ge=0, le=1)
        c.done()


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How to read one split of a sharded dataset; see :mod:`pipeline.loader` for semantics.

    Train epochs drop the remainder: at most ``world_size * io.num_workers * batch_size - 1``
    samples per epoch (the tail of that epoch's shard permutation, so different samples each
    epoch) are not read, which is what gives every rank the same batch count. ``batch_size`` is
    per rank. ``train=False`` selects the eval preset (resize + center crop, no shuffle, no drop,
    padded last batches with a ``valid`` mask). ``output="float"`` yields normalized float32
    images; ``"uint8"`` yields the raw uint8 pixels and leaves ``loader.normalize(x)`` to the
    consumer, after its copy to the accelerator (the Trainer does this): a quarter of the bytes
    through host memory and the host-to-device copy, and no float conversion on the host, the
    way timm's PrefetchLoader and FFCV normalize on the GPU. With mixup/cutmix the batches are
    float either way (mixing needs float; ``normalize`` passes float through). ``mask``: patch
    masks for masked image modelling (``pipeline.masking``); when its kind is not "none" every
    batch also carries a (B, N) bool mask, drawn per sample from the sample's own seed: training
    batches are ``(images, targets, mask)``, eval batches ``(images, targets, valid, mask)``.
    """

    source: SourceConfig
    image_size: int = 224
    batch_size: int = 32
    train: bool = True
    seed: int = 0
    output: str = "float"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    io: IOConfig = field(default_factory=IOConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)

    def __post_init__(self) -> None:
        c = Checker(self)
        c.int("image_size", ge=1)
        c.int("batch_size", ge=1)
        c.flag("train")
        c.int("seed", ge=0)
        c.choice("output", ("float", "uint8"))
        for line in self.mask.problems(self.image_size) if isinstance(self.image_size, int) else []:
            c.fail(f"mask: {line}")
        c.done()

    def replace(self, **paths: Any) -> DataConfig:
        """This config with leaves replaced by path: ``cfg.replace(**{"source.split": "val"})``."""
        return replace_paths(self, paths)

    def for_eval(self, split: str, **paths: Any) -> DataConfig:
        """The eval preset of ``split`` (the whole split: a training-sample limit never shrinks an
        evaluation), with further leaves replaced by path."""
        return replace_paths(self, {"source.split": split, "source.limit_samples": None, "train": False, **paths})

    def s3_settings(self) -> S3Settings:
        """The S3 client settings for reading shards (and the dataset's metadata)."""
        return S3Settings(connect_timeout_s=self.io.connect_timeout_s, read_timeout_s=self.io.read_timeout_s)
