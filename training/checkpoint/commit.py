"""Committing a checkpoint and retiring old ones: what rank 0 does before and after every rank saved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from training.checkpoint.layout import MARKER, POINTER, atomic_write, complete_tags, step_of
from training.checkpoint.store import CheckpointStore, remote_tags
from training.reshard import UNIVERSAL_SUFFIX


def prepare_tag_dir(checkpoint_dir: str | Path, tag: str) -> None:
    """Rank 0, before a save: un-commit and clear a previous attempt at the same tag."""
    tag_dir = Path(checkpoint_dir) / tag
    if tag_dir.exists():
        (tag_dir / MARKER).unlink(missing_ok=True)
        shutil.rmtree(tag_dir)
    shutil.rmtree(Path(checkpoint_dir) / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)  # converted from the old one


def commit(checkpoint_dir: str | Path, tag: str, step: int, world_size: int) -> None:
    """Rank 0, after a barrier following every rank's save: write the marker and the pointer."""
    root = Path(checkpoint_dir)
    info = json.dumps({"tag": tag, "step": step, "world_size": world_size})
    atomic_write(root / tag / MARKER, info)
    atomic_write(root / POINTER, info)


def prune(checkpoint_dir: str | Path, keep: int, store: CheckpointStore | None = None) -> list[str]:
    """Rank 0: delete all but the newest `keep` committed checkpoints, and any uncommitted
    directory older than the newest committed one (a crashed save). Returns deleted tags.

    With a store, the store says what is committed: this node's staging folder may hold tags
    without a marker that are committed all the same (only rank 0's node writes the marker
    locally; a later rank 0 on another node sees just its own ranks' files there).
    """
    root = Path(checkpoint_dir)
    local = [p.name for p in root.iterdir()] if root.is_dir() else []
    if store is None:
        complete, names = complete_tags(root), local
    else:
        remote = store.list_dirs()
        complete, names = remote_tags(store, remote), sorted(set(remote) | set(local))
    newest = step_of(complete[-1]) if complete else None
    doomed = complete[:-keep] if keep < len(complete) else []
    if newest is not None:
        committed = set(complete)
        doomed += [n for n in names if (s := step_of(n)) is not None and s < newest and n not in committed]
    for tag in doomed:
        shutil.rmtree(root / tag, ignore_errors=True)
        shutil.rmtree(root / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)
        if store is not None:
            store.delete_prefix(tag)
    return doomed
