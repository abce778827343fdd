"""Loading DeepSpeed's .pt files without running code.

Anyone who can write run storage could otherwise run code in every worker: DeepSpeed's `.pt`
files are read with `torch.load(weights_only=True)` and the allow-list in `_safe_globals` (see
`safe_torch_load`, installed into the engine by `install_safe_loader`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from training.checkpoint.integrity import CheckpointDamaged


def _safe_globals() -> list[Any]:
    """Classes DeepSpeed 0.19 pickles into its optimizer-state files, beyond torch's defaults.

    Each is rebuilt by the weights_only unpickler without calling code of the file's choosing:
    the loss scalers are plain attribute holders (`__new__` + `__dict__` update, no
    `__setstate__`), `ZeroStageEnum` is an int Enum (looked up by value), `fragment_address` a
    two-int dataclass. Found by `torch.serialization.get_unsafe_globals_in_checkpoint` over
    ZeRO 0-3 x fp32/bf16 x adamw/sgd checkpoints; fp16 (GPU) adds the dynamic loss scaler.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds a pickled object outside the allow-list (it is not loaded)."""


def safe_torch_load(path: str | Path, map_location: Any = "cpu", *, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` with `_safe_globals()` allowed: tensors, containers,
    numbers, strings and the listed DeepSpeed classes; anything else is refused, not run."""
    import pickle

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it needs a pickled object outside the allow-list, which could run "
            f"code ({str(e).splitlines()[0]}). The file was not written by this Trainer or was tampered "
            "with: resume from another checkpoint. If a new DeepSpeed version writes a new class here, "
            "check that rebuilding it runs no code and add it to training.checkpoint.safe_load._safe_globals"
        ) from e


def scan_checkpoint(tag_dir: str | Path) -> int:
    """Check every `.pt` file of a checkpoint with the safe loader (memory-mapped, so only the
    pickle part is read); raises UnsafeCheckpointError on the first bad one, CheckpointDamaged
    on one that cannot be read at all (truncated, not a torch file). Returns the count.

    Done before DeepSpeed loads anything, so a tampered file fails every rank at the same
    agreement point instead of one rank raising inside DeepSpeed's collective load.
    """
    import zipfile

    tag_dir = Path(tag_dir)
    files = sorted(tag_dir.rglob("*.pt"))
    for f in files:
        try:
            safe_torch_load(f, mmap=zipfile.is_zipfile(f))  # torch can mmap only its zip format
        except UnsafeCheckpointError:
            raise
        except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise CheckpointDamaged(f"checkpoint {tag_dir.name} is damaged: {tag_dir.name}/"
                                    f"{f.relative_to(tag_dir).as_posix()} cannot be read ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from e
    return len(files)


def install_safe_loader(engine: Any) -> None:
    """Make DeepSpeed's checkpoint engine load through `safe_torch_load`.

    DeepSpeed 0.19.8's `TorchCheckpointEngine.load` calls `torch.load(weights_only=False)` with
    no option to change it; every file `engine.load_checkpoint` reads (model states, ZeRO
    optimizer shards; universal checkpoints, which we never write, excepted) goes through
    `engine.checkpoint_engine.load`. We replace that method on this engine's instance only.
    Self-check: any other checkpoint engine is left alone and `assert_safe_loader` refuses to
    load with it.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce) is TorchCheckpointEngine:

        def load(path: str, map_location: Any = None) -> Any:
            return safe_torch_load(path, map_location=map_location)

        load.vitscale_safe = True  # type: ignore[attr-defined]
        ce.load = load  # type: ignore[method-assign]


def assert_safe_loader(engine: Any) -> None:
    """Refuse to let DeepSpeed load a checkpoint unless `install_safe_loader` took effect."""
    ce = getattr(engine, "checkpoint_engine", None)
    if not getattr(getattr(ce, "load", None), "vitscale_safe", False):
        raise RuntimeError(
            f"refusing to load a checkpoint: DeepSpeed's checkpoint engine is {type(ce).__name__}, not the "
            "TorchCheckpointEngine whose load this project replaces with a weights_only=True loader, so it "
            "could unpickle arbitrary objects. Remove the 'checkpoint' writer / datastates settings from the "
            "DeepSpeed config, or teach training.checkpoint.safe_load.install_safe_loader about this engine"
        )

