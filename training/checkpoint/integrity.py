"""Checksums of a checkpoint's files: recorded at commit, checked before anything is loaded.

`complete.json` lists every file of the checkpoint, written by any rank on any node, with its
size and sha256 (`"files": {"zero_pp_rank_0_mp_rank_00_optim_states.pt": {"size", "sha256"}}`).
Each rank hashes the files it wrote itself (DeepSpeed's, seen through `SaveRecorder`, and its
client state) right after writing them, on the node that wrote them, so a checkpoint uploaded
from many nodes into a store is described whole before any upload; rank 0 merges the lists
at commit. Before a resume, the copy each node is about to load (staged from the store, or the
shared folder) is checked against the list: a missing, truncated, changed or unexpected file
raises `CheckpointDamaged` naming the file and what is wrong, and the run falls back to the
newest intact checkpoint (`training.checkpoint.manager`). `torch.load` does not check its zip
CRCs, so without this a flipped bit in the fp32 master weights loads silently.

A checkpoint committed before checksums existed has no `"files"`: it is loaded with a warning
(`manifest_of` returns None), its pickles still go through the safe loader's scan.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from training.checkpoint.layout import MARKER, SUPERSEDED

#: At most this many files are hashed at once (hashlib releases the GIL on large reads).
HASH_THREADS = 8
#: Files in a damage report before "... and N more".
_SHOWN = 5


class CheckpointDamaged(ValueError):
    """A committed checkpoint's files do not match its `complete.json`, or cannot be read."""


def file_entry(path: Path) -> dict[str, Any]:
    """`{"size", "sha256"}` of one file."""
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": digest}


def describe(tag_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each of `names` (paths relative to `tag_dir`), hashed in parallel."""
    names = sorted(set(names))
    with ThreadPoolExecutor(max_workers=max(1, min(HASH_THREADS, len(names)))) as pool:
        entries = list(pool.map(lambda n: file_entry(tag_dir / n), names))
    return dict(zip(names, entries, strict=True))


def merge(per_rank: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every rank's file entries as one manifest; two ranks that wrote one path must agree."""
    files: dict[str, dict[str, Any]] = {}
    for rank, entries in enumerate(per_rank):
        for name, entry in entries.items():
            if files.setdefault(name, entry) != entry:
                raise RuntimeError(f"two ranks wrote checkpoint file {name} with different contents (rank {rank}: "
                                   f"{entry}, an earlier rank: {files[name]}); give each rank its own file names "
                                   "(DeepSpeed's use_node_local_storage is not supported)")
    return files


def read_marker(tag_dir: Path) -> dict[str, Any]:
    """The parsed `complete.json` of a committed checkpoint (damaged: CheckpointDamaged)."""
    path = tag_dir / MARKER
    try:
        marker = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointDamaged(f"checkpoint {tag_dir.name} is damaged: {tag_dir.name}/{MARKER} is not valid "
                                f"JSON ({e})") from e
    if not isinstance(marker, dict):
        raise CheckpointDamaged(f"checkpoint {tag_dir.name} is damaged: {tag_dir.name}/{MARKER} is not a JSON object")
    return marker


def manifest_of(marker: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The `"files"` of a marker, or None for a checkpoint committed before checksums existed."""
    files = marker.get("files")
    return files if isinstance(files, dict) else None


def verify(tag_dir: Path, files: dict[str, dict[str, Any]]) -> None:
    """Check every file of `tag_dir` against `files` (sizes first: a truncated file is not
    hashed); raise CheckpointDamaged listing each problem, file by file."""
    tag = tag_dir.name
    problems: list[str] = []
    to_hash: list[str] = []
    for name, want in sorted(files.items()):
        path = tag_dir / name
        if not path.is_file():
            problems.append(f"{tag}/{name}: missing ({want['size']} bytes recorded at commit)")
        elif (size := path.stat().st_size) != want["size"]:
            cut = "truncated" if size < want["size"] else "longer than written"
            problems.append(f"{tag}/{name}: {size} bytes, {want['size']} recorded at commit ({cut})")
        else:
            to_hash.append(name)
    for name, got in describe(tag_dir, to_hash).items() if to_hash else ():
        if got["sha256"] != files[name]["sha256"]:
            problems.append(f"{tag}/{name}: sha256 {got['sha256'][:12]}... differs from the {files[name]['sha256'][:12]}... "
                            f"recorded at commit (same size: its contents changed)")
    for path in sorted(tag_dir.rglob("*")):
        name = path.relative_to(tag_dir).as_posix()
        if path.is_file() and not path.name.startswith(".") and name not in files and name not in (MARKER, SUPERSEDED):
            problems.append(f"{tag}/{name}: not part of the checkpoint (not in {MARKER}); DeepSpeed could load it")
    if problems:
        more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise CheckpointDamaged(f"checkpoint {tag} is damaged: " + "; ".join(problems[:_SHOWN]) + more)


class SaveRecorder:
    """The files this rank's DeepSpeed engine writes in one `save_checkpoint`.

    DeepSpeed 0.19 writes every checkpoint file through `engine.checkpoint_engine.save(state_dict,
    path)`; that method is wrapped on this engine's instance to note the path (nothing else
    changes). Self-check: an engine without it cannot be described, and saving is refused.
    """

    def __init__(self, engine: Any) -> None:
        ce = getattr(engine, "checkpoint_engine", None)
        real = getattr(ce, "save", None)
        if not callable(real):
            raise RuntimeError(f"DeepSpeed's checkpoint engine {type(ce).__name__} has no save(state_dict, path) to "
                               "record checkpoint files through; checkpoints could not be checksummed. Use DeepSpeed "
                               "0.19's TorchCheckpointEngine (no 'checkpoint' writer settings in the DeepSpeed config)")
        self.paths: list[str] = []

        def save(state_dict: Any, path: str) -> Any:
            out = real(state_dict, path)
            self.paths.append(os.fspath(path))
            return out

        ce.save = save

    def written_in(self, tag_dir: Path) -> list[str]:
        """Paths recorded since the last call, relative to `tag_dir` (then forgotten)."""
        paths, self.paths = self.paths, []
        base = tag_dir.resolve()
        out = []
        for p in paths:
            rel = Path(p).resolve()
            if not rel.is_relative_to(base):
                raise RuntimeError(f"DeepSpeed wrote checkpoint file {p} outside the checkpoint folder {tag_dir}; "
                                   "it could not be part of the checkpoint")
            out.append(rel.relative_to(base).as_posix())
        return out
