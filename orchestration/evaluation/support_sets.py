"""Few-shot support sets: which train images, chosen by seed, and reading just those.

The support pool is a dataset's train split. For every class the pool's images (in the
dataset's canonical order: shard, then position) are permuted with a generator seeded by
``(seed, class)``; the ``K``-shot support set is the first ``K`` of each class's permutation.
So the choice depends only on the dataset version, the seed and ``K`` (never on ranks,
workers or the process), the sets are nested (the 5-shot set holds the 1-shot set: features
are computed once, for the largest ``K``), and every evaluation sees the same images.

Only the chosen images are read (byte ranges of their shards), each checked against the
sha256 recorded at write time, and decoded with the loader's eval preset (resize + center crop).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import format as fmt
from pipeline.decode import decode_eval
from pipeline.loader import Meta, load_meta
from pipeline.storage import open_storage, url_join
from pipeline.transforms import to_float_batch

from .checks import EvaluationError


class FewShotDataError(EvaluationError):
    """A downstream dataset cannot be used for few-shot evaluation or a linear probe; the message says why."""


@dataclass(frozen=True, kw_only=True)
class SupportPool:
    """A dataset's train split as few-shot material: labels per sample and class names."""

    url: str
    meta: Meta
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def open_pool(url: str, split: str = "train", version: str | None = None) -> SupportPool:
    """Read the metadata of ``url``'s ``split`` (no images); labelled single-label datasets only."""
    meta = load_meta(url, split, None, version)
    if not fmt.is_labelled(meta.info):
        raise FewShotDataError(f"{url}: dataset has no labels (written with --unlabelled): few-shot and linear "
                               "evaluation fit a classifier to labelled images; evaluate on a labelled downstream "
                               "dataset (write it from class folders, without --unlabelled)")
    if meta.info.get("multi_label"):
        raise FewShotDataError(f"{url}: a multi-label dataset; few-shot linear evaluation needs one label per "
                               "image (write the downstream dataset from class folders)")
    classes = fmt.read_classes(fmt.resolve(url, meta.version))
    return SupportPool(url=url, meta=meta, classes=classes)


def class_counts(pool: SupportPool) -> np.ndarray:
    """Images per class in the pool (C,); samples without a label are not counted."""
    labels = pool.meta.labels
    return np.bincount(labels[labels >= 0], minlength=pool.num_classes)[: pool.num_classes]


def _names(names: list[str]) -> str:
    return ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")


def check_classes(pool: SupportPool) -> None:
    """Raise :class:`FewShotDataError` when ``pool`` cannot give a measurement whatever the
    model: fewer than 2 classes (top-1 would be 1.0), or a class without train images (never
    predicted: its test images count as errors by construction)."""
    if pool.num_classes < 2:
        raise FewShotDataError(
            f"{pool.url}: {pool.num_classes} class(es) {pool.classes}: top-1 over fewer than 2 classes is 1.0 "
            "whatever the model; evaluate on a dataset with at least 2 classes")
    empty = [repr(pool.classes[c]) for c, n in enumerate(class_counts(pool)) if n == 0]
    if empty:
        raise FewShotDataError(
            f"{pool.url}: {len(empty)} of {pool.num_classes} classes have no train images: {_names(empty)}; a "
            "classifier can never predict them; write the dataset so every class has train images")


def check_shots(pool: SupportPool, shots: tuple[int, ...]) -> None:
    """Raise :class:`FewShotDataError` for fewer than 2 classes (:func:`check_classes`) and naming
    every class with fewer images than ``max(shots)``."""
    if pool.num_classes < 2:
        check_classes(pool)
    k = max(shots)
    counts = class_counts(pool)
    short = [f"{pool.classes[c]!r} ({int(n)})" for c, n in enumerate(counts) if n < k]
    if short:
        raise FewShotDataError(
            f"{pool.url}: {len(short)} of {pool.num_classes} classes have fewer than {k} train images (the largest "
            f"shot count): {_names(short)}; lower --shots or use a "
            "dataset with more images per class")


def select_support(pool: SupportPool, shots: int, seed: int) -> np.ndarray:
    """Sample ids (C * shots,), class-major, of the ``shots``-shot support set (see module doc)."""
    labels = pool.meta.labels
    out = []
    for c in range(pool.num_classes):
        ids = np.flatnonzero(labels == c)  # ascending = canonical order
        if len(ids) < shots:
            raise FewShotDataError(f"{pool.url}: class {pool.classes[c]!r} has {len(ids)} train images, fewer "
                                   f"than {shots} shots")
        perm = np.random.default_rng([seed, c]).permutation(len(ids))
        out.append(ids[perm[:shots]])
    return np.concatenate(out).astype(np.int64)


def support_digest(pool: SupportPool, ids: np.ndarray) -> str:
    """A short hash of the support set's sample keys (to check two runs saw the same images)."""
    h = hashlib.sha256(pool.meta.version.encode())
    for i in ids.tolist():
        h.update(pool.meta.keys[i].as_py().encode() + b"\0")
    return h.hexdigest()[:16]


#: Concurrent byte-range reads: one GET per support image, so latency, not bandwidth, bounds S3.
READ_THREADS = 16


def read_images(meta: Meta, ids: np.ndarray, *, image_size: int, crop_pct: float = 0.875,
                mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
                std: tuple[float, float, float] = (0.5, 0.5, 0.5)) -> torch.Tensor:
    """The samples ``ids`` as a normalized float32 batch (len(ids), 3, S, S), eval preprocessing."""
    st = open_storage(meta.root_url)

    def one(i: int) -> torch.Tensor:
        shard = meta.shard_names[int(meta.shard_of[i])]
        start, size = int(meta.offsets[i]), int(meta.sizes[i])
        with st.open_range(shard, start, start + size) as f:
            data = f.read_exact(size)
        if meta.digests is not None and hashlib.sha256(data).digest() != meta.digests[i].tobytes():
            raise fmt.IntegrityError(f"sample {meta.keys[i].as_py()} in shard {url_join(meta.root_url, shard)} does "
                                     f"not match the sha256 recorded in samples.parquet; {fmt.REWRITE_HINT}")
        arr = decode_eval(data, size=image_size, crop_pct=crop_pct)  # (S, S, 3) uint8
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)

    with ThreadPoolExecutor(min(READ_THREADS, max(1, len(ids)))) as pool:
        imgs = list(pool.map(one, ids.tolist()))  # in ids order
    return to_float_batch(imgs, mean, std).clone()  # clone: to_float_batch may reuse a pooled buffer
