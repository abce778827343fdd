"""Checkpoints: DeepSpeed engine state + per-rank trainer state, committed atomically.

Layout of `checkpoint_dir` (the same relative keys in a remote `CheckpointStore`):

    step{N}/                      DeepSpeed files (model/optimizer shards) written by all ranks
    step{N}/trainer_rank{R}.json  per-rank client state as JSON: step, loader cursor, RNG, config
    step{N}/complete.json         written by rank 0 after a barrier: the commit marker
    latest_complete.json          pointer {"tag", "step"} to the newest committed checkpoint

A checkpoint counts only once `complete.json` exists, and that file is written (temp file +
os.replace) after every rank has returned from saving, so a crash at any point during a
save leaves the previous checkpoint the newest complete one. DeepSpeed's own `latest` file
is not written or used.

Loading never unpickles arbitrary objects (anyone who can write run storage could otherwise
run code in every worker): the client state is JSON, and DeepSpeed's `.pt` files are read with
`torch.load(weights_only=True)` and the allow-list in `_safe_globals` (see `safe_torch_load`,
installed into the engine by `install_safe_loader`).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from training.config import RESUMABLE_FIELDS, TrainConfig, config_diff
from training.dist import agree
from training.reshard import UNIVERSAL_SUFFIX, load_universal, to_universal, universal_dir

MARKER = "complete.json"
PROGRESS = "progress.json"  # training.faults: the step a run reached (not a checkpoint)
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
    return f"trainer_rank{rank}.json"


#: What a client-state file of an older vitscale was called (a pickle; never loaded now).
LEGACY_RANK_FILE = "trainer_rank{rank}.pt"


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
    shutil.rmtree(Path(checkpoint_dir) / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)  # converted from the old one


def commit(checkpoint_dir: str | Path, tag: str, step: int, world_size: int) -> None:
    """Rank 0, after a barrier following every rank's save: write the marker and the pointer."""
    root = Path(checkpoint_dir)
    info = json.dumps({"tag": tag, "step": step, "world_size": world_size})
    _atomic_write(root / tag / MARKER, info)
    _atomic_write(root / POINTER, info)


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
        complete = sorted((n for n in remote if step_of(n) is not None and _safe_read(store, f"{n}/{MARKER}") is not None),
                          key=lambda t: step_of(t) or 0)
        names = sorted(set(remote) | set(local))
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
    _atomic_write(Path(tag_dir) / rank_file(rank), json.dumps(state, allow_nan=True))


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
    try:
        state = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint is damaged: resume from an older one") from e
    missing = {"step", "loader", "rng", "config", "config_hash"} - set(state if isinstance(state, dict) else {})
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}; the checkpoint is damaged: resume from an older one")
    return state


# ---------------------------------------------------------------------------------------------
# Loading DeepSpeed's .pt files without running code
# ---------------------------------------------------------------------------------------------


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
            "check that rebuilding it runs no code and add it to training.checkpoint._safe_globals"
        ) from e


def scan_checkpoint(tag_dir: str | Path) -> int:
    """Check every `.pt` file of a checkpoint with the safe loader (memory-mapped, so only the
    pickle part is read); raises UnsafeCheckpointError on the first bad one. Returns the count.

    Done before DeepSpeed loads anything, so a tampered file fails every rank at the same
    agreement point instead of one rank raising inside DeepSpeed's collective load.
    """
    import zipfile

    files = sorted(Path(tag_dir).rglob("*.pt"))
    for f in files:
        safe_torch_load(f, mmap=zipfile.is_zipfile(f))  # torch can mmap only its zip format
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
            "DeepSpeed config, or teach training.checkpoint.install_safe_loader about this engine"
        )


# ---------------------------------------------------------------------------------------------
# Staging a remote checkpoint on a node
# ---------------------------------------------------------------------------------------------


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
        _atomic_write(tmp / MARKER, marker)
        dst = root / tag
        if dst.exists():
            shutil.rmtree(dst)
        shutil.rmtree(root / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)  # converted from the old copy
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / tag


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


# ---------------------------------------------------------------------------------------------
# The commit protocol: what every rank does to save, choose, stage and load a checkpoint
# ---------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves and restores one Trainer's checkpoints under `root`, mirrored to `store`.

    Protocol: every rank runs the same sequence of collectives, whatever happens. Anything that
    may fail or wait on I/O (a decision by rank 0, a download or upload by each node's local
    rank 0, reading files) runs inside `training.dist.agree`, which always ends in one bounded
    collective where all ranks learn whether any failed; then all raise or all go on.

    `cfg` is passed per call (not kept): its hash is what a checkpoint must match, and its
    `io_timeout_s` bounds every wait, so a caller that changes the resumable fields is obeyed.
    """

    def __init__(self, engine: Any, dist: Any, root: Path | None, store: CheckpointStore | None) -> None:
        if store is not None and root is None:
            raise ValueError("checkpoint_store needs a local checkpoint_dir to stage files in")
        self.engine, self.dist, self.root, self.store = engine, dist, root, store
        install_safe_loader(engine)  # DeepSpeed's loader would unpickle anything

    def save(self, step: int, cfg: TrainConfig, trainer_state: Callable[[], dict[str, Any]]) -> str:
        """Save the engine + per-rank state as tag `step{N}` and commit it (all ranks call this).

        `trainer_state()` gives this rank's own resumable state (loader cursor, counters); the
        step, RNG states, config and world size are added here.
        """
        assert self.root is not None, "Trainer was built without checkpoint_dir"
        tag, root, rank = tag_for(step), self.root, self.dist.rank

        def prepare() -> None:
            if self.dist.is_main:
                root.mkdir(parents=True, exist_ok=True)
                prepare_tag_dir(root, tag)

        self._agree(cfg, f"preparing checkpoint {tag}", prepare)
        state = {"step": step, **trainer_state()}
        client = {"step": step, "config_hash": cfg.config_hash()}
        self.engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
        state.update(rng=rng_state(), config=cfg.to_dict(), config_hash=cfg.config_hash(),
                     world_size=self.dist.world_size)
        # Every rank has finished writing only after this: only then may the checkpoint count.
        self._agree(cfg, f"writing checkpoint {tag}", lambda: save_rank_state(root / tag, rank, state))
        if self.store is not None:
            store = self.store
            self._agree(cfg, f"uploading checkpoint {tag}",
                        lambda: store.upload_dir(str(root / tag), tag) if self.dist.local_rank == 0 else None)
        self._agree(cfg, f"committing checkpoint {tag}",
                    lambda: self._commit(tag, step, cfg.checkpoint.keep) if self.dist.is_main else None)
        return tag

    def _commit(self, tag: str, step: int, keep: int) -> None:
        """Rank 0: marker + pointer locally, then in the store (marker last: it makes it count)."""
        assert self.root is not None
        commit(self.root, tag, step, self.dist.world_size)
        if self.store is not None:
            info = (self.root / tag / MARKER).read_text()
            self.store.write_text(f"{tag}/{MARKER}", info)
            self.store.write_text(POINTER, info)
        prune(self.root, keep, self.store)

    def restore(self, resume: str, cfg: TrainConfig) -> dict[str, Any] | None:
        """Load a checkpoint into the engine and this process's RNGs; returns this rank's saved
        state (step, loader cursor, counters), or None when "auto" finds none.

        `resume`: "auto" (newest complete checkpoint in the store, else in `root`), a tag
        ("step500") or a checkpoint directory path. Rank 0 alone decides which checkpoint and
        where (every rank gets its decision); with a store, each node's local rank 0 stages it
        (marker last); every rank then checks its files; DeepSpeed loads with the safe loader.
        """
        plan = self._agree(cfg, "choosing the checkpoint to resume from",
                           lambda: self._plan(resume) if self.dist.is_main else None, share=True)[0]
        if plan["tag"] is None:
            return None
        tag = plan["tag"]
        # Staged: every node downloads into its OWN root; rank 0's path may not exist on this node.
        tag_dir = self.root / tag if plan["stage"] and self.root is not None else Path(plan["dir"])
        if plan["stage"]:
            self._agree(cfg, f"downloading checkpoint {tag} into {tag_dir.parent} on every node",
                        lambda: self._stage(tag) if self.dist.local_rank == 0 else None)
        state = self._agree(cfg, f"checking checkpoint {tag_dir}", lambda: self._check(tag_dir, cfg))
        saved_world = int(state.get("world_size", self.dist.world_size))
        if saved_world != self.dist.world_size and self.engine.zero_optimization_stage() > 0:
            # ZeRO partitions are per rank: reshard through DeepSpeed's universal checkpoint.
            self._agree(cfg, f"converting checkpoint {tag_dir} (written by {saved_world} ranks) for "
                             f"{self.dist.world_size} ranks", lambda: to_universal(tag_dir) if self.dist.local_rank == 0 else None)
            self._agree(cfg, f"loading resharded checkpoint {tag_dir}",
                        lambda: load_universal(self.engine, universal_dir(tag_dir)))
        else:
            self._agree(cfg, f"loading checkpoint {tag_dir}", lambda: self._load_engine(tag_dir))
        if saved_world == self.dist.world_size:  # per-rank RNG streams do not map onto another world
            set_rng_state(state["rng"])
        return {**state, "progress": plan.get("progress")}

    def write_progress(self, text: str) -> None:
        """Rank 0: the run's progress record (training.faults), next to the checkpoints."""
        if self.store is not None:
            self.store.write_text(PROGRESS, text)
        elif self.root is not None:
            _atomic_write(self.root / PROGRESS, text)

    def read_progress(self) -> dict[str, Any] | None:
        """The progress record of the attempt before this one (None if there is none or it is unreadable)."""
        try:
            if self.store is not None:
                text = _safe_read(self.store, PROGRESS)
            else:
                path = self.root / PROGRESS if self.root is not None else None
                text = path.read_text() if path is not None and path.is_file() else None
            return json.loads(text) if text else None
        except (OSError, ValueError):
            return None

    def _plan(self, resume: str) -> dict[str, Any]:
        """Rank 0: which checkpoint to restore and whether nodes must download it first.

        With a store the store is the truth (a node's staging folder may hold another node's
        files, or a tag whose upload never finished); without one, `root` is.
        """
        return {**self._choose(resume), "progress": self.read_progress()}

    def _choose(self, resume: str) -> dict[str, Any]:
        root = self.root
        if resume == "auto":
            if root is None:
                raise ValueError("resume='auto' needs checkpoint_dir")
            tag = latest_remote(self.store) if self.store is not None else latest_complete(root)
            return {"tag": tag, "dir": str(root / tag) if tag else None, "stage": self.store is not None}
        if self.store is not None and root is not None and step_of(resume) is not None:
            return {"tag": resume, "dir": str(root / resume), "stage": True}
        p = Path(resume)
        if not p.is_dir() and root is not None:
            p = root / resume
        return {"tag": p.name, "dir": str(p), "stage": False}

    def _stage(self, tag: str) -> None:
        """Node-local rank 0: download `tag` into the node's staging folder, marker last."""
        assert self.store is not None and self.root is not None
        stage_from_store(self.store, tag, self.root)

    def _check(self, tag_dir: Path, cfg: TrainConfig) -> dict[str, Any]:
        """This rank: the checkpoint is complete, safe to load, ours and of this config."""
        if not is_complete(tag_dir):
            raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint (no {MARKER}); resume from "
                                    "a committed one (see latest_complete.json)")
        if self.dist.local_rank == 0:
            scan_checkpoint(tag_dir)  # refuses a tampered .pt before DeepSpeed opens any
        saved_world = json.loads((tag_dir / MARKER).read_text()).get("world_size", self.dist.world_size)
        # At another world size every rank takes rank 0's state: the step, counters and the
        # loader cursor (which resumes at any world size) are the same on every rank.
        state = load_rank_state(tag_dir, self.dist.rank if saved_world == self.dist.world_size else 0)
        state["world_size"] = int(saved_world)
        if state["config_hash"] != cfg.config_hash():
            diff = config_diff(state["config"], cfg.to_dict())
            raise ValueError(
                f"refusing to resume from {tag_dir}: the config changed since it was written "
                f"(only {sorted(RESUMABLE_FIELDS)} may change):\n  " + "\n  ".join(diff)
            )
        return state

    def _load_engine(self, tag_dir: Path) -> None:
        assert_safe_loader(self.engine)
        load_path, _ = self.engine.load_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")

    @staticmethod
    def _agree(cfg: TrainConfig, what: str, fn: Callable[[], Any], *, share: bool = False) -> Any:
        return agree(what, fn, timeout_s=cfg.checkpoint.io_timeout_s, share=share)
