"""``build_loader``: deterministic, resumable, rank-balanced batches from a sharded dataset.

The stages are composed in exactly one place, :meth:`ShardStream.__iter__`, in order:
shard plan -> split by rank -> split by worker -> read -> decode -> transform -> batch.

* Each (rank, DataLoader worker) pair is a *slot* of the :class:`~pipeline.plan.EpochPlan`.
* Batching happens inside the worker (``DataLoader(batch_size=None)``), and the DataLoader
  returns worker results round robin, so the batch sequence of a rank is a pure function of
  ``(seed, epoch, world_size, num_workers, batch_size)``. The resume cursor is therefore just
  ``(epoch, batches yielded)``: on restore each worker recomputes its emission order and skips
  the samples it already produced *without reading or decoding them*.
* A bad sample in a train batch is replaced by a good one of the same batch (counted as
  ``filled``) rather than shortening the batch: batch counts, and hence collectives, never
  depend on data quality. In eval batches it is masked (``valid=False``) instead.
* Each batch carries the worker's stats delta back to the main process, so
  ``loader.stats()`` aggregates over workers. The loader raises :class:`BadDataError`, naming
  the worst shards, as soon as the bad samples of the pass exceed ``max_bad_fraction`` of the
  samples the pass will read (see :class:`BadSampleLimit`), whatever the split's size or the
  order the bad samples come in. That holds for eval too: a truncated val shard is an error
  naming the shard, not metrics quietly computed on what was left.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
import random
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import format as fmt
from .decode import DEFAULT_MAX_PIXELS, BadSample, decode_eval, decode_train
from .plan import EpochPlan, consumed_ids, epoch_order, mix, worker_batches_done
from .storage import S3Settings, open_storage, url_join
from .stream import Run, Truncated, iter_runs, make_runs
from .transforms import (
    affine_for,
    make_randaugment,
    mix_batch,
    normalize_uint8,
    sample_transform,
    stack_uint8,
    to_float_batch,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1
#: Bad samples logged (with shard and key) per worker per epoch before going quiet.
LOG_FIRST_BAD = 3


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How to read one split of a sharded dataset; see the module docstring for semantics.

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


class BadDataError(RuntimeError):
    """Too many bad samples; the message names the worst shards."""


#: One-sided z of the early-warning Wilson bound (about 1e-6 false-alarm rate per check).
WARN_Z = 4.75


def wilson_lower(bad: int, seen: int, z: float = WARN_Z) -> float:
    """One-sided Wilson score lower bound of a binomial fraction ``bad / seen``."""
    if seen <= 0:
        return 0.0
    p, z2 = bad / seen, z * z
    centre = p + z2 / (2 * seen)
    spread = z * math.sqrt(p * (1 - p) / seen + z2 / (4 * seen * seen))
    return max(0.0, (centre - spread) / (1 + z2 / seen))


@dataclass
class BadSampleLimit:
    """When the bad samples of one pass over a rank's share of a split are too many.

    The pass will read ``planned`` samples. After ``bad`` of them were bad, the pass's bad
    fraction is at least ``bad / planned`` whatever the rest holds: a lower bound that holds
    with certainty rather than at a confidence level, and assumes nothing about order. Bad
    samples come in clusters (a corrupt or truncated shard is a run of them), which is what
    fools binomial bounds on the samples seen so far (Wilson, Clopper-Pearson assume
    independent samples) and the old "bad / seen after 200 samples" rule: both raised on a
    few bad samples at the start of a clean epoch, and the latter never looked at splits under
    200 samples. :meth:`over` is true as soon as ``bad > max_fraction * planned``: the first
    moment a limit breach is certain. A 100 % bad 180-sample split trips on its 2nd bad sample
    at 1 %; a clean epoch with 0.5 % bad samples never trips, however they are ordered.
    A Wilson lower bound over ``max_fraction`` is only a logged early warning (:meth:`likely`).
    """

    max_fraction: float
    planned: int
    bad: int = 0
    seen: int = 0
    warned: bool = False

    def add(self, bad: int, good: int) -> None:
        self.bad += bad
        self.seen += bad + good

    def over(self) -> bool:
        return self.bad > self.max_fraction * self.planned

    def likely(self) -> bool:
        return wilson_lower(self.bad, self.seen) > self.max_fraction


@dataclass
class Meta:
    """The split's per-sample index as flat numpy arrays (shared copy-on-write with workers)."""

    shard_names: list[str]
    shard_start: np.ndarray  # (n_shards + 1,) first id of each shard
    shard_of: np.ndarray  # (T,) int32
    offsets: np.ndarray  # (T,) int64 byte offset of the image member's data
    sizes: np.ndarray  # (T,) int64
    labels: np.ndarray  # (T,) int32 single-label (-1: missing)
    ml_offsets: np.ndarray | None  # (T + 1,) CSR into ml_values for multi-label
    ml_values: np.ndarray | None
    keys: Any  # pyarrow string array (T,)
    info: dict[str, Any] = field(default_factory=dict)
    version: str = fmt.LEGACY_VERSION  # the pinned dataset version
    root_url: str = ""  # that version's folder; shard names are relative to it
    digests: np.ndarray | None = None  # (T, 32) uint8 sha256 of each image; None for format 1
    shard_samples: np.ndarray | None = None  # (n_shards,) samples of each whole shard (index.parquet)
    shard_bytes: np.ndarray | None = None  # (n_shards,) recorded size
    shard_sha256: list[str] = field(default_factory=list)  # (n_shards,) recorded sha256 hex

    @property
    def num_samples(self) -> int:
        return int(self.shard_start[-1])


def load_meta(url: str, split: str, limit: int | None = None, version: str | None = None, *,
              s3: S3Settings | None = None) -> Meta:
    """Pin a version (``version``, else the published one) and read the split's rows.

    Every metadata file is checked against the manifest's size and sha256 and validated
    through :mod:`pipeline.format`, so a damaged file fails here, naming it.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    res = fmt.resolve(url, version, s3=s3)
    info = res.manifest
    index = fmt.read_index(res)
    index = index.filter(pc.equal(index["split"], split))
    if index.num_rows == 0:
        raise ValueError(f"split {split!r} not in {url} (has {sorted(info.get('counts', {}))})")
    samples = fmt.read_samples(res)
    samples = samples.filter(pc.equal(samples["split"], split))
    names = index["shard"].to_pylist()
    shard_idx = pc.index_in(samples["shard"], value_set=index["shard"].combine_chunks())  # vectorised lookup
    if shard_idx.null_count:
        raise fmt.DatasetFormatError(f"{url_join(res.root_url, fmt.SAMPLES)} names shards missing from "
                                     f"{url_join(res.root_url, fmt.INDEX)}; {fmt.REWRITE_HINT}")
    shard_of = shard_idx.to_numpy(zero_copy_only=False).astype(np.int32)
    order = np.lexsort((samples["offset"].to_numpy(), shard_of))  # canonical: shard, then file order
    samples = samples.take(pa.array(order))
    shard_of = shard_of[order]
    counts = np.bincount(shard_of, minlength=len(names))
    if not np.array_equal(counts, index["samples"].to_numpy()):
        raise fmt.DatasetFormatError(f"{url_join(res.root_url, fmt.INDEX)} sample counts disagree with "
                                     f"{url_join(res.root_url, fmt.SAMPLES)}; {fmt.REWRITE_HINT}")
    shard_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if limit is not None and limit < shard_start[-1]:
        shard_start = np.minimum(shard_start, limit)
        keep = int(np.searchsorted(shard_start, limit, side="left")) + 1
        shard_start = shard_start[:keep]
        names = names[: keep - 1]
        samples = samples.slice(0, limit)
        shard_of = shard_of[:limit]
    ml_off = ml_val = None
    if info.get("multi_label"):
        col = samples["labels"].combine_chunks()
        ml_off = col.offsets.to_numpy().astype(np.int64)
        ml_off = ml_off - ml_off[0]
        ml_val = col.flatten().to_numpy().astype(np.int64)
    n = len(names)
    return Meta(
        shard_names=names, shard_start=shard_start, shard_of=shard_of,
        offsets=samples["offset"].to_numpy().astype(np.int64), sizes=samples["size"].to_numpy().astype(np.int64),
        labels=samples["label"].to_numpy().astype(np.int32), ml_offsets=ml_off, ml_values=ml_val,
        keys=samples["key"].combine_chunks(), info=info, version=res.version, root_url=res.root_url,
        digests=_digests(samples, url), shard_samples=index["samples"].to_numpy()[:n].astype(np.int64),
        shard_bytes=index["bytes"].to_numpy()[:n].astype(np.int64), shard_sha256=index["sha256"].to_pylist()[:n],
    )


def _digests(samples: Any, url: str) -> np.ndarray | None:
    """The ``(T, 32)`` uint8 per-sample sha256 (zero-copy view of the arrow column), if any."""
    if "sha256" not in samples.column_names:  # format 1 has no per-sample hashes
        log.warning("%s is a format-1 dataset without per-sample sha256: samples are not verified; %s",
                    url, fmt.REWRITE_HINT)
        return None
    col = samples["sha256"].combine_chunks()
    digests = np.frombuffer(col.buffers()[1], np.uint8)[col.offset * 32:(col.offset + len(col)) * 32]
    return digests.reshape(len(col), 32)


@dataclass(frozen=True)
class Segment:
    """A finished part of the current epoch under an earlier layout (see pipeline.plan)."""

    world_size: int
    num_workers: int
    batch_size: int
    batches: int


@dataclasses.dataclass(slots=True)
class _Sample:
    """One emission slot of a batch: a decoded image + target, a bad sample's reason, or padding."""

    id: int
    image: torch.Tensor | None = None
    target: Any = None
    reason: str | None = None  # BadSample reason
    shard: str | None = None  # the bad sample's shard


def _in_order(source: Iterator[tuple[int, bytes | Truncated]], emission: np.ndarray
              ) -> Iterator[tuple[int, bytes | Truncated | None]]:
    """The slot's samples in emission order (-1 = eval padding -> None) from the shard runs, which
    arrive in read order: a small reorder buffer (a shuffle buffer's worth at most)."""
    fetched: dict[int, bytes | Truncated] = {}
    for i in emission.tolist():
        if i < 0:
            yield i, None
            continue
        while i not in fetched:
            j, data = next(source)
            fetched[j] = data
        yield i, fetched.pop(i)


def _batched(items: Iterator[_Sample], size: int) -> Iterator[list[_Sample]]:
    batch: list[_Sample] = []
    for x in items:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class ShardStream(IterableDataset):
    """One rank's epoch as an IterableDataset; every DataLoader worker plays one slot."""

    def __init__(self, cfg: DataConfig, meta: Meta, plan: EpochPlan, rank: int, skip: int,
                 verified: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.cfg, self.meta, self.plan, self.rank, self.skip = cfg, meta, plan, rank, skip
        self.verified = verified  # shards whose whole-shard sha256 already passed in this run
        self.num_classes = int(meta.info["num_classes"])
        self.multi_label = bool(meta.info.get("multi_label"))

    # ---------------------------------------------------------------- labels
    def _target(self, i: int) -> int | np.ndarray:
        c = self.num_classes
        if self.multi_label:
            assert self.meta.ml_offsets is not None and self.meta.ml_values is not None
            ids = self.meta.ml_values[self.meta.ml_offsets[i]: self.meta.ml_offsets[i + 1]]
            if len(ids) == 0:
                raise BadSample("missing_label")
            if ids.min() < 0 or ids.max() >= c:
                raise BadSample("label_out_of_range", str(ids.tolist()))
            v = np.zeros(c, np.float32)
            v[ids] = 1.0
            return v
        y = int(self.meta.labels[i])
        if y < 0:
            raise BadSample("missing_label")
        if y >= c:
            raise BadSample("label_out_of_range", f"{y} >= num_classes {c}")
        return y

    # ---------------------------------------------------------------- integrity
    def slot_work(self, logical: int) -> tuple[int, np.ndarray, list[Run]]:
        """(batches already done, emission ids, shard runs with their checks) of a logical worker."""
        plan, meta, B = self.plan, self.meta, self.cfg.batch_size
        slot = self.rank * plan.num_workers + logical
        done = min(worker_batches_done(self.skip, logical, plan.num_workers), plan.batches_per_slot)
        emission = plan.slot_emission(slot)[done * B:]  # (n_batches * B,) ids, -1 = eval padding
        wanted = emission[emission >= 0]
        stream = plan.slot_stream(slot)
        stream = stream[np.isin(stream, wanted)]
        runs = make_runs(stream, meta.shard_of, meta.shard_names, meta.offsets, meta.sizes)
        if meta.shard_bytes is None or meta.shard_samples is None:
            return done, emission, runs
        out = []
        for r in runs:
            s = int(meta.shard_of[r.ids[0]])
            whole = len(r.ids) == meta.shard_samples[s] and r.shard not in self.verified
            out.append(dataclasses.replace(r, expect_bytes=int(meta.shard_bytes[s]),
                                           expect_sha256=meta.shard_sha256[s] if whole else None))
        return done, emission, out

    def whole_checked(self) -> set[str]:
        """Shards this rank's epoch reads whole, and so checks against their recorded sha256."""
        return {r.shard for w in range(self.plan.num_workers) for r in self.slot_work(w)[2] if r.expect_sha256}

    def _verify(self, i: int, data: bytes) -> None:
        # The image bytes are already in memory: one sha256 (~2 us/KB, bench/verify.py), no extra read.
        digests = self.meta.digests
        if digests is not None and hashlib.sha256(data).digest() != digests[i].tobytes():
            shard = self.meta.shard_names[int(self.meta.shard_of[i])]
            raise fmt.IntegrityError(
                f"sample {self.meta.keys[i].as_py()} in shard {url_join(self.meta.root_url, shard)} does not match "
                f"the sha256 recorded in samples.parquet: the shard was modified after publishing; "
                f"{fmt.REWRITE_HINT}")

    # ---------------------------------------------------------------- the pipeline
    # One slot's epoch, as stages composed in __iter__ (each a small generator or function):
    #   shard runs (pipeline.stream.iter_runs: ranged reads, retries, whole-shard sha256)
    #   -> _in_order: the slot's emission order          -> _checked: per-sample sha256
    #   -> _samples: label + decode + augment, or the bad-sample reason
    #   -> _batched: B at a time                          -> _collate: tensors + stats
    def __iter__(self) -> Iterator[tuple]:
        cfg, plan = self.cfg, self.plan
        logical = self._logical_worker()
        slot = self.rank * plan.num_workers + logical
        done, emission, runs = self.slot_work(logical)
        source = iter_runs(open_storage(self.meta.root_url, s3=cfg.s3_settings()), runs, prefetch=cfg.prefetch_shards,
                           retries=cfg.read_retries, backoff=cfg.read_backoff_s)
        samples = self._samples(self._checked(_in_order(source, emission)))
        last_good: _Sample | None = None
        for k, batch in enumerate(_batched(samples, cfg.batch_size)):
            yield self._collate(batch, k + done, slot, last_good)
            last_good = next((x for x in reversed(batch) if x.image is not None), last_good)
        for _ in source:  # the last run ends with its whole-shard check: let it report (no samples left)
            pass

    def _logical_worker(self) -> int:
        """The logical worker this process plays. DataLoader always starts its round robin at
        worker 0; after resuming at batch k the next batch belongs to logical worker k % W, so
        worker i plays logical (i + k) % W."""
        wi = get_worker_info()
        if wi is not None:
            torch.set_num_threads(1)
        return ((wi.id if wi is not None else 0) + self.skip) % self.plan.num_workers

    def _checked(self, items: Iterator[tuple[int, bytes | Truncated | None]]
                 ) -> Iterator[tuple[int, bytes | Truncated | None]]:
        """Raises IntegrityError (never a skipped sample) when bytes differ from samples.parquet."""
        for i, data in items:
            if isinstance(data, bytes):
                self._verify(i, data)
            yield i, data

    def _samples(self, items: Iterator[tuple[int, bytes | Truncated | None]]) -> Iterator[_Sample]:
        """Decoded samples; a bad one carries its reason (the first LOG_FIRST_BAD are logged)."""
        logged = 0
        for i, data in items:
            if data is None:  # eval padding
                yield _Sample(i)
                continue
            try:
                yield self._decode(i, data)
            except BadSample as exc:
                shard = self.meta.shard_names[int(self.meta.shard_of[i])]
                if logged < LOG_FIRST_BAD:
                    logged += 1
                    log.warning("skipping bad sample: shard %s key %s: %s", shard, self.meta.keys[i].as_py(), exc)
                yield _Sample(i, reason=exc.reason, shard=shard)

    def _decode(self, i: int, data: bytes | Truncated) -> _Sample:
        cfg = self.cfg
        if isinstance(data, Truncated):
            raise BadSample("truncated", "shard ended inside this member")
        target = self._target(i)
        sseed = mix(cfg.seed, self.plan.epoch, i)
        if cfg.train:
            arr = decode_train(data, size=cfg.image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, hflip=cfg.hflip,
                               rng=random.Random(sseed), max_pixels=cfg.max_image_pixels)
        else:
            arr = decode_eval(data, size=cfg.image_size, crop_pct=cfg.eval_crop_pct, max_pixels=cfg.max_image_pixels)
        return _Sample(i, image=sample_transform(arr, self._randaug, sseed), target=target)

    @functools.cached_property
    def _randaug(self) -> Any:
        return make_randaugment(self.cfg.randaugment) if self.cfg.train else None

    def _collate(self, batch: list[_Sample], batch_idx: int, slot: int, last_good: _Sample | None) -> tuple:
        cfg, S, C = self.cfg, self.cfg.image_size, self.num_classes
        imgs: list[torch.Tensor | None] = [x.image for x in batch]
        tgts: list[Any] = [x.target for x in batch]
        ids = [x.id for x in batch]
        valid = [im is not None for im in imgs]
        reasons = Counter(x.reason for x in batch if x.reason)
        bad_shards = Counter(x.shard for x in batch if x.reason)
        stats: dict[str, Any] = {"samples": sum(valid), "reasons": dict(reasons), "shards": dict(bad_shards)}
        if cfg.train:
            # Fill bad slots with good samples of the same batch so every batch has B rows.
            good = [k for k, v in enumerate(valid) if v]
            pool = ([(imgs[k], tgts[k]) for k in good]
                    or ([(last_good.image, last_good.target)] if last_good is not None else []))
            filled = 0
            for k, v in enumerate(valid):
                if not v:
                    filled += 1
                    if pool:
                        imgs[k], tgts[k] = pool[filled % len(pool)]
                    else:  # a whole bad batch at the very start of a slot: blank rows, label 0
                        imgs[k] = torch.zeros(3, S, S, dtype=torch.uint8)
                        tgts[k] = np.zeros(C, np.float32) if self.multi_label else 0
            if filled:
                stats["filled"] = filled
        else:
            for k, v in enumerate(valid):
                if not v:
                    imgs[k] = torch.zeros(3, S, S, dtype=torch.uint8)
                    tgts[k] = np.zeros(C, np.float32) if self.multi_label else 0
            stats["padded"] = sum(1 for i in ids if i < 0)
        in_worker = get_worker_info() is not None
        mixing = cfg.train and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)
        if (in_worker or cfg.output == "uint8") and not mixing:
            # uint8 across the process boundary; Loader.__iter__ normalizes in the main process
            # unless the consumer does it on its device (output="uint8").
            x = stack_uint8(imgs, shared=in_worker)  # type: ignore[arg-type]
        else:
            x = to_float_batch(imgs, cfg.mean, cfg.std, shared=in_worker)  # type: ignore[arg-type]
        if self.multi_label:
            y = torch.from_numpy(np.stack(tgts))  # (B, C) float32 multi-hot
        else:
            y = torch.tensor(tgts, dtype=torch.int64)  # (B,)
        if mixing:
            if y.dtype == torch.int64:
                y = torch.nn.functional.one_hot(y, C).float()
            x, y = mix_batch(x, y, mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                             seed=mix(cfg.seed, self.plan.epoch, self.plan.segment, slot, batch_idx, 0x313))
        if cfg.train:
            return x, y, stats
        return x, y, torch.tensor(valid, dtype=torch.bool), stats


#: How often a DataLoader worker checks that the process that forked it still exists.
PARENT_CHECK_S = 1.0


def leave_sigterm_to_the_parent(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: a SIGTERM meant for the training process is not this worker's.

    Launchers stop a rank by signalling its whole process group (``torchrun`` does
    ``os.killpg``; a container stop or a node shutdown signals every process), so the
    DataLoader workers get the preemption SIGTERM too. torch's worker handler dies on any SIGTERM
    not sent by its parent, and the main process then raises "DataLoader worker exited
    unexpectedly" in the middle of the step it was to finish and checkpoint. Here SIGTERM is
    blocked and one thread takes it with its sender: from the parent (the DataLoader shutting a
    worker down) the worker exits 0 as torch's handler does; from anyone else it is ignored, the
    main process decides (finish the step, save, stop the loader). The same thread ends a worker
    whose parent is gone (``os._exit`` after a preemption save or a hang dump) within
    :data:`PARENT_CHECK_S`, even one stuck in a read.
    """
    if not hasattr(signal, "sigtimedwait"):  # macOS, Windows: torch's own handling stays
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it

    def watch() -> None:
        while True:
            info = signal.sigtimedwait({signal.SIGTERM}, PARENT_CHECK_S)
            if os.getppid() != parent or (info is not None and info.si_pid == parent):
                os._exit(0)

    threading.Thread(target=watch, name="vitscale-loader-sigterm", daemon=True).start()


class Loader:
    """One rank's view of a split: iterate for an epoch of batches; resumable; see module doc."""

    def __init__(self, cfg: DataConfig, *, rank: int, world_size: int, epoch: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self._plan_cache: tuple[tuple, EpochPlan] | None = None
        self._pin(load_meta(cfg.url, cfg.split, cfg.limit_samples, cfg.dataset_version, s3=cfg.s3_settings()))
        self.epoch = epoch
        self._batches = 0  # yielded in the current segment of the current epoch
        self._segments: list[Segment] = []
        self._stats: Counter[str] = Counter()
        self._bad_shards: Counter[str] = Counter()
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._limit = BadSampleLimit(max_fraction=cfg.max_bad_fraction, planned=0)  # set per pass in __iter__
        self._check_size()

    def _pin(self, meta: Meta) -> None:
        self.meta = meta
        self.info: dict[str, Any] = meta.info
        self.num_classes = int(self.info["num_classes"])
        self.multi_label = bool(self.info.get("multi_label"))
        self._verified: set[str] = set()  # shards whose whole sha256 passed (first read in this run)
        self._plan_cache = None

    @property
    def dataset_version(self) -> str:
        """The pinned dataset version (resolved once; saved in :meth:`state_dict`)."""
        return self.meta.version

    @property
    def workers(self) -> int:
        return max(1, self.cfg.num_workers)

    def _check_size(self) -> None:
        p = self.plan()
        if p.batches_per_slot == 0 and not self._segments:
            T, S, B = len(p.order), p.num_slots, self.cfg.batch_size
            raise ValueError(f"split {self.cfg.split!r} has {T} samples, fewer than world_size*num_workers*"
                             f"batch_size = {S}*{B} = {S * B}: lower batch_size or num_workers")

    # ---------------------------------------------------------------- plan
    def plan(self) -> EpochPlan:
        """The plan of the current segment of the current epoch (cached)."""
        key = (self.epoch, tuple(self._segments), self.world_size, self.workers, self.cfg.batch_size)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        cfg = self.cfg
        order = epoch_order(self.meta.shard_start, seed=cfg.seed, epoch=self.epoch, train=cfg.train)
        for s, seg in enumerate(self._segments):
            p = EpochPlan(order, seg.world_size, seg.num_workers, seg.batch_size, cfg.train, cfg.seed,
                          self.epoch, s, cfg.shuffle_buffer)
            order = order[~np.isin(order, consumed_ids(p, seg.batches))]
        plan = EpochPlan(order, self.world_size, self.workers, cfg.batch_size, cfg.train, cfg.seed, self.epoch,
                         len(self._segments), cfg.shuffle_buffer)
        self._plan_cache = (key, plan)
        return plan

    def __len__(self) -> int:
        """Batches in the current epoch for this rank (identical on every rank)."""
        return sum(s.batches for s in self._segments) + self.plan().batches_per_rank

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[tuple]:
        plan = self.plan()
        if self._batches >= plan.batches_per_rank:
            self._advance_epoch()
            plan = self.plan()
        self._limit = BadSampleLimit(max_fraction=self.cfg.max_bad_fraction, planned=self._planned(plan))
        ds = ShardStream(self.cfg, self.meta, plan, self.rank, self._batches, frozenset(self._verified))
        checking = ds.whole_checked()
        nw = self.cfg.num_workers
        dl = DataLoader(ds, batch_size=None, num_workers=nw, prefetch_factor=self.cfg.prefetch_batches if nw else None,
                        multiprocessing_context="fork" if nw else None, persistent_workers=False,
                        worker_init_fn=leave_sigterm_to_the_parent if nw else None)
        for item in dl:
            *batch, stats = item
            self._account(stats)
            if batch[0].dtype == torch.uint8 and self.cfg.output == "float":  # normalize once per batch
                batch[0] = to_float_batch(batch[0], self.cfg.mean, self.cfg.std)
            self._batches += 1
            yield tuple(batch)
        if self._batches >= plan.batches_per_rank:
            self._verified |= checking  # every run finished, so every check passed
            self._advance_epoch()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, S, S)`` images (``output="uint8"``) -> normalized float32 on their device.

        Float input is returned unchanged, so a consumer may call this on every batch.
        """
        if images.dtype != torch.uint8:
            return images
        affine = self._affine.get(images.device)
        if affine is None:  # built once per device: no small host->device copies per step
            affine = self._affine[images.device] = affine_for(self.cfg.mean, self.cfg.std, images.shape[1],
                                                              images.device)
        return normalize_uint8(images, affine)

    def _planned(self, plan: EpochPlan) -> int:
        """Real samples this rank reads from batch ``self._batches`` to the end of ``plan``."""
        B, W = self.cfg.batch_size, plan.num_workers
        if self.cfg.train:
            return (plan.batches_per_rank - self._batches) * B
        n = 0
        for w in range(W):  # eval: emission padding (-1) is not a sample
            done = min(worker_batches_done(self._batches, w, W), plan.batches_per_slot)
            n += int((plan.slot_emission(self.rank * W + w)[done * B:] >= 0).sum())
        return n

    def _advance_epoch(self) -> None:
        self.epoch += 1
        self._batches = 0
        self._segments = []

    def _account(self, stats: dict[str, Any]) -> None:
        self._stats["samples"] += stats["samples"]
        for k in ("filled", "padded"):
            if stats.get(k):
                self._stats[k] += stats[k]
        for r, n in stats["reasons"].items():
            self._stats[f"skipped_{r}"] += n
            self._stats["skipped"] += n
        self._bad_shards.update(stats["shards"])
        n_bad = sum(stats["reasons"].values())
        lim = self._limit
        lim.add(n_bad, stats["samples"])
        if n_bad and lim.over():
            raise BadDataError(
                f"{lim.bad} bad samples of the {lim.planned} this pass of split {self.cfg.split!r} reads "
                f"({lim.seen} read so far) already exceed max_bad_fraction {self.cfg.max_bad_fraction:.1%}; "
                f"worst shards: {self._worst()}; reasons: {self._reasons()}. Rewrite the dataset "
                "(python -m pipeline.write_shards) or raise max_bad_fraction")
        if n_bad and not lim.warned and lim.likely():
            lim.warned = True
            log.warning("bad samples: %d of %d read in split %r, likely above max_bad_fraction %.1f%%; the "
                        "loader raises once %d of the %d planned are bad; worst shards: %s", lim.bad, lim.seen,
                        self.cfg.split, 100 * self.cfg.max_bad_fraction,
                        int(self.cfg.max_bad_fraction * lim.planned) + 1, lim.planned, self._worst())

    def _worst(self) -> str:
        return ", ".join(f"{s} ({n} bad)" for s, n in self._bad_shards.most_common(5))

    def _reasons(self) -> dict[str, int]:
        return {k[8:]: v for k, v in self._stats.items() if k.startswith("skipped_")}

    # ---------------------------------------------------------------- state
    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch``."""
        self.epoch, self._batches, self._segments = int(epoch), 0, []

    def state_dict(self) -> dict[str, Any]:
        """JSON-able cursor: epoch, batches yielded, layout (and earlier layouts this epoch)."""
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "batches": self._batches,
            "world_size": self.world_size, "num_workers": self.workers, "batch_size": self.cfg.batch_size,
            "seed": self.cfg.seed, "split": self.cfg.split, "num_samples": self.meta.num_samples,
            "dataset_version": self.meta.version,
            "segments": [vars(s).copy() for s in self._segments],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a cursor. Same layout: exact. Different world/workers/batch: no repeats.

        A state that names a dataset version re-pins that version (a newer one may have been
        published since the state was saved); if it was deleted the error says so.
        """
        pinned = state.get("dataset_version")
        if pinned is not None and pinned != self.meta.version:
            log.warning("loader state pins dataset version %s of %s (published now: %s); reading the pinned version",
                        pinned, self.cfg.url, self.meta.version)
            self._pin(load_meta(self.cfg.url, self.cfg.split, self.cfg.limit_samples, pinned,
                                s3=self.cfg.s3_settings()))
        if state.get("num_samples") != self.meta.num_samples or state.get("seed") != self.cfg.seed:
            raise ValueError(f"loader state is for a different dataset or seed (num_samples "
                             f"{state.get('num_samples')} vs {self.meta.num_samples}, seed {state.get('seed')} "
                             f"vs {self.cfg.seed})")
        self.epoch = int(state["epoch"])
        self._segments = [Segment(**s) for s in state.get("segments", [])]
        layout = (state["world_size"], state["num_workers"], state["batch_size"])
        if layout == (self.world_size, self.workers, self.cfg.batch_size):
            self._batches = int(state["batches"])
        else:
            if state["batches"]:
                self._segments.append(Segment(*layout, int(state["batches"])))
            self._batches = 0
        self._plan_cache = None

    def stats(self) -> dict[str, int]:
        """Samples delivered and bad samples per reason (``skipped_<reason>``), over all workers."""
        return dict(self._stats)

    def bad_shards(self) -> dict[str, int]:
        """Bad-sample counts per shard."""
        return dict(self._bad_shards)


def build_loader(cfg: DataConfig, *, rank: int, world_size: int, epoch: int = 0) -> Loader:
    """The :class:`Loader` for ``rank`` of ``world_size`` (see module docstring)."""
    return Loader(cfg, rank=rank, world_size=world_size, epoch=epoch)
