"""``ShardStream``: one rank's epoch as an IterableDataset; each DataLoader worker plays one slot.

The stages of a slot are composed in :meth:`ShardStream.__iter__`: shard runs (the shard's rows
read when it is opened, ranged reads, retries, whole-shard sha256 only where samples carry no
checked sha256, :mod:`pipeline.stream`) ->
emission order (streamed from the plan's cursor: O(shuffle buffer) memory) -> per-sample
sha256 -> label + decode + augment (or the bad sample's reason) -> batches of B -> tensors and
the worker's stats delta. A bad train sample is replaced by a good one of the same batch (counted
as ``filled``); in eval it is masked (``valid=False``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .. import format as fmt
from ..decode import BadSample, decode_eval, decode_train
from ..masking import draw_mask
from ..plan import (
    EpochPlan,
    Order,
    SlotCursor,
    mix,
    mix_last,
    repeated_shard_start,
    resume_slot,
    shard_pieces,
    slot_emitted,
    tail_position,
)
from ..storage import Storage, open_storage, url_join
from ..stream import Run, Truncated, iter_runs
from ..transforms import (
    empty_shared_uint8,
    make_randaugment,
    mix_batch,
    sample_transform,
    stack_uint8,
    to_float_batch,
)
from .config import DataConfig
from .meta import Meta, ShardRows

log = logging.getLogger(__name__)

#: Bad samples logged (with shard and key) per worker per epoch before going quiet.
LOG_FIRST_BAD = 3
#: A worker sends per-batch arrays up to this size (labels, ``valid``, patch masks) as pickled bytes;
#: a tensor would cross as a new shared-memory segment and a file-descriptor round trip each.
INLINE_BYTES = 256 << 10


@dataclasses.dataclass(slots=True)
class _Sample:
    """One emission slot of a batch: a decoded image + target, a bad sample's reason, or padding."""

    id: int
    image: torch.Tensor | None = None
    target: Any = None
    reason: str | None = None  # BadSample reason
    shard: str | None = None  # the bad sample's shard
    mask: np.ndarray | None = None  # (N,) bool patch mask, when the config draws them


#: A sample as it moves through a slot's stages: id, bytes (None: eval padding), its shard's
#: rows and its row number in them.
Item = tuple[int, "bytes | Truncated | None", "ShardRows | None", int]


def _item_batches(source: Iterator[tuple[int, bytes | Truncated, Any, int]], emission: Iterator[int], size: int,
                  check: Callable[..., None]) -> Iterator[list[Item]]:
    """The slot's samples in emission order (-1 = eval padding -> None), ``size`` at a time, each
    image's bytes passed to ``check`` (the per-sample sha256) as it is taken. The shard runs arrive in
    read order: a small reorder buffer (a shuffle buffer's worth at most). One generator for the
    three steps: a generator stage costs ~1 us per sample, and this loop runs for every image."""
    fetched: dict[int, Item] = {}
    batch: list[Item] = []
    for i in emission:
        if i < 0:
            batch.append((i, None, None, -1))
        else:
            while i not in fetched:
                item = next(source)
                fetched[item[0]] = item  # type: ignore[assignment]
            item = fetched.pop(i)
            if isinstance(item[1], bytes):
                check(*item)
            batch.append(item)
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
        self.spec: Any = None  # a persistent worker's SpecSlot (.workers): each pass's plan, skip, verified
        self.ring: Any = None  # a persistent worker's BatchRing (.workers): recycled shared batch buffers
        self.num_classes = int(meta.info["num_classes"])
        self.multi_label = bool(meta.info.get("multi_label"))
        # Repeated augmentation: the plan's ids are virtual, copy * T + id (pipeline.plan); reads,
        # labels and integrity use the real id, the augmentation seed and mask the virtual one.
        repeats = cfg.augment.repeats if cfg.train else 1
        self._vstart = repeated_shard_start(meta.shard_start, repeats)

    def _real(self, i: int) -> int:
        """The sample id of virtual id ``i`` (itself without repeats)."""
        return i % self.meta.num_samples

    # ---------------------------------------------------------------- labels
    def _target(self, rows: ShardRows, k: int) -> int | np.ndarray:
        c = self.num_classes
        if c == 0:  # an unlabelled dataset (write_shards --unlabelled): images only
            return -1
        if self.multi_label:
            assert rows.ml_offsets is not None and rows.ml_values is not None
            ids = rows.ml_values[rows.ml_offsets[k]: rows.ml_offsets[k + 1]]
            if len(ids) == 0:
                raise BadSample("missing_label")
            if ids.min() < 0 or ids.max() >= c:
                raise BadSample("label_out_of_range", str(ids.tolist()))
            v = np.zeros(c, np.float32)
            v[ids] = 1.0
            return v
        y = int(rows.labels[k])
        if y < 0:
            raise BadSample("missing_label")
        if y >= c:
            raise BadSample("label_out_of_range", f"{y} >= num_classes {c}")
        return y

    # ---------------------------------------------------------------- integrity
    def slot_work(self, logical: int) -> tuple[int, SlotCursor]:
        """(batches already done, the slot's cursor past them) of a logical worker."""
        emitted = slot_emitted(self.plan, self.skip, logical)
        return emitted // self.plan.batch_size, resume_slot(self.plan, self.rank * self.plan.num_workers + logical,
                                                            emitted)

    def samples_checked(self) -> bool:
        """Whether every image this loader serves is checked against its own recorded sha256 (format 2
        and 3 with ``verify_samples``): then no whole-shard sha256 is computed, since labels, keys and
        byte ranges come from the checked rows file, never from the tar, so the whole-shard hash would
        only cover bytes the loader never serves (tar headers, padding, other members) at the price of
        a second hash of every image (~31 us per 55 KB JPEG). Format 3 is predicted from the metadata
        (every rows file has a ``sha256`` column); ``locate`` keeps the whole-shard hash of a shard
        whose rows turn out to have none."""
        m = self.meta
        if not m.verify_samples:
            return False
        return m.whole.rows.digests is not None if m.whole is not None else m.rows_sha256 is not None

    def _run(self, vs: int, ids: np.ndarray, whole_ok: bool) -> Run:
        """The run of (virtual) shard ``vs`` reading ``ids``; its byte ranges come from the shard's rows
        (``locate``). ``expect_sha256`` is set on a whole run of a shard not yet verified in this run;
        ``locate`` drops it where the per-sample check covers every served byte (:meth:`samples_checked`)."""
        s = vs % len(self.meta.shard_names)
        meta, name = self.meta, self.meta.shard_names[s]
        if meta.shard_bytes is None or meta.shard_samples is None:
            return Run(name, ids, index=s)
        whole = whole_ok and len(ids) == meta.shard_samples[s] and name not in self.verified
        return Run(name, ids, expect_bytes=int(meta.shard_bytes[s]),
                   expect_sha256=meta.shard_sha256_hex(s) if whole else None, index=s)

    def _runs(self, cur: SlotCursor) -> Iterator[Run]:
        """Buffered ids first (never a whole-shard check), then the rest of the stream, per shard."""
        for s, ids in shard_pieces(Order.of_ids(cur.buffered), self._vstart):
            yield self._run(s, ids, whole_ok=False)
        for s, ids in shard_pieces(cur.tail, self._vstart):
            yield self._run(s, ids, whole_ok=True)

    def whole_checked(self) -> set[str]:
        """Shards this rank's epoch reads whole, and so checks against their recorded sha256
        (the tails of its slots, the same runs the workers make: O(shards) here, no replay); none when
        every served image is checked on its own (:meth:`samples_checked`)."""
        plan, out = self.plan, set()
        if self.samples_checked():
            return out
        for w in range(plan.num_workers):
            slot = self.rank * plan.num_workers + w
            emitted = slot_emitted(plan, self.skip, w)
            order = plan.slot_order(slot)
            for s, ids in shard_pieces(order.slice(tail_position(plan, slot, emitted), len(order)), self._vstart):
                r = self._run(s, ids, whole_ok=True)
                if r.expect_sha256:
                    out.add(r.shard)
        return out

    def _locate(self, storage: Storage) -> Any:
        def locate(run: Run) -> Run:
            rows = self.meta.rows(run.index, storage)  # the shard's rows file, checked (reader thread)
            local = run.ids % self.meta.num_samples - self.meta.shard_start[run.index]
            # One hash per served byte: with per-sample digests the whole-shard sha256 is not computed
            # (see samples_checked); the size check (truncation) stays.
            whole = run.expect_sha256 if rows.digests is None or not self.meta.verify_samples else None
            return dataclasses.replace(run, offsets=rows.offsets[local], sizes=rows.sizes[local], rows=rows,
                                       local=local, expect_sha256=whole)
        return locate

    def _verify(self, i: int, data: bytes, rows: ShardRows, k: int) -> None:
        # The image bytes are already in memory: one sha256 (~2 us/KB, bench/verify.py), no extra read.
        if self.meta.verify_samples and rows.digests is not None and \
                hashlib.sha256(data).digest() != rows.digests[k].tobytes():
            shard = self.meta.shard_names[self.meta.shard_of_id(self._real(i))]
            raise fmt.IntegrityError(
                f"sample {rows.key(k)} in shard {url_join(self.meta.root_url, shard)} does not match the sha256 "
                f"recorded in its rows file ({fmt.rows_key(shard)}): the shard was modified after publishing; "
                f"{fmt.REWRITE_HINT}")

    # ---------------------------------------------------------------- the pipeline
    # One slot's epoch, as stages composed in __iter__ (each a small generator or function):
    #   shard runs (pipeline.stream.iter_runs: the shard's rows, ranged reads, retries, whole-shard sha256
    #   where samples are not checked one by one)
    #   -> _in_order: the slot's emission order          -> _checked: per-sample sha256
    #   -> _samples: label + decode + augment, or the bad-sample reason
    #   -> _batched: B at a time                          -> _collate: tensors + stats
    def __iter__(self) -> Iterator[tuple]:
        if self.spec is not None and get_worker_info() is not None:  # a persistent worker: this pass's cursor
            p = self.spec.read()
            self.plan, self.skip, self.verified = p.plan, p.skip, p.verified
        cfg, plan = self.cfg, self.plan
        logical = self._logical_worker()
        slot = self.rank * plan.num_workers + logical
        done, cur = self.slot_work(logical)
        storage = open_storage(self.meta.root_url, s3=cfg.s3_settings())
        source = iter_runs(storage, self._runs(cur), locate=self._locate(storage), prefetch=cfg.io.prefetch_shards,
                           retries=cfg.io.read_retries, backoff=cfg.io.read_backoff_s)
        last_good: _Sample | None = None
        self._logged = 0
        for k, items in enumerate(_item_batches(source, cur.emission, cfg.batch_size, self._verify)):
            buf, ring_slot = self._batch_buffer(len(items))
            # Each image is decoded straight into its row of the batch (no per-sample array, no copy).
            seeds = mix_last((cfg.seed, plan.epoch), [item[0] for item in items])  # a virtual id: each copy its own
            batch = [self._sample(item, None if buf is None else buf[j], seeds[j]) for j, item in enumerate(items)]
            yield self._collate(batch, k + done, slot, last_good, buf, ring_slot)
            good = next((x for x in reversed(batch) if x.image is not None), None)
            if good is not None:  # its row may be a ring slot the next batches overwrite: keep a copy
                last_good = dataclasses.replace(good, image=good.image.clone())  # type: ignore[union-attr]
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

    def _sample(self, item: Item, out: torch.Tensor | None, sseed: int) -> _Sample:
        """A decoded sample (into ``out`` when given; augmentation seed ``sseed``); a bad one carries its
        reason (the first LOG_FIRST_BAD of a pass are logged)."""
        i, data, rows, k = item
        if data is None or rows is None:  # eval padding
            return _Sample(i)
        try:
            return self._decode(i, data, rows, k, out, sseed)
        except BadSample as exc:
            shard = self.meta.shard_names[self.meta.shard_of_id(self._real(i))]
            if self._logged < LOG_FIRST_BAD:
                self._logged += 1
                log.warning("skipping bad sample: shard %s key %s: %s", shard, rows.key(k), exc)
            return _Sample(i, reason=exc.reason, shard=shard)

    def _decode(self, i: int, data: bytes | Truncated, rows: ShardRows, k: int, out: torch.Tensor | None,
                sseed: int) -> _Sample:
        cfg = self.cfg
        if isinstance(data, Truncated):
            raise BadSample("truncated", "shard ended inside this member")
        target = self._target(rows, k)
        if cfg.train:
            self._rng.seed(sseed)  # the state of random.Random(sseed), without a new object per sample
            arr = decode_train(data, size=cfg.image_size, scale=cfg.augment.crop_scale, ratio=cfg.augment.crop_ratio,
                               hflip=cfg.augment.hflip, rng=self._rng, max_pixels=cfg.io.max_image_pixels, out=out)
        else:
            arr = decode_eval(data, size=cfg.image_size, crop_pct=cfg.preprocess.eval_crop_pct,
                              max_pixels=cfg.io.max_image_pixels, out=out)
        erase = cfg.augment.random_erasing if cfg.train else 0.0
        if out is not None and erase == 0 and self._randaug is None:  # decoded in place, nothing to apply
            return _Sample(i, image=out, target=target, mask=self._mask(i))
        return _Sample(i, image=sample_transform(arr, self._randaug, sseed, erase), target=target, mask=self._mask(i))

    def _mask(self, i: int) -> np.ndarray | None:
        """Sample ``i``'s patch mask: a function of (seed, epoch, sample) only, so the same on any
        number of ranks and workers and after a resume (eval: of the sample alone, every pass)."""
        m = self.cfg.mask
        if m.kind == "none":
            return None
        epoch = self.plan.epoch if self.cfg.train else 0
        rng = np.random.default_rng([self.cfg.seed, epoch, max(i, 0), 0x6D61736B])
        return draw_mask(m, self.cfg.image_size // m.patch_size, rng)

    @functools.cached_property
    def _rng(self) -> random.Random:
        return random.Random()

    @functools.cached_property
    def _mixing(self) -> bool:
        """Whether batches are mixed (mixup / cutmix) here, which needs float32 images."""
        aug = self.cfg.augment
        return self.cfg.train and (aug.mixup_alpha > 0 or aug.cutmix_alpha > 0)

    def _uint8_out(self) -> bool:
        """Whether batches leave as uint8 images (else float32, normalised or mixed, here)."""
        return (get_worker_info() is not None or self.cfg.output == "uint8") and not self._mixing

    def _batch_buffer(self, n: int) -> tuple[torch.Tensor | None, int | None]:
        """The uint8 ``(n, 3, S, S)`` batch the images are decoded into, taken before the first one is
        decoded, and its ring slot (None: not a pool worker's ring; -1: the ring was full): a pool
        worker's recycled shared slot (.workers.BatchRing), another worker's fresh shared buffer, the
        main process's plain tensor. None when batches leave as float32 (made in ``_collate``)."""
        if not self._uint8_out():
            return None, None
        S, wi = self.cfg.image_size, get_worker_info()
        shape = (n, 3, S, S)
        if wi is not None and self.ring is not None:
            return self.ring.take(wi.id, shape)
        return (empty_shared_uint8(shape) if wi is not None else torch.empty(shape, dtype=torch.uint8)), None

    @functools.cached_property
    def _randaug(self) -> Any:
        return make_randaugment(self.cfg.augment.randaugment, self.cfg.augment.color_jitter) if self.cfg.train else None

    def _collate(self, batch: list[_Sample], batch_idx: int, slot: int, last_good: _Sample | None,
                 buf: torch.Tensor | None = None, ring_slot: int | None = None) -> tuple:
        cfg, S, C = self.cfg, self.cfg.image_size, self.num_classes
        imgs: list[torch.Tensor | None] = [x.image for x in batch]
        tgts: list[Any] = [x.target for x in batch]
        masks: list[np.ndarray | None] = [x.mask if x.mask is not None else self._mask(x.id) for x in batch]
        ids = [x.id for x in batch]
        valid = [im is not None for im in imgs]
        reasons = Counter(x.reason for x in batch if x.reason)
        bad_shards = Counter(x.shard for x in batch if x.reason)
        stats: dict[str, Any] = {"samples": sum(valid), "reasons": dict(reasons), "shards": dict(bad_shards)}
        if cfg.train:
            # Fill bad slots with good samples of the same batch so every batch has B rows.
            good = [k for k, v in enumerate(valid) if v]
            pool = ([(imgs[k], tgts[k], masks[k]) for k in good]
                    or ([(last_good.image, last_good.target, last_good.mask)] if last_good is not None else []))
            filled = 0
            for k, v in enumerate(valid):
                if not v:
                    filled += 1
                    if pool:
                        imgs[k], tgts[k], masks[k] = pool[filled % len(pool)]
                    else:  # a whole bad batch at the very start of a slot: blank rows, label 0
                        imgs[k] = torch.zeros(3, S, S, dtype=torch.uint8)
                        tgts[k] = np.zeros(C, np.float32) if self.multi_label else (0 if C else -1)
            if filled:
                stats["filled"] = filled
        else:
            for k, v in enumerate(valid):
                if not v:
                    imgs[k] = torch.zeros(3, S, S, dtype=torch.uint8)
                    tgts[k] = np.zeros(C, np.float32) if self.multi_label else (0 if C else -1)
            stats["padded"] = sum(1 for i in ids if i < 0)
        in_worker = get_worker_info() is not None
        if buf is not None:
            # uint8 across the process boundary; Loader.__iter__ normalizes in the main process
            # unless the consumer does it on its device (output="uint8"). Rows decoded in place are
            # not copied; filled, padded and transformed ones are.
            x = stack_uint8(imgs, out=buf)  # type: ignore[arg-type]
            if ring_slot is not None:  # a pool worker: a recycled buffer, sent as its slot number
                stats["ring_slot"] = ring_slot
                if ring_slot >= 0:  # the main process reads the slot in place (.workers.BatchRing)
                    x, stats["ring_shape"] = None, tuple(buf.shape)
        else:
            x = to_float_batch(imgs, cfg.preprocess.mean, cfg.preprocess.std, shared=in_worker)  # type: ignore[arg-type]
        if self.multi_label:
            y = torch.from_numpy(np.stack(tgts))  # (B, C) float32 multi-hot
        else:
            y = torch.tensor(tgts, dtype=torch.int64)  # (B,)
        if self._mixing:
            if y.dtype == torch.int64:
                y = torch.nn.functional.one_hot(y, C).float()
            x, y = mix_batch(x, y, mixup_alpha=cfg.augment.mixup_alpha, cutmix_alpha=cfg.augment.cutmix_alpha,
                             seed=mix(cfg.seed, self.plan.epoch, self.plan.segment, slot, batch_idx, 0x313))
        extra = () if masks[0] is None else (torch.from_numpy(np.stack(masks)),)  # (B, N) bool
        out = (x, y, *extra) if cfg.train else (x, y, torch.tensor(valid, dtype=torch.bool), *extra)
        if in_worker:  # small arrays cross to the main process as pickled bytes (.workers.as_is)
            out = tuple(t.numpy() if isinstance(t, torch.Tensor) and t.nbytes <= INLINE_BYTES else t for t in out)
        return *out, stats
