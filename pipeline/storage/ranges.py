"""``RangeReader``: a file-like stream over a byte range that resumes after failures.

:meth:`Storage.open_range <pipeline.storage.base.Storage.open_range>` returns one for every
backend. It survives a connection reset, a stall, a short read or a damaged response in the
middle of an object: it backs off exponentially and re-opens the object with a ``Range`` request
from the first byte it has not yet handed out, so the caller never sees a duplicate or a gap.
After ``retries`` failed attempts it raises :class:`~pipeline.storage.retry.StorageError` naming
the object. Which failures it retries is decided in :mod:`pipeline.storage.retry`.
"""

from __future__ import annotations

import io
import logging
import random
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from .retry import DEFAULT_RETRIES, StorageError, _retried_by_botocore, _retryable

log = logging.getLogger(__name__)

#: Chunk used when streaming objects (bytes).
CHUNK = 1 << 20
#: Bytes read successfully after a failure before the retry budget is refilled.
PROGRESS_RESET = 1 << 20


class RangeReader(io.RawIOBase):
    """A read-only stream over ``[start, end)`` of an object that resumes after failures.

    ``opener(pos, end)`` returns ``(raw_stream, object_size)`` for bytes ``pos..end-1``.
    Whenever reading fails (or the stream ends before the expected byte), the reader waits
    ``backoff * 2**attempt`` (jittered) and calls ``opener`` again from the first byte not
    yet returned. ``retries`` bounds failures that are not separated by at least
    :data:`PROGRESS_RESET` bytes of successful reading (a link that drops every few KB is
    as dead as one that never connects). An ``opener`` error that botocore already retried
    (see :func:`_retried_by_botocore`) is final: it raises :class:`StorageError` at once.
    """

    def __init__(
        self,
        name: str,
        opener: Callable[[int, int | None], tuple[BinaryIO, int]],
        start: int = 0,
        end: int | None = None,
        *,
        retries: int = DEFAULT_RETRIES,
        backoff: float = 0.2,
    ) -> None:
        super().__init__()
        self.name_ = name
        self._opener = opener
        self.pos = start
        self.end = end
        self.retries = retries
        self.backoff = backoff
        self.size: int | None = None
        self.reconnects = 0
        self._failures = 0
        self._progress = 0
        self._raw: BinaryIO | None = None

    # --- io.RawIOBase ------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def _limit(self) -> int | None:
        ends = [e for e in (self.end, self.size) if e is not None]
        return min(ends) if ends else None

    def _open(self) -> None:
        raw, size = self._opener(self.pos, self.end)
        self._raw, self.size = raw, size

    def _drop(self) -> None:
        if self._raw is not None:
            try:
                self._raw.close()
            except Exception:  # noqa: BLE001 - closing a broken socket may raise anything
                pass
        self._raw = None

    def read(self, n: int = -1) -> bytes:
        """Return up to ``n`` bytes (``-1``: to the end); ``b""`` only at the real end."""
        if n is None or n < 0:
            chunks = []
            while True:
                c = self.read(CHUNK)
                if not c:
                    return b"".join(chunks)
                chunks.append(c)
        limit = self._limit()
        if n == 0 or (limit is not None and self.pos >= limit):
            return b""
        while True:
            try:
                if self._raw is None:
                    self._open()
                    limit = self._limit()
                    if limit is not None and self.pos >= limit:
                        return b""
                want = n if limit is None else min(n, limit - self.pos)
                data = self._raw.read(want)  # type: ignore[union-attr]
                if not data:
                    limit = self._limit()
                    if limit is None or self.pos >= limit:
                        return b""
                    raise EOFError(f"stream ended at byte {self.pos} of {limit}")
                self.pos += len(data)
                if self._failures:
                    self._progress += len(data)
                    if self._progress >= PROGRESS_RESET:
                        self._failures = self._progress = 0
                return data
            except Exception as exc:  # noqa: BLE001 - classified below
                opening = self._raw is None
                self._drop()
                if opening and _retried_by_botocore(exc) and _retryable(exc):
                    # botocore already spent its attempts on this request: retrying it here too
                    # would multiply them (reader retries x botocore attempts).
                    raise StorageError(f"giving up on {self.name_} at byte {self.pos}: the request failed "
                                       f"after botocore's retries (S3Settings.request_attempts): {exc!r}") from exc
                if not _retryable(exc):
                    raise
                self._failures += 1
                self._progress = 0
                failures = self._failures
                if failures > self.retries:
                    raise StorageError(
                        f"giving up on {self.name_} at byte {self.pos} after {self.retries} retries: {exc!r}"
                    ) from exc
                self.reconnects += 1
                delay = self.backoff * (2 ** (failures - 1)) * (0.5 + random.random())
                log.warning("read of %s failed at byte %d (%r); retry %d in %.2fs",
                            self.name_, self.pos, exc, failures, delay)
                time.sleep(delay)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def read_exact(self, n: int) -> bytes:
        """Read exactly ``n`` bytes, or fewer only if the object itself ends first."""
        parts, got = [], 0
        while got < n:
            d = self.read(n - got)
            if not d:
                break
            parts.append(d)
            got += len(d)
        return b"".join(parts)

    def skip(self, n: int) -> int:
        """Discard ``n`` bytes; a large gap re-opens the stream at the new offset instead."""
        if n <= 0:
            return 0
        if n > 4 * CHUNK:
            self._drop()
            limit = self._limit()
            target = self.pos + n if limit is None else min(self.pos + n, limit)
            skipped = target - self.pos
            self.pos = target
            return skipped
        got = 0
        while got < n:
            d = self.read(min(CHUNK, n - got))
            if not d:
                break
            got += len(d)
        return got

    def close(self) -> None:
        self._drop()
        super().close()
