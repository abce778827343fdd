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

import logging
import mmap
import multiprocessing
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from ..plan import EpochPlan
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


class WorkerPool:
    """``num_workers`` persistent DataLoader workers over one dataset object (a ``ShardStream``
    holding this pool's :class:`SpecSlot` as its ``spec``)."""

    def __init__(self, dataset: Any, *, num_workers: int, prefetch_batches: int, capacity: int = SPEC_BYTES) -> None:
        self.slot = SpecSlot(capacity)
        dataset.spec = self.slot
        self.dataset = dataset
        self._dl: DataLoader | None = DataLoader(
            dataset, batch_size=None, num_workers=num_workers, prefetch_factor=prefetch_batches,
            multiprocessing_context="fork", persistent_workers=True, worker_init_fn=leave_sigterm_to_the_parent)

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
