"""The epoch plan: which sample ids each (rank, dataloader worker) slot reads, in what order.

Everything here is pure index arithmetic on sample ids (no I/O, no decoding), which is what
makes exact resume cheap: the order a slot emits is a function of
``(seed, epoch, segment, slot)`` and the shard sizes alone.

Train (``train=True``)
    1. ``(seed, epoch)`` -> a permutation of the shards; samples are laid out shard after
       shard in that order (inside a shard in file order, so reads stay sequential).
    2. The sequence is cut into ``S = world_size * num_workers`` contiguous, equal slots of
       ``L = floor(T / (S * B)) * B`` samples; slot ``rank * num_workers + worker``.
       The remainder (``T - S * L < S * B`` samples, i.e. at most
       ``world_size * num_workers * batch_size - 1``) is dropped for this epoch. It is the tail
       of a fresh permutation, so different samples are dropped each epoch, and every rank
       yields exactly ``num_workers * L / B`` batches whatever the shard sizes.
    3. Inside a slot a shuffle buffer (``shuffle_buffer`` samples, seeded by
       ``(seed, epoch, segment, slot)``) permutes the stream; sample ``i`` of the emission
       order has been read by stream position ``shuffle_buffer + i``, so memory is bounded.

Eval (``train=False``)
    Canonical order, no shuffle, no drop: ``T`` samples are spread over the ``S`` slots as
    evenly as possible and every slot is padded (id ``-1``) to the same whole number of
    batches, so each sample is seen exactly once across ranks and all ranks agree on length.

Segments
    Restoring a mid-epoch state on a different world size / worker count / batch size starts
    a new *segment*: the rest of the epoch is the epoch's order minus every sample consumed in
    earlier segments, re-cut for the new layout. No sample repeats; the order differs from an
    uninterrupted run at the new size (exactness is relaxed only there), and the new layout
    drops its own remainder.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

MASK64 = (1 << 64) - 1


def mix(*xs: int) -> int:
    """A well-spread 64-bit hash of a tuple of ints (splitmix64 steps); stable across runs."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & MASK64)) & MASK64
        h = (h + 0x9E3779B97F4A7C15) & MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        h = z ^ (z >> 31)
    return h


def epoch_order(shard_start: np.ndarray, *, seed: int, epoch: int, train: bool) -> np.ndarray:
    """All sample ids of one epoch in stream order.

    ``shard_start`` has ``n_shards + 1`` entries: shard ``s`` holds ids
    ``shard_start[s] .. shard_start[s+1]-1``.
    """
    n = len(shard_start) - 1
    if not train:
        return np.arange(shard_start[-1], dtype=np.int64)
    perm = np.random.default_rng(mix(seed, epoch, 0x5A4D)).permutation(n)
    parts = [np.arange(shard_start[s], shard_start[s + 1], dtype=np.int64) for s in perm]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def shuffle_buffer_order(seq: np.ndarray, buffer: int, seed: int) -> np.ndarray:
    """The emission order of a classic streaming shuffle buffer over ``seq``.

    Fill a buffer of ``buffer`` items; then for each new item emit a random buffered one and
    put the new one in its place; finally emit the rest in random order.
    """
    if buffer <= 1 or len(seq) <= 1:
        return seq.copy()
    rnd = random.Random(seed)
    buf = list(seq[:buffer])
    out = []
    b = len(buf)
    for x in seq[buffer:].tolist():
        j = int(rnd.random() * b)
        out.append(buf[j])
        buf[j] = x
    rnd.shuffle(buf)
    out.extend(buf)
    return np.asarray(out, dtype=np.int64)


@dataclass(frozen=True)
class EpochPlan:
    """One segment of one epoch for a given layout. See the module docstring."""

    order: np.ndarray  # (T,) sample ids available to this segment, stream order
    world_size: int
    num_workers: int  # >= 1 (num_workers=0 in the DataLoader counts as one slot)
    batch_size: int
    train: bool
    seed: int
    epoch: int
    segment: int = 0
    shuffle_buffer: int = 0

    @property
    def num_slots(self) -> int:
        return self.world_size * self.num_workers

    @property
    def slot_len(self) -> int:
        """Samples (incl. eval padding) per slot; always a multiple of ``batch_size``."""
        t, s, b = len(self.order), self.num_slots, self.batch_size
        if self.train:
            return (t // (s * b)) * b
        per = -(-t // s)  # ceil
        return -(-per // b) * b

    @property
    def batches_per_slot(self) -> int:
        return self.slot_len // self.batch_size

    @property
    def batches_per_rank(self) -> int:
        return self.batches_per_slot * self.num_workers

    @property
    def dropped(self) -> int:
        """Samples of this segment no slot will read (train remainder)."""
        return len(self.order) - self.num_slots * self.slot_len if self.train else 0

    def _bounds(self, slot: int) -> tuple[int, int]:
        if self.train:
            L = self.slot_len
            return slot * L, (slot + 1) * L
        t, s = len(self.order), self.num_slots
        base, extra = divmod(t, s)
        start = slot * base + min(slot, extra)
        return start, start + base + (1 if slot < extra else 0)

    def slot_stream(self, slot: int) -> np.ndarray:
        """Ids the slot reads, in storage (stream) order."""
        a, b = self._bounds(slot)
        return self.order[a:b]

    def slot_emission(self, slot: int) -> np.ndarray:
        """Ids the slot emits, in batch order; eval slots are padded with ``-1``."""
        seq = self.slot_stream(slot)
        if self.train:
            return shuffle_buffer_order(seq, self.shuffle_buffer, mix(self.seed, self.epoch, self.segment, slot, 0xB0F))
        pad = self.slot_len - len(seq)
        return np.concatenate([seq, np.full(pad, -1, np.int64)]) if pad else seq.copy()


def worker_batches_done(k: int, worker: int, num_workers: int) -> int:
    """Batches logical ``worker`` contributed to the first ``k`` batches of a rank (round robin)."""
    return max(0, -(-(k - worker) // num_workers))


def consumed_ids(plan: EpochPlan, batches: int) -> np.ndarray:
    """Ids emitted by every rank after each yielded ``batches`` batches of ``plan`` (padding removed)."""
    out = []
    for r in range(plan.world_size):
        for w in range(plan.num_workers):
            n = min(worker_batches_done(batches, w, plan.num_workers), plan.batches_per_slot)
            out.append(plan.slot_emission(r * plan.num_workers + w)[: n * plan.batch_size])
    ids = np.concatenate(out) if out else np.zeros(0, np.int64)
    return ids[ids >= 0]
