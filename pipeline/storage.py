"""Object storage behind one small interface: local folders, ``file://`` and ``s3://``.

``open_storage(url)`` returns a :class:`Storage` rooted at ``url``; every method takes keys
relative to that root (``"shards/train-000000.tar"``). S3 goes through boto3 with the
endpoint taken from ``AWS_ENDPOINT_URL`` (so MinIO and a local moto server work).

Reading is built for long streaming GETs from many processes:

* one boto3 client per process and :class:`S3Settings`, created lazily (after a DataLoader
  fork), with a connection pool sized for the prefetch threads and connect/read timeouts from
  the settings (``DataConfig.connect_timeout_s`` / ``read_timeout_s``), so a stalled connection
  costs seconds, not boto3's fixed minute;
* :meth:`Storage.open_range` returns a :class:`RangeReader`, a file-like stream that survives a
  connection reset, a stall, a short read or a damaged response in the middle of an object: it
  backs off exponentially and re-opens the object with a ``Range`` request from the first byte
  it has not yet handed out, so the caller never sees a duplicate or a gap. After ``retries``
  failed attempts it raises :class:`StorageError` naming the object.

Exactly two retry layers, each for failures the other cannot see, so attempts never multiply:
botocore's ``standard`` retries (``S3Settings.request_attempts`` per request) own every failure
of a request up to its parsed response (connect errors, resets before the body, 5xx, throttling,
timeouts while waiting for headers); the RangeReader owns what comes after botocore returned:
the body stream breaking, and responses botocore accepted but that are damaged (headers cut
mid-way parse as a response without ``Content-Range``/``Content-Length``, see
:class:`DamagedResponse`). A request error that botocore already retried is final for the
reader. Downloads go through the same reader (no s3transfer download retries on top), and
``size``/``exists`` read one byte through it: a byte of body proves the headers were complete,
which a ``HEAD`` cannot.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
#: Objects above this size download as parallel ranges of this size (one reader each).
DOWNLOAD_PART = 32 << 20


class StorageError(IOError):
    """An object could not be read or written after all retries; the message names it."""


class DamagedResponse(Exception):
    """A response botocore accepted but that cannot be right (e.g. headers cut mid-way).

    An HTTP response whose connection closes inside the header block parses as a complete
    response with the remaining headers missing; using it raised ``KeyError: 'ContentLength'``.
    Raised by our parsing, and retried by the RangeReader like a broken connection.
    """


@dataclass(frozen=True, kw_only=True)
class S3Settings:
    """How the S3 client waits and retries; one boto3 client per process and settings.

    ``connect_timeout_s``/``read_timeout_s``: per socket connect / per socket read (a stall
    longer than this fails the attempt). ``request_attempts``: botocore ``standard`` mode
    attempts per request, the only request-level retry (see the module docstring).
    """

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    request_attempts: int = 5
    max_pool_connections: int = 32

    def __post_init__(self) -> None:
        if not (self.connect_timeout_s > 0 and self.read_timeout_s > 0):
            raise ValueError(f"connect_timeout_s {self.connect_timeout_s} and read_timeout_s "
                             f"{self.read_timeout_s} must be > 0 seconds")
        if self.request_attempts < 1 or self.max_pool_connections < 1:
            raise ValueError(f"request_attempts {self.request_attempts} and max_pool_connections "
                             f"{self.max_pool_connections} must be >= 1")


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
_CLIENTS: dict[tuple[int, str | None, S3Settings], Any] = {}
_CLIENT_LOCK = threading.Lock()


def s3_client(settings: S3Settings | None = None) -> Any:
    """The process-wide boto3 S3 client for ``settings`` (endpoint from ``AWS_ENDPOINT_URL``)."""
    settings = settings or S3Settings()
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or None
    key = (os.getpid(), endpoint, settings)
    client = _CLIENTS.get(key)
    if client is not None:
        return client
    with _CLIENT_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(
                max_pool_connections=settings.max_pool_connections,
                retries={"total_max_attempts": settings.request_attempts, "mode": "standard"},
                connect_timeout=settings.connect_timeout_s,
                read_timeout=settings.read_timeout_s,
                tcp_keepalive=True,
            )
            session = boto3.session.Session()
            client = session.client("s3", endpoint_url=endpoint, config=cfg)
            client.meta.events.register("before-send.s3", _no_expect_continue)
            _CLIENTS[key] = client
    return client


def _no_expect_continue(request: Any, **_: Any) -> None:
    """Send PUT bodies without waiting for ``100 Continue`` (botocore's default for S3 uploads).

    botocore reads the interim response's headers until a blank line and never stops at end
    of stream, so a connection closed inside ``HTTP/1.1 100 Continue`` spins a writer forever
    (botocore 1.44). Without ``Expect`` the body goes out at once and a cut connection is an
    ordinary, retried error. ``Expect`` is not a signed header, so removing it after signing is
    safe. Must return None: a value returned from ``before-send`` would be used as the response.
    """
    if "Expect" in request.headers:
        del request.headers["Expect"]


def _botocore_classes() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(errors botocore's standard mode retries per request, errors of a streaming body)."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from urllib3.exceptions import ProtocolError

    # HTTPClientError covers ConnectionClosedError, ReadTimeoutError, ResponseStreamingError;
    # botocore's ConnectionError covers EndpointConnectionError and ConnectTimeoutError.
    request = (ClientError, BotoConnectionError, HTTPClientError)
    stream = (HTTPClientError, BotoConnectionError, IncompleteReadError, ProtocolError)
    return request, stream


def _retried_by_botocore(exc: BaseException) -> bool:
    """A request-level error: if transient, botocore already retried it ``request_attempts`` times."""
    return isinstance(exc, _botocore_classes()[0])


def _retryable(exc: BaseException) -> bool:
    """Errors worth a resume-from-offset retry: broken or stalled streams, damaged responses, 5xx."""
    from botocore.exceptions import ClientError

    if isinstance(exc, DamagedResponse):
        return True
    if isinstance(exc, ClientError):
        meta = exc.response.get("ResponseMetadata", {})
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(meta.get("HTTPStatusCode", 0) or 0)
        return status >= 500 or status == 429 or code in {"SlowDown", "RequestTimeout", "InternalError"}
    if isinstance(exc, _botocore_classes()[1]):
        return True
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    return isinstance(exc, OSError | EOFError)  # local files, raw sockets, our own short-stream check


def _parsed(what: str, call: Callable[[], Any]) -> Any:
    """Run one botocore call; a response it could not parse becomes :class:`DamagedResponse`.

    A header block cut mid-way can end inside a value botocore parses (``Last-Modified: Mon,
    30 Nov 2026 2`` raises ``ValueError: Invalid timestamp``); botocore does not retry that.
    Only the call is wrapped, so a KeyError of our own code is never mistaken for one.
    """
    from botocore.exceptions import BotoCoreError
    from botocore.parsers import ResponseParserError

    try:
        return call()
    except (ResponseParserError, KeyError, ValueError, IndexError) as exc:
        if isinstance(exc, BotoCoreError):  # e.g. UnknownEndpointError: configuration, not a response
            raise
        raise DamagedResponse(f"{what}: unparseable response ({exc!r})") from exc


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

    def ensure_bucket(self) -> None:
        """Raise :class:`StorageError` now if the bucket behind the URL is missing (S3 only)."""

    # Compare-and-swap of one small object: the one mechanism behind publishing a dataset
    # version and holding a run's lease. A token names one stored content of ``key``.
    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """``(content, token)`` of ``key`` read in one response, or None if it does not exist."""
        raise NotImplementedError

    def put_if(self, key: str, data: bytes, *, token: str | None) -> str | None:
        """Write ``data`` only if ``key`` is still as seen: absent (``token=None``) or holding the
        content of ``token``. Returns the new token, or None if the condition failed (someone
        else wrote or deleted it meanwhile)."""
        raise NotImplementedError

    def delete_if(self, key: str, *, token: str) -> bool:
        """Delete ``key`` only if it still holds the content of ``token``; False otherwise."""
        raise NotImplementedError


def _content_token(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[Path]:
        """Serialise read-check-write of ``key`` between processes. flock, not a lock file's
        existence: the kernel drops it when the holder dies, so a crash leaves no stale lock."""
        p = self._p(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p.with_name(f".{p.name}.lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield p
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._p(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, _content_token(data)

    def put_if(self, key: str, data: bytes, *, token: str | None) -> str | None:
        with self._locked(key) as p:
            current = p.read_bytes() if p.exists() else None
            if (None if current is None else _content_token(current)) != token:
                return None
            tmp = p.with_name(f".{p.name}.tmp{os.getpid()}.{threading.get_ident()}")
            tmp.write_bytes(data)
            os.replace(tmp, p)
        return _content_token(data)

    def delete_if(self, key: str, *, token: str) -> bool:
        with self._locked(key) as p:
            try:
                if _content_token(p.read_bytes()) != token:
                    return False
            except FileNotFoundError:
                return False
            p.unlink()
        return True

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

    def __init__(self, url: str, settings: S3Settings | None = None) -> None:
        self.bucket, self.prefix = _split_s3(url)
        self.url = url.rstrip("/")
        self.settings = settings or S3Settings()

    @property
    def client(self) -> Any:
        return s3_client(self.settings)

    def _k(self, key: str) -> str:
        return url_join(self.prefix, key) if self.prefix else key.strip("/")

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20,
                              max_concurrency=4, use_threads=True)

    def _call(self, what: str, fn: Callable[[], Any], *, parsed: bool = True) -> Any:
        """Run a non-streaming request: botocore retries the request itself; a damaged response
        (which botocore accepted) is retried here; a transient failure left is a StorageError.

        ``parsed=False`` for s3transfer calls: it reports response failures its own way.
        """
        for attempt in range(DEFAULT_RETRIES + 1):
            try:
                return _parsed(what, fn) if parsed else fn()
            except DamagedResponse as exc:
                if attempt == DEFAULT_RETRIES:
                    raise StorageError(f"{what}: damaged responses after {DEFAULT_RETRIES} retries: {exc}") from exc
                log.warning("%s: %s; retry %d", what, exc, attempt + 1)
                time.sleep(0.2 * 2**attempt * (0.5 + random.random()))
            except Exception as exc:  # noqa: BLE001 - classified below
                if _retryable(exc):
                    raise StorageError(f"{what} failed after {self.settings.request_attempts} attempts: "
                                       f"{exc!r}") from exc
                raise
        raise AssertionError("unreachable")

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call(f"put {self.url_for(key)}",
                   lambda: self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data))

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except FileNotFoundError:
            return False

    def size(self, key: str) -> int:
        # One byte through the RangeReader, not a HEAD: a response whose headers were cut parses
        # without (or with a truncated) Content-Length, and nothing in a HEAD can tell; a body byte
        # arrives only after the complete header block, and the reader retries until it does.
        with self.open_range(key, 0, 1) as f:
            f.read(1)
            if f.size is None:
                raise StorageError(f"no size for {self.url_for(key)}")  # unreachable after a read
            return f.size

    def ensure_bucket(self) -> None:
        """Fail with a clear message when the bucket is missing or not ours (before any work)."""
        from botocore.exceptions import ClientError, NoCredentialsError

        try:
            self._call(f"head bucket s3://{self.bucket}", lambda: self.client.head_bucket(Bucket=self.bucket))
        except NoCredentialsError as exc:
            raise StorageError(f"no S3 credentials for s3://{self.bucket}: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY (or an AWS profile)") from exc
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in {"404", "NoSuchBucket", "NotFound"}:
                raise StorageError(f"bucket s3://{self.bucket} does not exist: create it (aws s3 mb "
                                   f"s3://{self.bucket}) or fix the URL {self.url}") from exc
            raise StorageError(f"bucket s3://{self.bucket} is not usable ({code}): check the credentials "
                               f"and the endpoint AWS_ENDPOINT_URL") from exc

    def list(self, prefix: str = "") -> list[str]:
        full = (self.prefix + "/" if self.prefix else "") + prefix.lstrip("/")  # keeps a trailing "/"
        return self._call(f"list {self.url}/{full}", lambda: self._list_once(full))

    def _list_once(self, full: str) -> list[str]:
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            # Every ListObjectsV2 result carries IsTruncated; a page without it is a response
            # whose headers were cut (empty body parsed as {}): it would silently list nothing.
            if "IsTruncated" not in page:
                raise DamagedResponse(f"list page for s3://{self.bucket}/{full} lacks IsTruncated")
            for obj in page.get("Contents", []):
                k = obj["Key"]
                out.append(k[len(self.prefix) + 1:] if self.prefix else k)
        return sorted(out)

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        # s3transfer does not retry uploads itself; botocore retries each part request.
        self._call(
            f"upload {self.url_for(key)}",
            lambda: self.client.upload_file(str(local_path), self.bucket, self._k(key),
                                            Config=self._transfer_config()),
            parsed=False,
        )

    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        """Download through RangeReaders (parallel parts above :data:`DOWNLOAD_PART`), atomically.

        Not s3transfer's download: its own stream retries would stack on botocore's.
        """
        dst = Path(local_path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        size = self.size(key)
        tmp = dst.with_name(f".{dst.name}.part{os.getpid()}-{threading.get_ident()}")
        parts = [(a, min(a + DOWNLOAD_PART, size)) for a in range(0, size, DOWNLOAD_PART)]

        def fetch(part: tuple[int, int]) -> None:
            a, b = part
            with self.open_range(key, a, b) as r, open(tmp, "r+b") as f:
                f.seek(a)
                while chunk := r.read(CHUNK):
                    f.write(chunk)
                if f.tell() != b:
                    raise StorageError(f"{self.url_for(key)} changed while downloading (ended at byte "
                                       f"{f.tell()} of {size}): download it again")

        try:
            with open(tmp, "wb") as f:
                f.truncate(size)
            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(fetch, parts))
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        self._call(f"delete {self.url_for(key)}",
                   lambda: self.client.delete_object(Bucket=self.bucket, Key=self._k(key)))

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        def get() -> tuple[bytes, str]:
            r = self.client.get_object(Bucket=self.bucket, Key=self._k(key))
            return r["Body"].read(), str(r["ETag"])  # body and ETag of ONE response

        try:
            return self._call(f"get {self.url_for(key)}", get)
        except Exception as exc:
            if _s3_error_code(exc) in _MISSING:
                return None
            raise

    def put_if(self, key: str, data: bytes, *, token: str | None) -> str | None:
        # S3 conditional writes: If-None-Match: * (create) / If-Match: <ETag> (replace).
        cond = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            r = self._call(f"conditional put {self.url_for(key)}",
                           lambda: self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, **cond))
        except Exception as exc:
            # A retried PUT whose first attempt landed fails its own condition: callers re-read
            # and find their content there (publish and lease both check for that).
            if _s3_error_code(exc) in _CONDITION_FAILED | _MISSING:
                return None
            raise
        return str(r["ETag"])

    def delete_if(self, key: str, *, token: str) -> bool:
        try:
            self._call(f"conditional delete {self.url_for(key)}",
                       lambda: self.client.delete_object(Bucket=self.bucket, Key=self._k(key), IfMatch=token))
        except Exception as exc:
            if _s3_error_code(exc) in _CONDITION_FAILED | _MISSING:
                return False
            raise
        return True

    def open_range(self, key: str, start: int = 0, end: int | None = None, **kw: Any) -> RangeReader:
        bucket, k, name, settings = self.bucket, self._k(key), self.url_for(key), self.settings

        def opener(pos: int, stop: int | None) -> tuple[BinaryIO, int]:
            return _get_range(s3_client(settings), bucket, k, name, pos, stop)

        return RangeReader(name, opener, start, end, **kw)


#: 412 PreconditionFailed; 409 ConditionalRequestConflict when two conditional writes race.
_CONDITION_FAILED = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


def _s3_error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ``ClientError`` ("" for anything else)."""
    from botocore.exceptions import ClientError

    return str(exc.response.get("Error", {}).get("Code", "")) if isinstance(exc, ClientError) else ""


def _get_range(client: Any, bucket: str, key: str, name: str, pos: int, stop: int | None) -> tuple[BinaryIO, int]:
    """One ranged GET -> (streaming body, object size); a damaged response raises DamagedResponse."""
    from botocore.exceptions import ClientError

    rng = f"bytes={pos}-" if stop is None else f"bytes={pos}-{max(stop, pos + 1) - 1}"
    try:
        r = _parsed(f"get {name} {rng}", lambda: client.get_object(Bucket=bucket, Key=key, Range=rng))
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in {"NoSuchKey", "404"}:
            raise FileNotFoundError(f"no such shard/object: {name}") from exc
        if code in {"InvalidRange", "416"}:  # pos == object size: an empty tail
            return io.BytesIO(b""), pos
        raise
    try:
        total = _check_content_range(r, pos)
    except DamagedResponse:
        r["Body"].close()
        raise
    # botocore's StreamingBody, read in chunks (no whole-object buffering); a short body
    # raises IncompleteReadError, a reset ResponseStreamingError: both resume in the reader.
    return r["Body"], total


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


def _check_content_range(r: dict[str, Any], pos: int) -> int:
    """The object size from a ranged GET, after checking the headers belong together.

    A header block cut mid-way leaves headers missing or a number cut short; every such case
    fails one of these checks (start echoes the request, end < size, length = end - start + 1)
    or arrives without a body, which the reader treats as a short stream.
    """
    cr, length = r.get("ContentRange"), r.get("ContentLength")
    if cr is None:  # a server that ignored Range (200): the whole object, from byte 0
        if length is None or pos != 0:
            raise DamagedResponse(f"response without Content-Range (asked for byte {pos}) or Content-Length")
        return int(length)
    m = _CONTENT_RANGE.fullmatch(str(cr).strip())
    if m is None or length is None:
        raise DamagedResponse(f"Content-Range {cr!r} / Content-Length {length!r} incomplete")
    a, b, total = (int(g) for g in m.groups())
    if a != pos or not a <= b < total or int(length) != b - a + 1:
        raise DamagedResponse(f"Content-Range {cr!r} with Content-Length {length} does not answer byte {pos}")
    return total


def open_storage(url: str | os.PathLike[str], *, s3: S3Settings | None = None) -> Storage:
    """A :class:`Storage` for a local path, ``file://path`` or ``s3://bucket/prefix``.

    ``s3``: timeouts and request attempts for S3 (ignored for local paths).
    """
    s = str(url)
    if s.startswith("s3://"):
        return S3Storage(s, s3)
    if s.startswith("file://"):
        s = urlparse(s).path
    return LocalStorage(s)
