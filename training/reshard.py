"""Resuming ZeRO state at another world size, with DeepSpeed's universal checkpoints.

ZeRO 1/2/3 files hold one flat partition of the fp32 weights and Adam moments per rank, so a
checkpoint written by N ranks cannot be loaded by M != N as it is (DeepSpeed refuses:
"Automatic adjustment of ZeRO's optimizer state partitioning ... is not supported"). DeepSpeed
0.19's own answer is the universal checkpoint: `deepspeed.checkpoint.ds_to_universal` merges
the partitions into one folder per parameter (`zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`), and
an engine whose config has `checkpoint.load_universal` re-partitions them for its own world.

`to_universal` converts a checked, staged checkpoint on the node that loads it (each node's
local rank 0; written to a temp folder and renamed into place, so a half-done conversion is
never used). `load_universal` switches an existing engine to the universal loader for one
`load_checkpoint` call: the flag is read from `engine._config` (a private attribute, so it
is self-checked: an engine without it gets a clear error instead of a silent wrong load).
The input files were scanned by the safe loader before conversion, and the converted files
are written by this process, so DeepSpeed's plain `torch.load` of them reads nothing foreign.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

#: Suffix of the converted copy of a tag, next to the tag (`step8` -> `step8.universal`).
UNIVERSAL_SUFFIX = ".universal"


def universal_dir(tag_dir: Path) -> Path:
    return tag_dir.parent / f"{tag_dir.name}{UNIVERSAL_SUFFIX}"


def to_universal(tag_dir: Path) -> Path:
    """Convert the DeepSpeed checkpoint in `tag_dir` into `<tag>.universal` (once; reused after).

    Single process (no worker pool): the converter's pool would fork a training process.
    """
    from deepspeed.checkpoint import ds_to_universal

    out = universal_dir(tag_dir)
    if (out / "zero").is_dir():
        return out
    tmp = tag_dir.parent / f".universal-{tag_dir.name}-{uuid.uuid4().hex[:8]}"
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines, not our log's
            ds_to_universal.main(args)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except Exception as e:
        raise RuntimeError(f"could not convert checkpoint {tag_dir} to DeepSpeed's universal format for a "
                           f"world-size change ({type(e).__name__}: {e}); resume with the world size it was "
                           "written with") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_universal(engine: Any, udir: Path) -> None:
    """Load the universal checkpoint `udir` into `engine` (every rank; collective under ZeRO-3)."""
    config = getattr(engine, "_config", None)
    if config is None or not hasattr(config, "load_universal_checkpoint"):
        raise RuntimeError(
            "this DeepSpeed engine has no _config.load_universal_checkpoint (DeepSpeed 0.19's switch for "
            "universal checkpoints), so a checkpoint written at another world size cannot be resharded; "
            "resume with the world size it was written with, or pin deepspeed 0.19"
        )
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(str(udir.parent), tag=udir.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = before
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {udir}")
