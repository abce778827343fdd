"""Each rank's client state in a checkpoint (step, loader cursor, RNG streams, config) as JSON."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.checkpoint.integrity import CheckpointDamaged
from training.checkpoint.layout import LEGACY_RANK_FILE, atomic_write, rank_file


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) RNG states of this process, as JSON-able values
    (torch's byte states base64-encoded) so a checkpoint needs no pickle to hold them."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state` (also for its JSON round trip)."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def save_rank_state(tag_dir: str | Path, rank: int, state: dict[str, Any]) -> None:
    """This rank's client state (loader cursor, RNG, step, config) next to DeepSpeed's files,
    as JSON: loading it can never run code (see `load_rank_state`)."""
    atomic_write(Path(tag_dir) / rank_file(rank), json.dumps(state, allow_nan=True))


def load_rank_state(tag_dir: str | Path, rank: int) -> dict[str, Any]:
    """This rank's client state, parsed as JSON (no pickle)."""
    tag_dir = Path(tag_dir)
    path = tag_dir / rank_file(rank)
    if not path.is_file():
        if (tag_dir / LEGACY_RANK_FILE.format(rank=rank)).is_file():
            raise FileNotFoundError(
                f"{path} missing: checkpoint {tag_dir.name} was written by an older vitscale that pickled its "
                f"client state ({LEGACY_RANK_FILE.format(rank=rank)}); pickles are not loaded (they can run code). "
                "Start a fresh run, or resume from a checkpoint written by this version"
            )
        n = len(list(tag_dir.glob("trainer_rank*.json")))
        raise FileNotFoundError(
            f"{path} missing: checkpoint {tag_dir.name} was written by {n} ranks; resume with the "
            f"same world size (loader cursors are per rank)"
        )
    where = f"checkpoint {tag_dir.name} is damaged: {tag_dir.name}/{path.name}"
    try:
        state = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointDamaged(f"{where} is not valid JSON ({e})") from e
    missing = {"step", "loader", "rng", "config", "config_hash"} - set(state if isinstance(state, dict) else {})
    if missing:
        raise CheckpointDamaged(f"{where} lacks {sorted(missing)}")
    return state
