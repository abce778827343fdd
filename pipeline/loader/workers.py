"""``WorkerPool``: one rank's DataLoader worker processes, kept alive from pass to pass.

A torch DataLoader with ``persistent_workers=True`` keeps its worker processes between
``iter()`` calls, but each worker keeps the dataset object it was started with, while every
pass of a :class:`~.loader.Loader` (a new epoch, a resume, an eval after some training) reads
another :class:`~pipeline.plan.EpochPlan` from another cursor. So each pass's
:class:`PassSpec` (plan, batches to skip, shards already verified) is written into a small
anonymous shared mapping made before the workers fork, and each worker reads it at the first
``next()`` of its pass, which torch only calls after the pass's resume signal, i.e. after the
write. A worker therefore serves exactly what a freshly started one would: the batches of a
seed do not depend on the pool (``tests/test_pipeline_workers.py`` compares them).

Shutting down: :meth:`WorkerPool.close` (called by ``Loader.close()``, its context manager, and
when the loader is garbage collected); at interpreter exit torch's own exit handler and
multiprocessing's (the workers are daemonic) stop them; a parent killed outright leaves no
orphans because every worker ends itself within ``PARENT_CHECK_S`` once its parent is gone
(:func:`~.worker_signals.leave_sigterm_to_the_parent`, torch's watchdog as well).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import mmap
import multiprocessing
import pickle
import struct
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..plan import EpochPlan
from ..transforms import empty_shared_uint8
from .worker_signals import leave_sigterm_to_the_parent

log = logging.getLogger(__name__)

#: The shared mapping's first size; a pass whose spec does not fit restarts the pool with room.
SPEC_BYTES = 1 << 20
_LEN = struct.Struct("<Q")


@dataclass(frozen=True)
class PassSpec:
    """What a worker needs for one pass, besides the config and metadata it forked with."""

    plan: EpochPlan
    skip: int  # batches this rank already yielded in the plan (resume cursor)
    verified: frozenset[str]  # shards whose whole-shard sha256 already passed in this run


class SpecSlot:
    """The current :class:`PassSpec` in anonymous shared memory (inherited through fork; nothing
    on disk to leak when a parent is killed)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._map = mmap.mmap(-1, capacity + _LEN.size)  # MAP_SHARED: writes are seen by the forked workers
        # A worker of an abandoned pass may read while the next pass's spec is written; its
        # batches are discarded by torch, but a torn read must not raise in it.
        self._lock = multiprocessing.get_context("fork").Lock()

    def fits(self, data: bytes) -> bool:
        return len(data) <= self.capacity

    def write(self, data: bytes) -> None:
        with self._lock:
            self._map[: _LEN.size] = _LEN.pack(len(data))
            self._map[_LEN.size: _LEN.size + len(data)] = data

    def read(self) -> PassSpec:
        with self._lock:
            (n,) = _LEN.unpack(self._map[: _LEN.size])
            data = self._map[_LEN.size: _LEN.size + n]
        return pickle.loads(data)

    def close(self) -> None:
        self._map.close()


#: Shared uint8 batch buffers per pool worker (:class:`BatchRing`) beyond the DataLoader's prefetch:
#: the batch being filled and the one the consumer holds.
RING_EXTRA = 2


class BatchRing:
    """Each pool worker's uint8 batch buffers in one anonymous shared mapping made before the fork,
    so the main process sees them at no cost: a worker sends a slot number, not the batch.

    Why: a fresh shared-memory batch (what torch's default collate allocates) costs the kernel a
    page fault and the zeroing of every 4 KB page on first write, ~12 ms per 9.6 MB batch (B=64 at
    224 px) on the 2-core dev VM; and a tensor sent through the DataLoader's queue passes its
    storage's file descriptor (a socket connection to the worker per tensor) and is mapped (and
    page-faulted) again in the main process on every batch.

    Protocol, one byte per (worker, slot) in a second shared mapping: 0 free, 1 busy. A worker
    takes a free slot of its own (sets 1), writes the batch and sends the slot number. The main
    process hands the consumer the slot's memory itself (:meth:`hand_out`, no copy) through a
    fresh ctypes array that only ``torch.frombuffer``'s storage references: every tensor, view,
    numpy array or storage of the batch keeps that array alive, so its weak reference dies (and
    its callback sets the byte back to 0) only once none of them is left -- the mechanism of
    :class:`~pipeline.transforms.BatchMemory`. A slot is therefore rewritten only after the
    consumer let go of every view of it. At each pass's start the slots of batches torch discards
    (the previous pass's unread ones) are freed, never one the consumer still holds. With every
    slot busy (a consumer keeping many batches) a worker falls back to a fresh shared buffer
    (slot -1), sent the usual way, so a worker never waits on the consumer.
    """

    def __init__(self, num_workers: int, slots: int, slot_bytes: int) -> None:
        self.slots, self.slot_bytes = slots, slot_bytes
        self._flags = mmap.mmap(-1, num_workers * slots)  # MAP_SHARED, zero-filled: every slot free
        # MAP_SHARED|MAP_ANONYMOUS: inherited by the forked workers; pages are allocated when first written.
        self._data = mmap.mmap(-1, max(1, num_workers * slots * slot_bytes))
        self._bufs: dict[int, torch.Tensor] = {}  # a worker's views of its own slots (after the fork)
        self._out: dict[int, weakref.ref] = {}  # main process: slots handed to the consumer, alive

    def take(self, worker: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        """A uint8 shared buffer of ``shape`` for worker ``worker`` and its slot (-1: not in the ring)."""
        nbytes = math.prod(shape)
        if nbytes <= self.slot_bytes:
            for k in range(worker * self.slots, (worker + 1) * self.slots):
                if self._flags[k] == 0:
                    buf = self._bufs.get(k)
                    if buf is None:
                        buf = self._bufs[k] = torch.frombuffer(self._data, dtype=torch.uint8, count=self.slot_bytes,
                                                               offset=k * self.slot_bytes)
                    self._flags[k] = 1
                    return buf[:nbytes].view(shape), k
        return empty_shared_uint8(shape), -1

    def hand_out(self, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Main process: slot ``slot``'s batch as a tensor of ``shape``, freed when its last view dies."""
        nbytes = math.prod(shape)
        export = (ctypes.c_char * nbytes).from_buffer(self._data, slot * self.slot_bytes)
        self._out[slot] = weakref.ref(export, functools.partial(self._dead, slot))
        return torch.frombuffer(export, dtype=torch.uint8).view(shape)  # the storage keeps `export` alive

    def _dead(self, slot: int, ref: weakref.ref) -> None:
        # Runs in whichever thread dropped the batch's last view; after close() the flags are gone.
        if self._out.get(slot) is ref:
            del self._out[slot]
            with contextlib.suppress(ValueError):  # closed
                self._flags[slot] = 0

    def held(self) -> set[int]:
        """Slots whose batch the consumer still holds (some view of it is alive)."""
        return {k for k, r in list(self._out.items()) if r() is not None}

    def free_all(self) -> None:
        """Free every slot the consumer does not hold: the previous pass's unread batches are discarded."""
        held = self.held()
        for k in range(len(self._flags)):
            if k not in held:
                self._flags[k] = 0

    def close(self) -> None:
        self._flags.close()
        # A batch the consumer still holds keeps the data mapping (its ctypes arrays reference it): it is
        # unmapped when the last one dies.
        with contextlib.suppress(BufferError):
            self._data.close()


def as_is(item: Any) -> Any:
    """The DataLoader's per-item conversion (``batch_size=None``): none. Its default turns numpy arrays
    into tensors in the worker, and every tensor crosses to the main process as a shared-memory file
    descriptor (a new segment and a socket round trip each); the small per-batch arrays (labels, masks,
    ``valid``) cross as pickled bytes instead and the main process wraps them (``Loader.__iter__``)."""
    return item


class WorkerPool:
    """``num_workers`` persistent DataLoader workers over one dataset object (a ``ShardStream``
    holding this pool's :class:`SpecSlot` as its ``spec``)."""

    def __init__(self, dataset: Any, *, num_workers: int, prefetch_batches: int, capacity: int = SPEC_BYTES) -> None:
        self.slot = SpecSlot(capacity)
        cfg = dataset.cfg
        self.ring = BatchRing(num_workers, prefetch_batches + RING_EXTRA, cfg.batch_size * 3 * cfg.image_size ** 2)
        dataset.spec, dataset.ring = self.slot, self.ring
        self.dataset = dataset
        self._dl: DataLoader | None = DataLoader(
            dataset, batch_size=None, num_workers=num_workers, prefetch_factor=prefetch_batches,
            multiprocessing_context="fork", persistent_workers=True, worker_init_fn=leave_sigterm_to_the_parent,
            collate_fn=as_is)

    @property
    def closed(self) -> bool:
        return self._dl is None

    def run(self, spec: PassSpec) -> Iterator[Any] | None:
        """The pass's items, or None when its spec does not fit the slot (the caller restarts the
        pool with :meth:`needed`)."""
        assert self._dl is not None, "WorkerPool.run after close()"
        data = pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)
        if not self.slot.fits(data):
            return None
        self.slot.write(data)  # before iter(): the workers' resume signal is sent by iter()
        self.ring.free_all()  # the previous pass's unread batches are discarded by iter()'s reset
        return iter(self._dl)

    @staticmethod
    def needed(spec: PassSpec) -> int:
        return 2 * len(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL))

    def pids(self) -> list[int]:
        """The worker processes' pids (empty before the first pass and after close)."""
        it = getattr(self._dl, "_iterator", None)
        return [w.pid for w in getattr(it, "_workers", [])]

    def close(self) -> None:
        """Stop the workers now (idempotent)."""
        dl, self._dl = self._dl, None
        if dl is None:
            return
        it = getattr(dl, "_iterator", None)
        # torch stops a persistent iterator's workers when it is garbage collected; stop them now
        # (its own shutdown: sentinel to each worker, join, terminate stragglers) where it exists.
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
        dl._iterator = None  # type: ignore[attr-defined]
        del it, dl
        self.slot.close()
        self.ring.close()
