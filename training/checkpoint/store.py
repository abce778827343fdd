"""Remote mirrors of `checkpoint_dir`: the `CheckpointStore` protocol, a directory store, and
staging a remote checkpoint on a node."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Protocol, runtime_checkable

from training.checkpoint.layout import MARKER, atomic_write, step_of
from training.reshard import UNIVERSAL_SUFFIX


@runtime_checkable
class CheckpointStore(Protocol):
    """A remote mirror of `checkpoint_dir` (e.g. an S3 prefix; orchestration provides one).

    Keys are relative, '/'-separated: `"step100/trainer_rank0.json"`.
    """

    def upload_dir(self, local_dir: str, remote_key_prefix: str) -> None:
        """Upload every file under `local_dir` to `remote_key_prefix/<relative path>`."""
        ...

    def download_dir(self, prefix: str, local_dir: str) -> None:
        """Download every key under `prefix/` into `local_dir/<relative path>`."""
        ...

    def list_dirs(self) -> list[str]:
        """Top-level 'directory' names (e.g. ['step100', 'step200'])."""
        ...

    def read_text(self, key: str) -> str | None:
        """Contents of `key`, or None if it does not exist."""
        ...

    def write_text(self, key: str, text: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under `prefix/`."""
        ...

    def delete(self, key: str) -> None:
        """Delete one key (no error if it does not exist)."""
        ...


class LocalDirStore:
    """CheckpointStore on a local/shared directory (tests, NFS mirrors)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def upload_dir(self, local_dir: str, remote_key_prefix: str) -> None:
        dst = self.root / remote_key_prefix
        for src in Path(local_dir).rglob("*"):
            if src.is_file():
                out = dst / src.relative_to(local_dir)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)

    def download_dir(self, prefix: str, local_dir: str) -> None:
        src_root = self.root / prefix
        for src in src_root.rglob("*"):
            if src.is_file():
                out = Path(local_dir) / src.relative_to(src_root)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)

    def list_dirs(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def read_text(self, key: str) -> str | None:
        p = self.root / key
        return p.read_text() if p.is_file() else None

    def write_text(self, key: str, text: str) -> None:
        atomic_write(self.root / key, text)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.root / prefix, ignore_errors=True)

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)


def remote_tags(store: CheckpointStore, names: list[str] | None = None) -> list[str]:
    """Committed checkpoint tags in a remote store (among `names`, its top-level names), oldest first."""
    names = store.list_dirs() if names is None else names
    tags = [n for n in names if step_of(n) is not None and safe_read(store, f"{n}/{MARKER}") is not None]
    return sorted(tags, key=lambda t: step_of(t) or 0)


def latest_remote(store: CheckpointStore) -> str | None:
    """Tag of the newest committed checkpoint in a remote store, or None."""
    tags = remote_tags(store)
    return tags[-1] if tags else None


def safe_read(store: CheckpointStore, key: str) -> str | None:
    try:
        return store.read_text(key)
    except (FileNotFoundError, KeyError):
        return None


def stage_from_store(store: CheckpointStore, tag: str, checkpoint_dir: str | Path) -> Path:
    """Download `tag` from `store` into `checkpoint_dir/tag` so that it appears complete only
    once every file is there: files go to a private temp folder, the marker is fetched last,
    then the folder is renamed into place (replacing any earlier copy of the tag).

    One process per node calls this (node-local rank 0); the others wait on a collective.
    """
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(".staging-*"):  # a download killed mid-way, by any earlier attempt
        shutil.rmtree(old, ignore_errors=True)
    marker = store.read_text(f"{tag}/{MARKER}")
    if marker is None:
        raise FileNotFoundError(f"checkpoint {tag} in {store!r} has no {MARKER}: it is not complete (pruned or "
                                "a crashed save); resume from another checkpoint")
    tmp = root / f".staging-{tag}-{uuid.uuid4().hex[:8]}"
    try:
        store.download_dir(tag, str(tmp))
        (tmp / MARKER).unlink(missing_ok=True)  # downloaded with the rest, maybe first: rewrite it last
        atomic_write(tmp / MARKER, marker)
        dst = root / tag
        if dst.exists():
            shutil.rmtree(dst)
        shutil.rmtree(root / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)  # converted from the old copy
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / tag
