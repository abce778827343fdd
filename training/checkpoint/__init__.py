"""Checkpoints: DeepSpeed engine state + per-rank trainer state, committed atomically.

One concern per module:

* `layout`    the on-disk layout: tags, the commit marker and pointer, which tags are committed
* `store`     the `CheckpointStore` protocol (a remote mirror), `LocalDirStore`, what a store has
              committed, staging a remote checkpoint on a node
* `commit`    un-committing a tag before a save, committing it after, pruning old ones, setting
              aside the ones newer than a step resumed on purpose
* `integrity` every file's size and sha256 in the marker; checking a copy before it is loaded
* `state`     each rank's client state as JSON (step, loader cursor, RNG streams, config)
* `safe_load` reading DeepSpeed's `.pt` files without unpickling arbitrary objects
* `export`    consolidated weights as safetensors
* `manager`   `CheckpointManager`: the protocol every rank runs to save, choose, stage and load

Every public name is re-exported here: `from training.checkpoint import X` is the API.
"""

from training.checkpoint.commit import commit, prepare_tag_dir, prune, supersede_newer
from training.checkpoint.export import export_weights
from training.checkpoint.integrity import CheckpointDamaged, manifest_of, read_marker, verify
from training.checkpoint.layout import (
    LEGACY_RANK_FILE,
    MARKER,
    POINTER,
    PROGRESS,
    SUPERSEDED,
    complete_tags,
    is_complete,
    latest_complete,
    rank_file,
    step_of,
    tag_for,
)
from training.checkpoint.manager import CheckpointManager
from training.checkpoint.safe_load import (
    UnsafeCheckpointError,
    assert_safe_loader,
    install_safe_loader,
    safe_torch_load,
    scan_checkpoint,
)
from training.checkpoint.state import load_rank_state, rng_state, save_rank_state, set_rng_state
from training.checkpoint.store import (
    CheckpointStore,
    LocalDirStore,
    latest_remote,
    remote_tags,
    stage_from_store,
)

__all__ = [
    "LEGACY_RANK_FILE", "MARKER", "POINTER", "PROGRESS", "SUPERSEDED", "CheckpointDamaged", "CheckpointManager",
    "CheckpointStore", "LocalDirStore", "UnsafeCheckpointError", "assert_safe_loader", "commit", "complete_tags",
    "export_weights", "install_safe_loader", "is_complete", "latest_complete", "latest_remote", "load_rank_state",
    "manifest_of", "prepare_tag_dir", "prune", "rank_file", "read_marker", "remote_tags", "rng_state",
    "safe_torch_load", "save_rank_state", "scan_checkpoint", "set_rng_state", "stage_from_store", "step_of",
    "supersede_newer", "tag_for", "verify",
]
