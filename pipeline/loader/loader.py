"""``Loader``: one rank's resumable view of a split, and ``build_loader``.

It owns the epoch cursor (epoch, batches yielded, and this epoch's earlier layouts, each a
:class:`Segment`, so a world-size change continues without repeats), the dataset version it
pinned, and the aggregation of the workers' stats deltas, raising :class:`BadDataError` as soon
as the pass's :class:`BadSampleLimit` is certainly exceeded. The reading itself is
:class:`ShardStream`'s, run by a torch DataLoader. See :mod:`pipeline.loader` for the semantics.
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..plan import EpochPlan, epoch_order, remaining_order, slot_emitted
from ..transforms import affine_for, normalize_uint8, to_float_batch
from .bad_samples import BadDataError, BadSampleLimit
from .config import DataConfig
from .dataset import ShardStream
from .meta import Meta, load_meta
from .worker_signals import leave_sigterm_to_the_parent
from .workers import SPEC_BYTES, BatchRing, PassSpec, WorkerPool, as_is

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class Segment:
    """A finished part of the current epoch under an earlier layout (see pipeline.plan)."""

    world_size: int
    num_workers: int
    batch_size: int
    batches: int


class Loader:
    """One rank's view of a split: iterate for an epoch of batches; resumable; see :mod:`pipeline.loader`."""

    def __init__(self, cfg: DataConfig, *, rank: int, world_size: int, epoch: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self._plan_cache: tuple[tuple, EpochPlan] | None = None
        self._pin(self._load(cfg.source.dataset_version))
        self.epoch = epoch
        self._batches = 0  # yielded in the current segment of the current epoch
        self._segments: list[Segment] = []
        self._stats: Counter[str] = Counter()
        self._bad_shards: Counter[str] = Counter()
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._limit = BadSampleLimit(max_fraction=cfg.io.max_bad_fraction, planned=0)  # set per pass in __iter__
        self._pool: WorkerPool | None = None
        self._pool_busy = False  # a pass is iterating the pool (a second live pass gets its own workers)
        self._finalizer: weakref.finalize | None = None
        self._check_size()

    @property
    def repeats(self) -> int:
        """Copies of each sample per epoch (repeated augmentation; eval: 1)."""
        return self.cfg.augment.repeats if self.cfg.train else 1

    def _load(self, version: str | None) -> Meta:
        src = self.cfg.source
        return load_meta(src.url, src.split, src.limit_samples, version, s3=self.cfg.s3_settings(),
                         cache=self.cfg.io.metadata_cache)

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
        return max(1, self.cfg.io.num_workers)

    def _check_size(self) -> None:
        p = self.plan()
        if p.batches_per_slot == 0 and not self._segments:
            T, S, B = len(p.order), p.num_slots, self.cfg.batch_size
            copies = f" ({self.repeats} copies each)" if self.repeats > 1 else ""
            raise ValueError(f"split {self.cfg.source.split!r} has {T} samples{copies}, fewer than world_size*"
                             f"num_workers*batch_size = {S}*{B} = {S * B}: lower batch_size or num_workers")

    # ---------------------------------------------------------------- plan
    def plan(self) -> EpochPlan:
        """The plan of the current segment of the current epoch (cached)."""
        key = (self.epoch, tuple(self._segments), self.world_size, self.workers, self.cfg.batch_size)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        cfg = self.cfg
        order = epoch_order(self.meta.shard_start, seed=cfg.seed, epoch=self.epoch, train=cfg.train,
                            repeats=self.repeats)
        for s, seg in enumerate(self._segments):
            p = EpochPlan(order, seg.world_size, seg.num_workers, seg.batch_size, cfg.train, cfg.seed,
                          self.epoch, s, cfg.io.shuffle_buffer)
            order = remaining_order(p, seg.batches)
        plan = EpochPlan(order, self.world_size, self.workers, cfg.batch_size, cfg.train, cfg.seed, self.epoch,
                         len(self._segments), cfg.io.shuffle_buffer)
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
        self._limit = BadSampleLimit(max_fraction=self.cfg.io.max_bad_fraction, planned=self._planned(plan))
        ds = ShardStream(self.cfg, self.meta, plan, self.rank, self._batches, frozenset(self._verified))
        checking = ds.whole_checked()
        for item, ring in self._items(ds):
            # No local of this frame references the batch while it is out: a ring slot goes back to its
            # worker as soon as the consumer drops the batch, not when the next one arrives.
            yield self._deliver(item, ring)
        if self._batches >= plan.batches_per_rank:
            self._verified |= checking  # every run finished, so every check passed
            self._advance_epoch()

    def _deliver(self, item: tuple, ring: BatchRing | None) -> tuple:
        """A worker's batch as the consumer gets it: a ring slot's memory handed out in place (recycled
        once no view of it is left, :class:`.workers.BatchRing`), small arrays sent as bytes wrapped as
        tensors, uint8 images normalized (``output="float"``); its stats accounted."""
        *batch, stats = item
        slot = stats.get("ring_slot", -1)
        if slot >= 0:
            assert ring is not None, "a ring slot from workers without a ring"
            batch[0] = ring.hand_out(slot, stats["ring_shape"])
        batch = [torch.from_numpy(b) if isinstance(b, np.ndarray) else b for b in batch]
        if batch[0].dtype == torch.uint8 and self.cfg.output == "float":  # normalize once per batch
            batch[0] = to_float_batch(batch[0], self.cfg.preprocess.mean, self.cfg.preprocess.std)  # the slot is free
        self._account(stats)
        self._batches += 1
        return tuple(batch)

    def _items(self, ds: ShardStream) -> Iterator[tuple[tuple, BatchRing | None]]:
        """The pass's worker results and the ring their slots refer to: from the persistent pool where it
        is free, else from workers started for this pass (num_workers=0: in this process)."""
        io = self.cfg.io
        if io.num_workers and io.persistent_workers and not self._pool_busy:
            spec = PassSpec(ds.plan, ds.skip, ds.verified)
            items = self._pool_for(ds, spec).run(spec)
            if items is None:  # the spec outgrew the shared slot: restart the pool with room
                self.close()
                items = self._pool_for(ds, spec).run(spec)
                assert items is not None
            self._pool_busy = True
            ring = self._pool.ring  # type: ignore[union-attr]
            try:
                for item in items:
                    yield item, ring
            except GeneratorExit:  # the consumer stopped early: the pool serves the next pass
                raise
            except BaseException:  # a worker failed or died: the next pass starts fresh workers
                self.close()
                raise
            finally:
                self._pool_busy = False
            return
        nw = io.num_workers
        for item in DataLoader(ds, batch_size=None, num_workers=nw, prefetch_factor=io.prefetch_batches if nw else None,
                               multiprocessing_context="fork" if nw else None, persistent_workers=False,
                               worker_init_fn=leave_sigterm_to_the_parent if nw else None, collate_fn=as_is):
            yield item, None

    def _pool_for(self, ds: ShardStream, spec: PassSpec) -> WorkerPool:
        pool = self._pool
        if pool is not None and pool.dataset.meta is not self.meta:  # re-pinned: workers hold the old metadata
            self.close()
            pool = None
        if pool is None:
            pool = self._pool = WorkerPool(ds, num_workers=self.cfg.io.num_workers,
                                           prefetch_batches=self.cfg.io.prefetch_batches,
                                           capacity=max(SPEC_BYTES, WorkerPool.needed(spec)))
            self._finalizer = weakref.finalize(self, pool.close)
        return pool

    def worker_pids(self) -> list[int]:
        """The persistent workers' pids (empty when none are running)."""
        return self._pool.pids() if self._pool is not None else []

    def close(self) -> None:
        """Stop the persistent workers (a later pass starts new ones). Idempotent."""
        pool, self._pool = self._pool, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if pool is not None:
            pool.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, S, S)`` images (``output="uint8"``) -> normalized float32 on their device.

        Float input is returned unchanged, so a consumer may call this on every batch.
        """
        if images.dtype != torch.uint8:
            return images
        affine = self._affine.get(images.device)
        if affine is None:  # built once per device: no small host->device copies per step
            affine = self._affine[images.device] = affine_for(self.cfg.preprocess.mean, self.cfg.preprocess.std, images.shape[1],
                                                              images.device)
        return normalize_uint8(images, affine)

    def _planned(self, plan: EpochPlan) -> int:
        """Real samples this rank reads from batch ``self._batches`` to the end of ``plan``."""
        B, W = self.cfg.batch_size, plan.num_workers
        if self.cfg.train:
            return (plan.batches_per_rank - self._batches) * B
        n = 0
        for w in range(W):  # eval: emission padding (-1, after the slot's samples) is not a sample
            n += max(0, len(plan.slot_order(self.rank * W + w)) - slot_emitted(plan, self._batches, w))
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
                f"{lim.bad} bad samples of the {lim.planned} this pass of split {self.cfg.source.split!r} reads "
                f"({lim.seen} read so far) already exceed max_bad_fraction {self.cfg.io.max_bad_fraction:.1%}; "
                f"worst shards: {self._worst()}; reasons: {self._reasons()}. Rewrite the dataset "
                "(python -m pipeline.write_shards) or raise max_bad_fraction")
        if n_bad and not lim.warned and lim.likely():
            lim.warned = True
            log.warning("bad samples: %d of %d read in split %r, likely above max_bad_fraction %.1f%%; the "
                        "loader raises once %d of the %d planned are bad; worst shards: %s", lim.bad, lim.seen,
                        self.cfg.source.split, 100 * self.cfg.io.max_bad_fraction,
                        int(self.cfg.io.max_bad_fraction * lim.planned) + 1, lim.planned, self._worst())

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
            "seed": self.cfg.seed, "split": self.cfg.source.split, "num_samples": self.meta.num_samples,
            "repeats": self.repeats,
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
                        pinned, self.cfg.source.url, self.meta.version)
            self._pin(self._load(pinned))
        if state.get("num_samples") != self.meta.num_samples or state.get("seed") != self.cfg.seed:
            raise ValueError(f"loader state is for a different dataset or seed (num_samples "
                             f"{state.get('num_samples')} vs {self.meta.num_samples}, seed {state.get('seed')} "
                             f"vs {self.cfg.seed})")
        if int(state.get("repeats", 1)) != self.repeats:  # another plan: its cursor means other samples
            raise ValueError(f"loader state is for data.augment.repeats={state.get('repeats', 1)}, this loader has "
                             f"{self.repeats}; resume with repeats={state.get('repeats', 1)} (or start a new run)")
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
