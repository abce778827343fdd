"""Where a checkpoint's files live and what makes one count: tags, the commit marker, the pointer.

Layout of `checkpoint_dir` (the same relative keys in a remote `CheckpointStore`):

    step{N}/                      DeepSpeed files (model/optimizer shards) written by all ranks
    step{N}/trainer_rank{R}.json  per-rank client state as JSON: step, loader cursor, RNG, config
    step{N}/complete.json         written by rank 0 after a barrier: the commit marker, with every
                                  file's size and sha256 (training.checkpoint.integrity)
    latest_complete.json          pointer {"tag", "step"} to the newest committed checkpoint

A checkpoint counts only once `complete.json` exists, and that file is written (temp file +
os.replace) after every rank has returned from saving, so a crash at any point during a
save leaves the previous checkpoint the newest complete one. DeepSpeed's own `latest` file
is not written or used.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

MARKER = "complete.json"
PROGRESS = "progress.json"  # training.faults: the step a run reached (not a checkpoint)
POINTER = "latest_complete.json"
SUPERSEDED = "superseded.json"  # a marker set aside by resuming an older step on purpose (commit.supersede_newer)
_TAG = re.compile(r"^step(\d+)$")

#: What a client-state file of an older vitscale was called (a pickle; never loaded now).
LEGACY_RANK_FILE = "trainer_rank{rank}.pt"


def tag_for(step: int) -> str:
    """Checkpoint tag of global step `step`."""
    return f"step{step}"


def step_of(tag: str) -> int | None:
    """Step number of a tag (None if the name is not a checkpoint tag)."""
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def rank_file(rank: int) -> str:
    return f"trainer_rank{rank}.json"


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same directory and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(tag_dir: str | Path) -> bool:
    return (Path(tag_dir) / MARKER).is_file()


def complete_tags(checkpoint_dir: str | Path) -> list[str]:
    """Committed checkpoint tags under `checkpoint_dir`, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if step_of(p.name) is not None and is_complete(p)]
    return sorted(tags, key=lambda t: step_of(t) or 0)


def latest_complete(checkpoint_dir: str | Path) -> str | None:
    """Tag of the newest committed checkpoint, or None."""
    tags = complete_tags(checkpoint_dir)
    return tags[-1] if tags else None
