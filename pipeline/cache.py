"""A node-local cache of immutable metadata files, keyed by their sha256: one download per node.

Every rank of a job reads the same few metadata files of a dataset version (``index.parquet``,
``classes.json``) before its first batch. On an 8-GPU node that is 8 identical downloads; with
this cache it is one. A file is stored under its content hash (recorded in the manifest), so a
new version never sees an old file, and nothing is ever invalidated.

Concurrency: the first rank to want a file takes an ``flock`` on ``{sha256}.lock``, downloads,
checks and writes it as ``.{sha256}.tmp{pid}`` then renames it into place (atomic); the others
wait on the lock (at most ``wait_s``, then they download on their own) and read the file. A
file read from the cache is checked against its sha256 again (a damaged one is removed and
fetched anew), so the cache never weakens the integrity chain. The folder is
``$TMPDIR/vitscale-meta-{euid}`` (0700, :func:`pipeline.scratch.private_dir`); delete it freely.
Only O(shards) files go here: a shard's rows file is read when the shard is opened, not cached.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .scratch import private_dir

log = logging.getLogger(__name__)

#: How long a rank waits for another rank of its node to finish downloading a file.
WAIT_S = 600.0


class ContentCache:
    """Files by sha256 in one local folder; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def default(cls) -> ContentCache:
        return cls(private_dir("vitscale-meta", "the node's cache of dataset metadata"))

    def _path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256

    def get(self, sha256: str) -> bytes | None:
        """The cached bytes of ``sha256`` if present and intact (a damaged copy is removed)."""
        path = self._path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() == sha256:
            return data
        log.warning("metadata cache: %s is damaged; removing it and downloading again", path)
        path.unlink(missing_ok=True)
        return None

    def put(self, sha256: str, data: bytes) -> None:
        path = self._path(sha256)
        tmp = path.with_name(f".{sha256}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: a concurrent reader sees no file or the whole file

    def fetch(self, sha256: str, download: Callable[[], bytes], *, wait_s: float = WAIT_S) -> bytes:
        """The bytes of ``sha256``: from the cache, else ``download()`` (by one rank of the node).

        ``download`` must return bytes already checked against ``sha256`` (or raise).
        """
        hit = self.get(sha256)
        if hit is not None:
            return hit
        with self._lock(sha256, wait_s) as locked:
            hit = self.get(sha256)  # another rank downloaded it while we waited
            if hit is not None:
                return hit
            data = download()
            if locked:
                self.put(sha256, data)
            log.info("metadata cache: downloaded %s (%d bytes)", sha256[:12], len(data))
            return data

    @contextlib.contextmanager
    def _lock(self, sha256: str, wait_s: float) -> Iterator[bool]:
        """Hold ``{sha256}.lock``; yields False (no lock: download without caching) after ``wait_s``."""
        fd = os.open(self.root / f"{sha256}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        log.warning("metadata cache: another process has held %s.lock for over %.0fs; downloading "
                                    "without the cache", sha256[:12], wait_s)
                        yield False
                        return
                    time.sleep(0.05)
            yield True
        finally:
            os.close(fd)  # also releases the lock
