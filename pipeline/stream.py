"""Read sample bytes out of tar shards by byte range, prefetching upcoming shards in threads.

The writer recorded, for every sample, the byte range of its image member inside its shard
(the shard's rows file), so a reader never parses tar headers: for each shard a slot touches it
opens one streaming ``Range`` GET from the first wanted sample to the end of the last one and
slices members out of the stream, skipping (or, for big gaps, re-ranging over) unwanted ones.
That is what lets a slot start in the middle of a shard and resume without reading what came
before. Up to ``prefetch`` shard runs stream concurrently, each into a bounded queue; a run's
byte ranges may be looked up in its reader thread (``locate``: the loader reads the shard's
rows file there), so that lookup overlaps with decoding too.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .format import REWRITE_HINT, IntegrityError
from .storage import DEFAULT_RETRIES, Storage

_DONE = object()
#: Samples per read and queue item (fewer once CHUNK_BYTES are spanned, at a gap over BLOCK_GAP and at
#: the end of a run): one read call, one queue operation and one thread wake-up per CHUNK_ITEMS
#: samples; each sample is then a slice of the block (~15 us less per sample than a read each).
CHUNK_ITEMS = 16
CHUNK_BYTES = 4 << 20
#: Unwanted bytes between two samples read through as part of one block (tar headers are ~1 KB);
#: a larger gap ends the block and is skipped (``RangeReader.skip``: read through or re-ranged).
BLOCK_GAP = 256 << 10


@dataclass(frozen=True)
class Run:
    """Consecutive wanted samples of one shard: ids (ascending offsets) and their byte ranges.

    ``expect_bytes``: the shard's recorded size, checked when the stream opens (the size comes
    with the GET response: no extra request). ``expect_sha256``: set when the run wants every
    sample of the shard; the reader then streams the whole shard (gaps and tail too, ~1 KB per
    sample) through sha256 and checks it at the end -- no second read. Byte ranges left None
    are filled in by ``iter_runs``' ``locate`` (in the reader thread), which may also attach
    ``rows`` (handed to the consumer with each sample) and each id's row number in it (``local``).
    """

    shard: str
    ids: np.ndarray
    offsets: np.ndarray | None = None
    sizes: np.ndarray | None = None
    expect_bytes: int | None = None
    expect_sha256: str | None = None
    index: int = -1  # the shard's number in the caller's shard table (for ``locate``)
    rows: Any = None
    local: np.ndarray | None = None


class Truncated(Exception):
    """The shard ended before this sample's bytes (a truncated member / short shard)."""


def _read_run(storage: Storage, run: Run, locate: Callable[[Run], Run] | None, q: queue.Queue,
              stop: threading.Event, retries: int, backoff: float) -> None:
    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        if run.offsets is None:
            if locate is None:
                raise ValueError(f"run of {run.shard} has no byte ranges and iter_runs got no locate")
            run = locate(run)
        assert run.offsets is not None and run.sizes is not None
        local = run.local if run.local is not None else np.arange(len(run.ids))
        rows = run.rows
        digest = hashlib.sha256() if run.expect_sha256 else None
        start = 0 if digest else int(run.offsets[0])
        end = None if digest else int(run.offsets[-1] + run.sizes[-1])
        with storage.open_range(run.shard, start, end, retries=retries, backoff=backoff) as f:
            truncated = False
            ids, offs, sizes, ks = run.ids.tolist(), run.offsets.tolist(), run.sizes.tolist(), local.tolist()
            j, n = 0, len(ids)
            while j < n:
                if stop.is_set():
                    return
                e, end = _block(offs, sizes, j)
                chunk: list[tuple[int, bytes | Truncated, Any, int]] = []
                if not truncated:
                    base = offs[j]
                    if digest:
                        digest.update(f.read_exact(base - f.pos))
                    else:
                        f.skip(base - f.pos)
                    block = f.read_exact(end - base) if f.pos == base else b""
                    _check_size(storage, run, f.size)
                    if digest:
                        digest.update(block)
                    for t in range(j, e):
                        lo = offs[t] - base
                        if truncated or lo + sizes[t] > len(block):
                            truncated = True
                            chunk.append((ids[t], Truncated(), rows, ks[t]))
                        else:
                            chunk.append((ids[t], block[lo:lo + sizes[t]], rows, ks[t]))
                else:
                    chunk = [(ids[t], Truncated(), rows, ks[t]) for t in range(j, e)]
                if not put(chunk):
                    return
                j = e
            if digest:
                while rest := f.read(1 << 20):
                    digest.update(rest)
                if digest.hexdigest() != run.expect_sha256:
                    raise IntegrityError(
                        f"shard {storage.url_for(run.shard)} has sha256 {digest.hexdigest()[:16]}..., but "
                        f"index.parquet records {run.expect_sha256[:16]}...: it was modified after publishing; "
                        f"{REWRITE_HINT}")
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread, re-raised there
        put(exc)
        return
    put(_DONE)


def _block(offs: list[int], sizes: list[int], j: int) -> tuple[int, int]:
    """(e, end): samples ``j..e-1`` are read as one block, bytes ``[offs[j], end)``."""
    e, end = j + 1, offs[j] + sizes[j]
    while e < len(offs) and e - j < CHUNK_ITEMS and 0 <= offs[e] - end <= BLOCK_GAP \
            and offs[e] + sizes[e] - offs[j] <= CHUNK_BYTES:
        end = offs[e] + sizes[e]
        e += 1
    return e, end


def _check_size(storage: Storage, run: Run, size: int | None) -> None:
    if run.expect_bytes is not None and size is not None and size != run.expect_bytes:
        raise IntegrityError(f"shard {storage.url_for(run.shard)} is {size} bytes on storage, but index.parquet records "
                             f"{run.expect_bytes}: it was truncated or modified after publishing; {REWRITE_HINT}")


def iter_runs(storage: Storage, runs: Iterable[Run], *, locate: Callable[[Run], Run] | None = None,
              prefetch: int = 2, queue_items: int = 4, retries: int = DEFAULT_RETRIES,
              backoff: float = 0.2) -> Iterator[tuple[int, bytes | Truncated, Any, int]]:
    """Yield ``(id, bytes, rows, k)`` (or ``(id, Truncated(), rows, k)``) for every id of ``runs`` in
    order; ``rows`` / ``k``: the run's attached rows (from ``locate``) and the id's row in them.

    ``runs`` may be a lazy iterable (it is consumed ``prefetch`` runs ahead). Shard-level failures
    that survived the storage retries re-raise here, naming the shard.
    """
    stop = threading.Event()
    active: list[tuple[queue.Queue, threading.Thread]] = []
    pending = iter(runs)
    launched = 0

    def launch() -> None:
        nonlocal launched
        while len(active) < max(1, prefetch):
            run = next(pending, None)
            if run is None:
                return
            q: queue.Queue = queue.Queue(maxsize=queue_items)
            t = threading.Thread(target=_read_run, args=(storage, run, locate, q, stop, retries, backoff), daemon=True,
                                 name=f"shard-reader-{launched}")
            t.start()
            active.append((q, t))
            launched += 1

    try:
        launch()
        while active:
            q, _ = active[0]
            while True:
                item = q.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield from item  # type: ignore[misc]
            active.pop(0)
            launch()
    finally:
        stop.set()
