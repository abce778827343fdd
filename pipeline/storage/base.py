"""The :class:`Storage` interface every backend implements, and ``url_join``.

Keys are ``/``-separated and relative to the storage's root URL. Besides plain object reads and
writes, the interface has one compare-and-swap of a small object (``read_versioned``,
``put_if``, ``delete_if``): the one mechanism behind publishing a dataset version and holding a
run's lease. Backends: :mod:`pipeline.storage.local`, :mod:`pipeline.storage.s3`.
"""

from __future__ import annotations

import os
from typing import Any

from .ranges import RangeReader


def url_join(url: str, *parts: str) -> str:
    """Join path parts onto a local path, ``file://`` or ``s3://`` URL with single slashes."""
    out = url.rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}" if out else p
    return out


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
