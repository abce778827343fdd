"""``LocalStorage``: a local directory (plain path or ``file://``) behind the Storage interface.

Writes are atomic (a temporary file, then ``os.replace``); the compare-and-swap of
:class:`~pipeline.storage.base.Storage` is serialised between processes with ``flock``, and its
token is the content's sha256.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .base import Storage
from .ranges import RangeReader


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
