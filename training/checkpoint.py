"""Checkpoints: DeepSpeed engine state + per-rank trainer state, committed atomically.

Layout of `checkpoint_dir` (the same relative keys in a remote `CheckpointStore`):

    step{N}/                      DeepSpeed files (model/optimizer shards) written by all ranks
    step{N}/trainer_rank{R}.pt    per-rank client state: step, loader cursor, RNG, config
    step{N}/complete.json         written by rank 0 after a barrier: the commit marker
    latest_complete.json          pointer {"tag", "step"} to the newest committed checkpoint

A checkpoint counts only once `complete.json` exists, and that file is written (temp file +
os.replace) after every rank has returned from saving, so a crash at any point during a
save leaves the previous checkpoint the newest complete one. DeepSpeed's own `latest` file
is not written or used.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

MARKER = "complete.json"
POINTER = "latest_complete.json"
_TAG = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    """Checkpoint tag of global step `step`."""
    return f"step{step}"


def step_of(tag: str) -> int | None:
    """Step number of a tag (None if the name is not a checkpoint tag)."""
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def rank_file(rank: int) -> str:
    return f"trainer_rank{rank}.pt"


@runtime_checkable
class CheckpointStore(Protocol):
    """A remote mirror of `checkpoint_dir` (e.g. an S3 prefix; orchestration provides one).

    Keys are relative, '/'-separated: `"step100/trainer_rank0.pt"`.
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
        _atomic_write(self.root / key, text)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.root / prefix, ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
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


def latest_remote(store: CheckpointStore) -> str | None:
    """Tag of the newest committed checkpoint in a remote store, or None."""
    tags = []
    for name in store.list_dirs():
        if step_of(name) is not None and _safe_read(store, f"{name}/{MARKER}") is not None:
            tags.append(name)
    return max(tags, key=lambda t: step_of(t) or 0) if tags else None


def _safe_read(store: CheckpointStore, key: str) -> str | None:
    try:
        return store.read_text(key)
    except (FileNotFoundError, KeyError):
        return None


def prepare_tag_dir(checkpoint_dir: str | Path, tag: str) -> None:
    """Rank 0, before a save: un-commit and clear a previous attempt at the same tag."""
    tag_dir = Path(checkpoint_dir) / tag
    if tag_dir.exists():
        (tag_dir / MARKER).unlink(missing_ok=True)
        shutil.rmtree(tag_dir)


def commit(checkpoint_dir: str | Path, tag: str, step: int, world_size: int) -> None:
    """Rank 0, after a barrier following every rank's save: write the marker and the pointer."""
    root = Path(checkpoint_dir)
    info = json.dumps({"tag": tag, "step": step, "world_size": world_size})
    _atomic_write(root / tag / MARKER, info)
    _atomic_write(root / POINTER, info)


def prune(checkpoint_dir: str | Path, keep: int, store: CheckpointStore | None = None) -> list[str]:
    """Rank 0: delete all but the newest `keep` committed checkpoints, and any uncommitted
    directory older than the newest committed one (a crashed save). Returns deleted tags."""
    root = Path(checkpoint_dir)
    complete = complete_tags(root)
    newest = step_of(complete[-1]) if complete else None
    doomed = complete[:-keep] if keep < len(complete) else []
    if newest is not None:
        for p in root.iterdir():
            s = step_of(p.name)
            if s is not None and s < newest and not is_complete(p):
                doomed.append(p.name)
    for tag in doomed:
        shutil.rmtree(root / tag, ignore_errors=True)
        if store is not None:
            store.delete_prefix(tag)
    return doomed


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) RNG states of this process."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_state(tag_dir: str | Path, rank: int, state: dict[str, Any]) -> None:
    """This rank's client state (loader cursor, RNG, step, config) next to DeepSpeed's files."""
    path = Path(tag_dir) / rank_file(rank)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_rank_state(tag_dir: str | Path, rank: int) -> dict[str, Any]:
    path = Path(tag_dir) / rank_file(rank)
    if not path.is_file():
        n = len(list(Path(tag_dir).glob("trainer_rank*.pt")))
        raise FileNotFoundError(
            f"{path} missing: checkpoint {Path(tag_dir).name} was written by {n} ranks; resume with the "
            f"same world size (loader cursors are per rank)"
        )
    # weights_only=False: numpy's RNG state is a tuple holding an ndarray. The file is ours.
    return torch.load(path, map_location="cpu", weights_only=False)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_weights(
    engine_or_model: Any, path: str | Path, dtype: str = "fp32", metadata: dict[str, str] | None = None
) -> Path | None:
    """Write consolidated weights as safetensors (param names as in `model.named_parameters()`).

    Accepts a plain nn.Module or a DeepSpeed engine; under ZeRO-3 the partitioned parameters
    are gathered first, so every rank must call this (collective). Rank 0 writes the file and
    gets its path; other ranks get None. `dtype` is "fp32", "bf16" or "fp16".
    """
    from safetensors.torch import save_file

    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {list(_DTYPES)}")
    torch_dtype = _DTYPES[dtype]
    module: nn.Module = getattr(engine_or_model, "module", engine_or_model)
    stage = engine_or_model.zero_optimization_stage() if hasattr(engine_or_model, "zero_optimization_stage") else 0
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch_dtype).contiguous().clone() for k, v in module.state_dict().items()}

    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            sd = snapshot() if rank == 0 else {}
    else:
        sd = snapshot() if rank == 0 else {}
    if rank != 0:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "dtype": dtype, **(metadata or {})}
    save_file(sd, str(path), metadata={k: str(v) for k, v in meta.items()})
    return path
