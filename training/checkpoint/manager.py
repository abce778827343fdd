"""The commit protocol: what every rank does to save, choose, stage and load a checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.checkpoint.commit import commit, prepare_tag_dir, prune
from training.checkpoint.layout import (
    MARKER,
    POINTER,
    PROGRESS,
    atomic_write,
    is_complete,
    latest_complete,
    step_of,
    tag_for,
)
from training.checkpoint.safe_load import assert_safe_loader, install_safe_loader, scan_checkpoint
from training.checkpoint.state import load_rank_state, rng_state, save_rank_state, set_rng_state
from training.checkpoint.store import CheckpointStore, latest_remote, safe_read, stage_from_store
from training.config import RESUMABLE_FIELDS, TrainConfig, config_diff
from training.dist import agree
from training.reshard import load_universal, to_universal, universal_dir


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
                    lambda: self._commit(tag, step, cfg.keep_checkpoints) if self.dist.is_main else None)
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
            atomic_write(self.root / PROGRESS, text)

    def read_progress(self) -> dict[str, Any] | None:
        """The progress record of the attempt before this one (None if there is none or it is unreadable)."""
        try:
            if self.store is not None:
                text = safe_read(self.store, PROGRESS)
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
        return agree(what, fn, timeout_s=cfg.io_timeout_s, share=share)
