"""A ``training.checkpoint.CheckpointStore`` on ``pipeline.storage`` (S3, MinIO, moto, or a path).

``training`` must not import boto3, so orchestration hands the Trainer this object: it mirrors
the local checkpoint directory to ``<url>/<relative key>`` and back. Used by Ray workers so a
restarted (or re-scheduled) worker group resumes from the newest *complete* checkpoint even
when it lands on another node.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from pipeline.storage import LocalStorage, Storage, open_storage

log = logging.getLogger(__name__)


class StorageCheckpointStore:
    """CheckpointStore rooted at ``url`` (``s3://bucket/prefix``, ``file://...`` or a local path)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._storage: Storage | None = None

    @property
    def storage(self) -> Storage:
        # Lazily: the object is pickled into Ray workers, boto3 clients are not picklable.
        if self._storage is None:
            self._storage = open_storage(self.url)
        return self._storage

    def __getstate__(self) -> dict[str, str]:
        return {"url": self.url}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.url = state["url"]
        self._storage = None

    def __repr__(self) -> str:
        return f"StorageCheckpointStore({self.url!r})"

    def upload_dir(self, local_dir: str, remote_key_prefix: str) -> None:
        """Upload every file under ``local_dir`` to ``<remote_key_prefix>/<relative path>``."""
        root = Path(local_dir)
        prefix = remote_key_prefix.strip("/")
        for path in sorted(root.rglob("*")):
            if path.is_file():
                rel = path.relative_to(root).as_posix()
                self.storage.upload_file(path, f"{prefix}/{rel}" if prefix else rel)

    def download_dir(self, prefix: str, local_dir: str) -> None:
        """Download every key under ``<prefix>/`` into ``local_dir/<relative path>``."""
        prefix = prefix.strip("/") + "/"
        out = Path(local_dir)
        for key in self.storage.list(prefix):
            dst = out / key[len(prefix) :]
            dst.parent.mkdir(parents=True, exist_ok=True)
            self.storage.download_file(key, dst)

    def list_dirs(self) -> list[str]:
        """Top-level 'directory' names, e.g. ``["step100", "step200"]``."""
        return sorted({k.split("/", 1)[0] for k in self.storage.list("") if "/" in k})

    def read_text(self, key: str) -> str | None:
        """Contents of ``key``, or None if it does not exist."""
        try:
            if not self.storage.exists(key):
                return None
            return self.storage.read_bytes(key).decode()
        except FileNotFoundError:
            return None

    def write_text(self, key: str, text: str) -> None:
        self.storage.write_bytes(key, text.encode())

    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under ``<prefix>/``."""
        prefix = prefix.strip("/") + "/"
        for key in self.storage.list(prefix):
            self.storage.delete(key)

    def delete(self, key: str) -> None:
        """Delete ``key`` (no error if it does not exist)."""
        self.storage.delete(key)


def rewind_checkpoints(url: str, step: int) -> list[str]:
    """Make checkpoint ``step`` at ``url`` the newest committed one, before a launch resumes it
    (``--resume STEP``): newer ones are set aside (:func:`training.checkpoint.supersede_newer`),
    so the workers, and every restart of them, resume "auto" from it. Returns the set-aside tags;
    FileNotFoundError names the committed steps when ``step`` is not one of them."""
    from training.checkpoint import supersede_newer

    newer = supersede_newer(StorageCheckpointStore(url), step)
    if newer:
        log.warning("resuming checkpoint step%d of %s: newer checkpoint(s) %s set aside (their complete.json is "
                    "renamed superseded.json; rename it back to resume one of them)", step, url, ", ".join(newer))
    return newer


def local_path(url: str) -> str:
    """A local path or ``file://`` URL as a plain path, parsed as ``pipeline.storage`` parses it."""
    storage = open_storage(url)
    if not isinstance(storage, LocalStorage):
        raise ValueError(f"{url} is not a local path or file:// URL")
    return str(storage.root)


def checkpoint_location(url: str, key: str) -> tuple[str, StorageCheckpointStore | None]:
    """(local checkpoint_dir, CheckpointStore or None) for checkpoints kept at ``url``.

    On ``s3://`` the Trainer stages checkpoints in ``<tmp>/vitscale-ckpt/<key>`` and the store
    mirrors them to ``url``; on a path (shared by every node) it writes there directly.
    """
    if url.startswith("s3://"):
        return str(Path(tempfile.gettempdir()) / "vitscale-ckpt" / key), StorageCheckpointStore(url)
    return local_path(url), None


def fetch(url: str, local: Path) -> Path:
    """Copy a path / file:// / s3:// object to ``local`` (or return the path itself)."""
    if url.startswith("s3://"):
        parent, name = url.rsplit("/", 1)
        open_storage(parent).download_file(name, local)
        return local
    return Path(local_path(url))


def read_run_file(run_dir: str, key: str) -> bytes | None:
    """Bytes of ``<run_dir>/<key>`` or None."""
    store = open_storage(run_dir)
    return store.read_bytes(key) if store.exists(key) else None


def delete_tree(url: str, local_dir: str = "") -> None:
    """Remove everything under ``url`` (path or s3://) and a local staging folder."""
    if local_dir:
        shutil.rmtree(local_dir, ignore_errors=True)
    if url.startswith("s3://"):
        st = open_storage(url)
        for k in st.list(""):
            st.delete(k)
    else:
        shutil.rmtree(local_path(url), ignore_errors=True)
