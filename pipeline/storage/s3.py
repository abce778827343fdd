"""``S3Storage``: ``s3://bucket/prefix`` behind the Storage interface, through boto3.

Every request runs on the process's client (:mod:`pipeline.storage.s3_client`), whose botocore
retries own request failures; what botocore accepted but is damaged is retried here
(:meth:`S3Storage._call`) or in the :class:`~pipeline.storage.ranges.RangeReader`. A ranged GET
checks that ``Content-Range`` and ``Content-Length`` answer the byte asked for. Downloads go
through the same reader (no s3transfer download retries on top), and ``size``/``exists`` read
one byte through it: a byte of body proves the headers were complete, which a ``HEAD`` cannot.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from .base import Storage, url_join
from .ranges import CHUNK, RangeReader
from .retry import DEFAULT_RETRIES, DamagedResponse, StorageError, _parsed, _retryable
from .s3_client import S3Settings, s3_client

log = logging.getLogger(__name__)

#: Objects above this size download as parallel ranges of this size (one reader each).
DOWNLOAD_PART = 32 << 20


def _split_s3(url: str) -> tuple[str, str]:
    u = urlparse(url)
    if u.scheme != "s3" or not u.netloc:
        raise ValueError(f"not an s3:// URL: {url!r} (expected s3://bucket/prefix)")
    return u.netloc, u.path.strip("/")



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
        from botocore.exceptions import ClientError

        try:
            self._call(f"head bucket s3://{self.bucket}", lambda: self.client.head_bucket(Bucket=self.bucket))
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

