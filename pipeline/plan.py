"""The epoch plan: which sample ids each (rank, dataloader worker) slot reads, in what order.

Everything here is pure index arithmetic on sample ids (no I/O, no decoding), which is what
makes exact resume cheap: the order a slot emits is a function of
``(seed, epoch, segment, slot)`` and the shard sizes alone. Nothing here is O(samples) in
memory: an epoch's order is an :class:`Order`, runs of consecutive ids (one per shard, plus the
few samples an interrupted shuffle buffer held), and a slot's emission is streamed
(:func:`resume_slot`), so a rank plans 300M samples in the memory of its shard table.

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

Repeated augmentation (``repeats = R > 1``, train only; DeiT's RASampler, Hoffer et al. 2019)
    Every sample is planned ``R`` times per epoch, each copy its own *virtual id*
    ``copy * T + id`` (``T`` the split's samples): its own augmentation seed, its own place in the
    plan. The epoch's order is the shard permutation above laid out ``R`` times in a row (copy 0
    of every sample, then copy 1, ...), so shard ``s``'s copy ``c`` is the contiguous virtual
    shard ``c * n_shards + s`` (:func:`repeated_shard_start`) and everything below (slots, the
    shuffle buffer, segments, resume) runs unchanged on virtual ids: every copy is planned,
    emitted and counted exactly once, i.e. each sample exactly ``R`` times. The slots cut that
    sequence into ``S`` equal parts, so a sample's copies sit ``T`` positions, about ``S / R``
    slots, apart: on ``R`` different ranks whenever ``world_size >= R`` (RASampler likewise gives
    each copy to another GPU), at about the same step. An epoch is ``R * T`` samples; the dropped
    remainder (``< S * B`` copies) is the tail of the last copy. Unlike RASampler, which cuts every
    epoch back to ``T`` samples (a third of the images, 3 times each, for R = 3), an epoch here is
    every image ``R`` times: over a run the images are seen as often, and the plan's
    exactly-``R`` accounting holds per epoch.

Segments
    Restoring a mid-epoch state on a different world size / worker count / batch size starts
    a new *segment*: the rest of the epoch is the epoch's order minus every sample consumed in
    earlier segments (:func:`remaining_order`), re-cut for the new layout. No sample repeats;
    the order differs from an uninterrupted run at the new size (exactness is relaxed only
    there), and the new layout drops its own remainder.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

MASK64 = (1 << 64) - 1
#: Ids materialised at a time when a slot's stream is walked (bounded memory per worker).
CHUNK = 1 << 16


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


_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix_last(prefix: tuple[int, ...], last: np.ndarray | list[int]) -> list[int]:
    """``[mix(*prefix, x) for x in last]``, vectorised (numpy's uint64 arithmetic wraps mod 2**64
    as the masks above do): ~0.1 us per value instead of ~3 us, for a batch's sample seeds."""
    h = np.uint64(mix(*prefix))  # the running hash after the prefix (mix() of nothing: its start value)
    v = np.asarray(last, dtype=np.int64).astype(np.uint64)  # two's complement, as int(x) & MASK64
    with np.errstate(over="ignore"):
        z = (h ^ v) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    return z.tolist()


# ----------------------------------------------------------------------------- orders
@dataclass(frozen=True, eq=False)
class Order:
    """A sequence of sample ids as spans of consecutive ids: span ``k`` is
    ``starts[k] .. starts[k] + lens[k] - 1``. Positions index the whole sequence."""

    starts: np.ndarray  # (m,) int64
    lens: np.ndarray  # (m,) int64, all > 0
    cum: np.ndarray = field(init=False, repr=False)  # (m + 1,) position of each span's first id

    def __post_init__(self) -> None:
        object.__setattr__(self, "cum", np.concatenate([[0], np.cumsum(self.lens)]).astype(np.int64))

    @staticmethod
    def make(starts: np.ndarray, lens: np.ndarray) -> Order:
        """Spans without empty ones, neighbours that continue each other merged."""
        starts, lens = np.asarray(starts, np.int64), np.asarray(lens, np.int64)
        keep = lens > 0
        starts, lens = starts[keep], lens[keep]
        if len(starts) > 1:
            new = np.concatenate([[True], starts[1:] != starts[:-1] + lens[:-1]])
            group = np.cumsum(new) - 1
            lens = np.bincount(group, weights=lens).astype(np.int64)
            starts = starts[new]
        return Order(starts, lens)

    @staticmethod
    def of_ids(ids: np.ndarray) -> Order:
        """An explicit id sequence as spans."""
        ids = np.asarray(ids, np.int64)
        return Order.make(ids, np.ones(len(ids), np.int64))

    def __len__(self) -> int:
        return int(self.cum[-1])

    def slice(self, a: int, b: int) -> Order:
        """Positions ``[a, b)`` as an :class:`Order` (O(spans))."""
        a, b = max(0, a), min(len(self), b)
        if a >= b:
            return Order(np.zeros(0, np.int64), np.zeros(0, np.int64))
        i, j = int(np.searchsorted(self.cum, a, "right")) - 1, int(np.searchsorted(self.cum, b, "left"))
        starts, lens = self.starts[i:j].copy(), self.lens[i:j].copy()
        cut = a - self.cum[i]
        starts[0] += cut
        lens[0] -= cut
        lens[-1] -= self.cum[j] - b
        return Order(starts, lens)

    def ids(self, a: int = 0, b: int | None = None) -> np.ndarray:
        """The ids at positions ``[a, b)`` as one array (O(b - a): small ranges or tests)."""
        part = self.slice(a, len(self) if b is None else b)
        if not len(part.starts):
            return np.zeros(0, np.int64)
        return np.repeat(part.starts - part.cum[:-1], part.lens) + np.arange(len(part), dtype=np.int64)

    def chunks(self) -> Iterator[np.ndarray]:
        """The ids in order, at most :data:`CHUNK` at a time."""
        for a in range(0, len(self), CHUNK):
            yield self.ids(a, a + CHUNK)

    def positions_of(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ``ids`` (each must be in the order)."""
        by_start = np.argsort(self.starts, kind="stable")
        k = by_start[np.searchsorted(self.starts[by_start], ids, "right") - 1]
        return self.cum[k] + (ids - self.starts[k])


def epoch_order(shard_start: np.ndarray, *, seed: int, epoch: int, train: bool, repeats: int = 1) -> Order:
    """All sample ids of one epoch in stream order (virtual ids ``copy * T + id`` when a train
    epoch ``repeats`` every sample; see the module docstring).

    ``shard_start`` has ``n_shards + 1`` entries: shard ``s`` holds ids
    ``shard_start[s] .. shard_start[s+1]-1``.
    """
    shard_start = np.asarray(shard_start, np.int64)
    n = len(shard_start) - 1
    if not train:
        return Order.make(shard_start[:1], shard_start[-1:] - shard_start[:1])
    perm = np.random.default_rng(mix(seed, epoch, 0x5A4D)).permutation(n)
    starts, lens = shard_start[perm], (shard_start[1:] - shard_start[:-1])[perm]
    total = int(shard_start[-1])
    return Order.make(np.concatenate([starts + c * total for c in range(repeats)]), np.tile(lens, repeats))


def repeated_shard_start(shard_start: np.ndarray, repeats: int) -> np.ndarray:
    """The shard table of the virtual ids of ``repeats`` copies: virtual shard ``c * n_shards + s``
    holds copy ``c`` of shard ``s`` (ids ``c * T + shard_start[s] ..``); ``repeats=1``: the table."""
    shard_start = np.asarray(shard_start, np.int64)
    if repeats == 1:
        return shard_start
    total = int(shard_start[-1])
    return np.concatenate([shard_start[:-1] + c * total for c in range(repeats)] + [[repeats * total]])


# ----------------------------------------------------------------------------- shuffle buffer
def shuffle_buffer_order(seq: np.ndarray, buffer: int, seed: int) -> np.ndarray:
    """The emission order of a classic streaming shuffle buffer over ``seq`` (see :class:`ShuffleBuffer`)."""
    sb = ShuffleBuffer(Order.of_ids(seq), buffer, seed)
    return np.fromiter(sb.emit(), np.int64, count=len(seq))


class ShuffleBuffer:
    """A classic streaming shuffle buffer over a slot's stream, as a resumable state machine.

    Fill a buffer of ``buffer`` items; then for each new item emit a random buffered one and
    put the new one in its place; finally emit the rest in random order. :meth:`skip` advances
    past emissions without reading anything (O(skipped) time, O(buffer) memory): on resume the
    state -- which ids are buffered, where the stream is -- is what it was when they were
    emitted, so the rest of the emission is identical.
    """

    def __init__(self, stream: Order, buffer: int, seed: int) -> None:
        self.stream, self.rnd = stream, random.Random(seed)
        self.k = min(buffer, len(stream)) if buffer > 1 else 0  # 0: no shuffling
        self.buf: list[int] = stream.ids(0, self.k).tolist()
        self.pos = self.k  # stream position of the next id to enter the buffer
        self.final: list[int] | None = None  # the last buffer, shuffled, once the stream is spent
        self.at = 0  # emissions of ``final`` so far

    def _main_steps(self, n: int) -> Iterator[int]:
        """Up to ``n`` emissions of the main phase (one stream id in, one buffered id out)."""
        buf, rand, k = self.buf, self.rnd.random, self.k
        end = min(len(self.stream), self.pos + n)
        while self.pos < end:
            ids = self.stream.ids(self.pos, min(end, self.pos + CHUNK)).tolist()
            self.pos += len(ids)  # a chunk is taken in whole (skip ends on a chunk's end)
            for x in ids:
                j = int(rand() * k)
                out = buf[j]
                buf[j] = x
                yield out

    def _final(self) -> list[int]:
        if self.final is None:
            self.rnd.shuffle(self.buf)
            self.final = self.buf
        return self.final

    def skip(self, n: int) -> None:
        if self.k == 0:
            self.pos = min(len(self.stream), self.pos + n)
            return
        for _ in self._main_steps(n):
            n -= 1
        if n > 0:
            self.at = min(len(self._final()), self.at + n)

    def buffered(self) -> np.ndarray:
        """Ids read from the stream (positions < :attr:`pos`) but not yet emitted."""
        return np.asarray(self.final[self.at:] if self.final is not None else self.buf, np.int64)

    def emit(self) -> Iterator[int]:
        """The rest of the emission."""
        if self.k == 0:
            while self.pos < len(self.stream):
                ids = self.stream.ids(self.pos, self.pos + CHUNK).tolist()
                self.pos += len(ids)
                yield from ids
            return
        yield from self._main_steps(len(self.stream))
        final = self._final()
        while self.at < len(final):
            self.at += 1
            yield final[self.at - 1]


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class EpochPlan:
    """One segment of one epoch for a given layout. See the module docstring."""

    order: Order  # sample ids available to this segment, stream order (an id array is converted)
    world_size: int
    num_workers: int  # >= 1 (num_workers=0 in the DataLoader counts as one slot)
    batch_size: int
    train: bool
    seed: int
    epoch: int
    segment: int = 0
    shuffle_buffer: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.order, Order):
            object.__setattr__(self, "order", Order.of_ids(np.asarray(self.order)))

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

    def slot_order(self, slot: int) -> Order:
        """The slot's stream (ids it reads, in storage order) as an :class:`Order`."""
        return self.order.slice(*self._bounds(slot))

    def slot_stream(self, slot: int) -> np.ndarray:
        """Ids the slot reads, in storage (stream) order (materialised: tests and tools)."""
        return self.slot_order(slot).ids()

    def slot_emission(self, slot: int) -> np.ndarray:
        """Ids the slot emits, in batch order; eval slots are padded with ``-1`` (materialised)."""
        cur = resume_slot(self, slot, 0)
        return np.fromiter(cur.emission, np.int64, count=self.slot_len)

    def shuffle_seed(self, slot: int) -> int:
        return mix(self.seed, self.epoch, self.segment, slot, 0xB0F)


@dataclass
class SlotCursor:
    """A slot resumed after ``emitted`` emissions: what is left to read and emit.

    ``buffered``: ids read before the cursor but not yet emitted (re-read first, id order);
    ``tail``: the rest of the stream; ``emission``: the ids to emit, in order (-1: eval padding).
    """

    buffered: np.ndarray
    tail: Order
    emission: Iterator[int]


def tail_position(plan: EpochPlan, slot: int, emitted: int) -> int:
    """Stream position a slot has read up to after ``emitted`` emissions (no simulation needed)."""
    n = len(plan.slot_order(slot))
    if emitted == 0:
        return 0  # a fresh slot reads its whole stream
    ahead = min(plan.shuffle_buffer, n) if plan.train and plan.shuffle_buffer > 1 else 0
    return min(n, emitted + ahead)


def resume_slot(plan: EpochPlan, slot: int, emitted: int) -> SlotCursor:
    """The slot after ``emitted`` emissions, without reading anything (the shuffle buffer is
    replayed on ids: O(emitted) time, O(shuffle_buffer) memory)."""
    stream = plan.slot_order(slot)
    if not plan.train:
        pad = plan.slot_len - len(stream)
        tail = stream.slice(emitted, len(stream))

        def padded() -> Iterator[int]:
            for chunk in tail.chunks():
                yield from chunk.tolist()
            yield from [-1] * min(pad, plan.slot_len - emitted)

        return SlotCursor(np.zeros(0, np.int64), tail, padded())
    sb = ShuffleBuffer(stream, plan.shuffle_buffer, plan.shuffle_seed(slot))
    sb.skip(emitted)
    buffered = np.sort(sb.buffered()) if emitted else np.zeros(0, np.int64)
    start = sb.pos if emitted else 0  # a fresh slot reads its whole stream in order
    return SlotCursor(buffered, stream.slice(start, len(stream)), sb.emit())


def shard_pieces(order: Order, shard_start: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``order`` cut where the shard changes: ``(shard, ids)`` for each stretch of one shard."""
    cur_s, cur = -1, []
    for a, n in zip(order.starts.tolist(), order.lens.tolist(), strict=True):
        b = a + n
        while a < b:
            s = int(np.searchsorted(shard_start, a, "right")) - 1
            e = min(b, int(shard_start[s + 1]))
            if s != cur_s and cur:
                yield cur_s, np.concatenate(cur)
                cur = []
            cur_s = s
            cur.append(np.arange(a, e, dtype=np.int64))
            a = e
    if cur:
        yield cur_s, np.concatenate(cur)


def worker_batches_done(k: int, worker: int, num_workers: int) -> int:
    """Batches logical ``worker`` contributed to the first ``k`` batches of a rank (round robin)."""
    return max(0, -(-(k - worker) // num_workers))


def slot_emitted(plan: EpochPlan, batches: int, worker: int) -> int:
    """Emissions of logical ``worker``'s slot after its rank yielded ``batches`` batches of ``plan``."""
    return min(worker_batches_done(batches, worker, plan.num_workers), plan.batches_per_slot) * plan.batch_size


def remaining_order(plan: EpochPlan, batches: int) -> Order:
    """``plan.order`` minus every id emitted by every rank after each yielded ``batches`` batches,
    in ``plan.order``'s order: what a new segment of the epoch reads (O(spans + slots x buffer))."""
    starts: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    for slot in range(plan.num_slots):
        emitted = slot_emitted(plan, batches, slot % plan.num_workers)
        stream = plan.slot_order(slot)
        if not plan.train:
            left = stream.slice(emitted, len(stream))
        else:
            cur = resume_slot(plan, slot, emitted)
            if emitted:  # the buffered ids keep their places in the order, before the tail
                held = cur.buffered[np.argsort(stream.positions_of(cur.buffered), kind="stable")]
                starts.append(held)
                lens.append(np.ones(len(held), np.int64))
            left = cur.tail
        starts.append(left.starts)
        lens.append(left.lens)
    rest = plan.order.slice(plan.num_slots * plan.slot_len, len(plan.order)) if plan.train else None
    if rest is not None:
        starts.append(rest.starts)
        lens.append(rest.lens)
    return Order.make(np.concatenate(starts) if starts else np.zeros(0, np.int64),
                      np.concatenate(lens) if lens else np.zeros(0, np.int64))


def consumed_ids(plan: EpochPlan, batches: int) -> np.ndarray:
    """Ids emitted by every rank after each yielded ``batches`` batches of ``plan`` (padding removed;
    materialised: tests and tools)."""
    out = [plan.slot_emission(slot)[: slot_emitted(plan, batches, slot % plan.num_workers)]
           for slot in range(plan.num_slots)]
    ids = np.concatenate(out) if out else np.zeros(0, np.int64)
    return ids[ids >= 0]
