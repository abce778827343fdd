"""Committing a checkpoint and retiring old ones: what rank 0 does before and after every rank saved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from training.checkpoint.layout import (
    MARKER,
    POINTER,
    SUPERSEDED,
    atomic_write,
    complete_tags,
    step_of,
    tag_for,
)
from training.checkpoint.store import CheckpointStore, remote_tags
from training.reshard import UNIVERSAL_SUFFIX


def prepare_tag_dir(checkpoint_dir: str | Path, tag: str, store: CheckpointStore | None = None) -> None:
    """Rank 0, before a save: un-commit and clear a previous attempt at the same tag (in the
    store too: files of an older attempt left there would not be in the new manifest)."""
    tag_dir = Path(checkpoint_dir) / tag
    if tag_dir.exists():
        (tag_dir / MARKER).unlink(missing_ok=True)
        shutil.rmtree(tag_dir)
    shutil.rmtree(Path(checkpoint_dir) / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)  # converted from the old one
    if store is not None:
        store.delete_prefix(tag)  # listed in key order: complete.json, if any, goes first


def commit(checkpoint_dir: str | Path, tag: str, step: int, world_size: int,
           files: dict[str, dict[str, Any]] | None = None) -> None:
    """Rank 0, after a barrier following every rank's save: write the marker (with `files`,
    every file's size and sha256: training.checkpoint.integrity) and the pointer."""
    root = Path(checkpoint_dir)
    info = {"tag": tag, "step": step, "world_size": world_size}
    atomic_write(root / tag / MARKER, json.dumps(info if files is None else {**info, "files": files}))
    atomic_write(root / POINTER, json.dumps(info))


def supersede_newer(store: CheckpointStore, step: int) -> list[str]:
    """Un-commit every checkpoint newer than `step`, on purpose resumed from; returns their tags.

    Training from an older step starts a new history: a later `resume="auto"` (a restart, the
    next `--resume auto`) must continue it, not jump to a checkpoint of the abandoned one. Each
    newer marker is set aside as `superseded.json` (rename it back to `complete.json` to use that
    checkpoint again); the files stay until retention or a save of the same step replaces them.
    """
    tags = remote_tags(store)
    tag = tag_for(step)
    if tag not in tags:
        raise FileNotFoundError(f"no committed checkpoint {tag} in {store!r}: the committed ones are "
                                f"{', '.join(tags) or 'none'}; resume one of those steps, or 'auto'")
    newer = [t for t in tags if (step_of(t) or 0) > step]
    for t in newer:
        marker = store.read_text(f"{t}/{MARKER}")
        if marker is not None:
            store.write_text(f"{t}/{SUPERSEDED}", marker)  # first: a crash in between leaves it committed
            store.delete(f"{t}/{MARKER}")
    info = json.loads(store.read_text(f"{tag}/{MARKER}") or "{}")
    store.write_text(POINTER, json.dumps({k: info[k] for k in ("tag", "step", "world_size") if k in info}))
    return newer


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
