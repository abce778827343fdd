"""``ShardStream``: one rank's epoch as an IterableDataset; each DataLoader worker plays one slot.

The stages of a slot are composed in :meth:`ShardStream.__iter__`: shard runs (ranged reads,
retries, whole-shard sha256, :mod:`pipeline.stream`) -> emission order -> per-sample sha256 ->
label + decode + augment (or the bad sample's reason) -> batches of B -> tensors and the
worker's stats delta. A bad train sample is replaced by a good one of the same batch (counted
as ``filled``); in eval it is masked (``valid=False``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .. import format as fmt
from ..decode import BadSample, decode_eval, decode_train
from ..plan import EpochPlan, mix, worker_batches_done
from ..storage import open_storage, url_join
from ..stream import Run, Truncated, iter_runs, make_runs
from ..transforms import make_randaugment, mix_batch, sample_transform, stack_uint8, to_float_batch
from .config import DataConfig
from .meta import Meta

log = logging.getLogger(__name__)

#: Bad samples logged (with shard and key) per worker per epoch before going quiet.
LOG_FIRST_BAD = 3


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
        source = iter_runs(open_storage(self.meta.root_url, s3=cfg.s3_settings()), runs, prefetch=cfg.io.prefetch_shards,
                           retries=cfg.io.read_retries, backoff=cfg.io.read_backoff_s)
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
            arr = decode_train(data, size=cfg.image_size, scale=cfg.augment.crop_scale, ratio=cfg.augment.crop_ratio, hflip=cfg.augment.hflip,
                               rng=random.Random(sseed), max_pixels=cfg.io.max_image_pixels)
        else:
            arr = decode_eval(data, size=cfg.image_size, crop_pct=cfg.preprocess.eval_crop_pct, max_pixels=cfg.io.max_image_pixels)
        return _Sample(i, image=sample_transform(arr, self._randaug, sseed), target=target)

    @functools.cached_property
    def _randaug(self) -> Any:
        return make_randaugment(self.cfg.augment.randaugment) if self.cfg.train else None

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
        mixing = cfg.train and (cfg.augment.mixup_alpha > 0 or cfg.augment.cutmix_alpha > 0)
        if (in_worker or cfg.output == "uint8") and not mixing:
            # uint8 across the process boundary; Loader.__iter__ normalizes in the main process
            # unless the consumer does it on its device (output="uint8").
            x = stack_uint8(imgs, shared=in_worker)  # type: ignore[arg-type]
        else:
            x = to_float_batch(imgs, cfg.preprocess.mean, cfg.preprocess.std, shared=in_worker)  # type: ignore[arg-type]
        if self.multi_label:
            y = torch.from_numpy(np.stack(tgts))  # (B, C) float32 multi-hot
        else:
            y = torch.tensor(tgts, dtype=torch.int64)  # (B,)
        if mixing:
            if y.dtype == torch.int64:
                y = torch.nn.functional.one_hot(y, C).float()
            x, y = mix_batch(x, y, mixup_alpha=cfg.augment.mixup_alpha, cutmix_alpha=cfg.augment.cutmix_alpha,
                             seed=mix(cfg.seed, self.plan.epoch, self.plan.segment, slot, batch_idx, 0x313))
        if cfg.train:
            return x, y, stats
        return x, y, torch.tensor(valid, dtype=torch.bool), stats
