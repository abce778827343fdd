"""Object storage behind one small interface: local folders, ``file://`` and ``s3://``.

``open_storage(url)`` returns a :class:`Storage` rooted at ``url``; every method takes keys
relative to that root (``"shards/train-000000.tar"``). S3 goes through boto3 with the
endpoint taken from ``AWS_ENDPOINT_URL`` (so MinIO and a local moto server work).

Reading is built for long streaming GETs from many processes:

* one boto3 client per process, created lazily (after a DataLoader fork), with a connection
  pool sized for the prefetch threads;
* :meth:`Storage.open_range` returns a :class:`RangeReader`, a file-like stream that survives a
  connection reset, a 5xx or a short read (``IncompleteRead``) in the middle of an object: it
  backs off exponentially and re-opens the object with a ``Range`` request from the first byte
  it has not yet handed out, so the caller never sees a duplicate or a gap. After ``retries``
  failed attempts it raises :class:`StorageError` naming the object.
"""

from __future__ import annotations

import io
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

log = logging.getLogger(__name__)

#: Default attempts for one streamed object before giving up (each one resumes, not restarts).
DEFAULT_RETRIES = 6
#: Chunk used when streaming objects (bytes).
CHUNK = 1 << 20
#: Bytes read successfully after a failure before the retry budget is refilled.
PROGRESS_RESET = 1 << 20


class StorageError(IOError):
    """An object could not be read or written after all retries; the message names it."""


def url_join(url: str, *parts: str) -> str:
    """Join path parts onto a local path, ``file://`` or ``s3://`` URL with single slashes."""
    out = url.rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}" if out else p
    return out


def _split_s3(url: str) -> tuple[str, str]:
    u = urlparse(url)
    if u.scheme != "s3" or not u.netloc:
        raise ValueError(f"not an s3:// URL: {url!r} (expected s3://bucket/prefix)")
    return u.netloc, u.path.strip("/")


# --------------------------------------------------------------------------------------
# boto3 client: one per process, created lazily so forked DataLoader workers never share
# a parent's sockets.
_CLIENTS: dict[tuple[int, str | None], Any] = {}
_CLIENT_LOCK = threading.Lock()


def s3_client(max_pool_connections: int = 32) -> Any:
    """The process-wide boto3 S3 client (endpoint from ``AWS_ENDPOINT_URL``)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or None
    key = (os.getpid(), endpoint)
    client = _CLIENTS.get(key)
    if client is not None:
        return client
    with _CLIENT_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(
                max_pool_connections=max_pool_connections,
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=10,
                read_timeout=60,
                tcp_keepalive=True,
            )
            session = boto3.session.Session()
            client = session.client("s3", endpoint_url=endpoint, config=cfg)
            _CLIENTS[key] = client
    return client


def _retryable(exc: BaseException) -> bool:
    """Errors worth a resume-from-offset retry: network drops, short reads, throttling, 5xx."""
    try:
        from botocore.exceptions import ClientError
    except ImportError:  # pragma: no cover - boto3 is a hard dependency
        ClientError = ()  # type: ignore[assignment]
    if isinstance(exc, ClientError):  # type: ignore[arg-type]
        meta = exc.response.get("ResponseMetadata", {})  # type: ignore[attr-defined]
        code = str(exc.response.get("Error", {}).get("Code", ""))  # type: ignore[attr-defined]
        status = int(meta.get("HTTPStatusCode", 0) or 0)
        return status >= 500 or status == 429 or code in {"SlowDown", "RequestTimeout", "InternalError"}
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    return isinstance(exc, OSError | EOFError) or type(exc).__name__ in {
        "IncompleteReadError",
        "ReadTimeoutError",
        "ProtocolError",
        "IncompleteRead",
        "ResponseStreamingError",
        "EndpointConnectionError",
        "ConnectionClosedError",
    }


class RangeReader(io.RawIOBase):
    """A read-only stream over ``[start, end)`` of an object that resumes after failures.

    ``opener(pos, end)`` returns ``(raw_stream, object_size)`` for bytes ``pos..end-1``.
    Whenever reading fails (or the stream ends before the expected byte), the reader waits
    ``backoff * 2**attempt`` (jittered) and calls ``opener`` again from the first byte not
    yet returned. ``retries`` bounds failures that are not separated by at least
    :data:`PROGRESS_RESET` bytes of successful reading (a link that drops every few KB is
    as dead as one that never connects).
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
                self._drop()
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


class Storage:
    """Common interface; see :func:`open_storage`. Keys are ``/``-separated and relative."""

    url: str

    def read_bytes(self, key: str) -> bytes:
        with self.open_range(key) as f:
            return f.read()

    def write_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def size(self, key: str) -> int:
        """Object size in bytes (``FileNotFoundError`` if absent)."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """All keys under ``prefix`` (recursive), sorted."""
        raise NotImplementedError

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        raise NotImplementedError

    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def open_range(self, key: str, start: int = 0, end: int | None = None, **kw: Any) -> RangeReader:
        """A resumable stream over bytes ``[start, end)`` of ``key``."""
        raise NotImplementedError

    def url_for(self, key: str) -> str:
        """The full URL (or path) of ``key``."""
        return url_join(self.url, key)


class LocalStorage(Storage):
    """A local directory (plain path or ``file://``)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    def _p(self, key: str) -> Path:
        return self.root / key

    def write_bytes(self, key: str, data: bytes) -> None:
        p = self._p(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, p)

    def exists(self, key: str) -> bool:
        return self._p(key).exists()

    def size(self, key: str) -> int:
        return self._p(key).stat().st_size

    def list(self, prefix: str = "") -> list[str]:
        base = self.root
        if not base.exists():
            return []
        out = []
        for p in base.rglob("*"):
            if p.is_file() and not (p.name.startswith(".") and ".tmp" in p.name):  # skip in-flight writes
                k = p.relative_to(base).as_posix()
                if k.startswith(prefix):
                    out.append(k)
        return sorted(out)

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        p = self._p(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, p)

    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._p(key), local_path)

    def delete(self, key: str) -> None:
        self._p(key).unlink(missing_ok=True)

    def open_range(self, key: str, start: int = 0, end: int | None = None, **kw: Any) -> RangeReader:
        path = self._p(key)
        if not path.exists():
            raise FileNotFoundError(f"no such shard/object: {path}")

        def opener(pos: int, stop: int | None) -> tuple[BinaryIO, int]:
            f = open(path, "rb")  # noqa: SIM115 - owned by the RangeReader
            f.seek(pos)
            return f, os.fstat(f.fileno()).st_size

        return RangeReader(str(path), opener, start, end, **kw)


class S3Storage(Storage):
    """``s3://bucket/prefix`` through boto3 (endpoint from ``AWS_ENDPOINT_URL``)."""

    def __init__(self, url: str) -> None:
        self.bucket, self.prefix = _split_s3(url)
        self.url = url.rstrip("/")

    @property
    def client(self) -> Any:
        return s3_client()

    def _k(self, key: str) -> str:
        return url_join(self.prefix, key) if self.prefix else key.strip("/")

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20,
                              max_concurrency=4, use_threads=True)

    def _with_retries(self, what: str, fn: Callable[[], Any], retries: int = DEFAULT_RETRIES) -> Any:
        for attempt in range(retries + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below
                if not _retryable(exc) or attempt == retries:
                    if _retryable(exc):
                        raise StorageError(f"{what} failed after {retries} retries: {exc!r}") from exc
                    raise
                time.sleep(0.2 * 2**attempt * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def write_bytes(self, key: str, data: bytes) -> None:
        self._with_retries(f"put {self.url_for(key)}",
                           lambda: self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data))

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except FileNotFoundError:
            return False

    def size(self, key: str) -> int:
        from botocore.exceptions import ClientError

        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                raise FileNotFoundError(f"no such object: {self.url_for(key)}") from exc
            raise
        return int(r["ContentLength"])

    def list(self, prefix: str = "") -> list[str]:
        full = (self.prefix + "/" if self.prefix else "") + prefix.lstrip("/")  # keeps a trailing "/"
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                k = obj["Key"]
                out.append(k[len(self.prefix) + 1:] if self.prefix else k)
        return sorted(out)

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        self._with_retries(
            f"upload {self.url_for(key)}",
            lambda: self.client.upload_file(str(local_path), self.bucket, self._k(key),
                                            Config=self._transfer_config()),
        )

    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        self._with_retries(
            f"download {self.url_for(key)}",
            lambda: self.client.download_file(self.bucket, self._k(key), str(local_path),
                                              Config=self._transfer_config()),
        )

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def open_range(self, key: str, start: int = 0, end: int | None = None, **kw: Any) -> RangeReader:
        from botocore.exceptions import ClientError

        bucket, k, name = self.bucket, self._k(key), self.url_for(key)

        def opener(pos: int, stop: int | None) -> tuple[BinaryIO, int]:
            rng = f"bytes={pos}-" if stop is None else f"bytes={pos}-{max(stop, pos + 1) - 1}"
            try:
                r = s3_client().get_object(Bucket=bucket, Key=k, Range=rng)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in {"NoSuchKey", "404"}:
                    raise FileNotFoundError(f"no such shard/object: {name}") from exc
                if code == "InvalidRange":  # pos == object size: an empty tail
                    return io.BytesIO(b""), pos
                raise
            total = int(r["ContentRange"].rsplit("/", 1)[1]) if "ContentRange" in r else int(r["ContentLength"])
            # botocore's StreamingBody, read in chunks (no whole-object buffering); a short body
            # raises IncompleteReadError, a reset ResponseStreamingError: both resume above.
            return r["Body"], total

        return RangeReader(name, opener, start, end, **kw)


def open_storage(url: str | os.PathLike[str]) -> Storage:
    """A :class:`Storage` for a local path, ``file://path`` or ``s3://bucket/prefix``."""
    s = str(url)
    if s.startswith("s3://"):
        return S3Storage(s)
    if s.startswith("file://"):
        s = urlparse(s).path
    return LocalStorage(s)
