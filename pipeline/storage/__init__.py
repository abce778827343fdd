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

Exactly two retry layers, each for failures the other cannot see, so attempts never multiply
(botocore per request, the RangeReader after botocore returned; see :mod:`.retry`).

One module per concern:

* :mod:`.retry`: which failures are retried and by whom, :class:`StorageError`;
* :mod:`.ranges`: :class:`RangeReader`;
* :mod:`.base`: the :class:`Storage` interface (incl. compare-and-swap) and ``url_join``;
* :mod:`.local`: :class:`LocalStorage` (atomic writes, ``flock``-serialised compare-and-swap);
* :mod:`.s3_client`: :class:`S3Settings` and the per-process boto3 client;
* :mod:`.s3`: :class:`S3Storage` (requests, ranged GETs and their checks, downloads).
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from .base import Storage, url_join
from .local import LocalStorage
from .ranges import CHUNK, RangeReader
from .retry import DEFAULT_RETRIES, DamagedResponse, StorageError
from .s3 import DOWNLOAD_PART, S3Storage
from .s3_client import S3Settings, s3_client

__all__ = ["CHUNK", "DEFAULT_RETRIES", "DOWNLOAD_PART", "DamagedResponse", "LocalStorage", "RangeReader",
           "S3Settings", "S3Storage", "Storage", "StorageError", "open_storage", "s3_client", "url_join"]


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
