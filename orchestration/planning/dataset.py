"""What a plan needs to know about the data: images, classes, bytes per sample and shards.

With ``--data`` it is read from the dataset's own shard table (``index.parquet`` through
``pipeline.loader.load_meta``: O(shards), the same read a rank makes at start); without it, the
paper's size of the recipe's dataset and stated defaults are used.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestration.experiment.imagenet import IN1K_IMAGES
from orchestration.experiment.recipes import I21K_IMAGES, JFT_IMAGES
from orchestration.planning.devices import DEFAULT_SAMPLE_BYTES, DEFAULT_SAMPLES_PER_SHARD

#: dataset_name of a recipe -> (images, classes, where the numbers come from), when no --data is given.
KNOWN: dict[str, tuple[int, int, str]] = {
    "i21k": (I21K_IMAGES, 21843, "ImageNet-21k as in the ViT paper (14M images, 21,843 classes)"),
    "jft": (JFT_IMAGES, 18291, "JFT-300M as in the ViT paper (303M images, 18,291 classes)"),
    "imagenet1k": (IN1K_IMAGES, 1000, "ImageNet-1k train (1,281,167 images)"),
    "digits": (1437, 10, "the digits demo (1,797 images, 80 % train)"),
    "demo": (1437, 10, "the digits demo"),
    "study": (1437, 10, "the digits demo"),
}


@dataclass(frozen=True)
class DataFacts:
    """The training split as the plan sees it; ``source`` says where the numbers come from."""

    images: int
    classes: int
    sample_bytes: float  # mean stored bytes per sample (tar members and headers included)
    shards: int
    source: str
    url: str | None = None

    @property
    def samples_per_shard(self) -> float:
        return self.images / max(self.shards, 1)


def default_facts(dataset_name: str) -> DataFacts:
    """The recipe's dataset at the paper's size, ~110 KB samples, 1000 per shard (stated)."""
    images, classes, what = KNOWN.get(dataset_name, (IN1K_IMAGES, 1000, f"unknown dataset {dataset_name!r}: "
                                                     "ImageNet-1k's size assumed"))
    shards = -(-images // DEFAULT_SAMPLES_PER_SHARD)
    return DataFacts(images=images, classes=classes, sample_bytes=float(DEFAULT_SAMPLE_BYTES), shards=shards,
                     source=f"{what}; {DEFAULT_SAMPLE_BYTES / 1e3:.0f} KB per sample and "
                            f"{DEFAULT_SAMPLES_PER_SHARD} samples per shard assumed (give --data to read them)")


def read_facts(url: str, split: str = "train") -> DataFacts:
    """The split of the dataset at ``url`` from its shard table (raises FileNotFoundError /
    ValueError / a storage error, which the CLI reports as one line)."""
    from pipeline.loader.meta import load_meta

    meta = load_meta(url, split)
    images = meta.num_samples
    if images < 1:
        raise ValueError(f"split {split!r} of {url} has no samples")
    total = float(meta.shard_bytes.sum()) if meta.shard_bytes is not None else images * float(DEFAULT_SAMPLE_BYTES)
    classes = int(meta.info.get("num_classes", 0))
    return DataFacts(images=images, classes=classes, sample_bytes=total / images, shards=len(meta.shard_names),
                     source=f"{url} (version {meta.version}), split {split!r}: read from its index.parquet", url=url)
