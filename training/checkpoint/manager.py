"""The commit protocol: what every rank does to save, choose, stage, verify and load a checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.checkpoint.commit import commit, prepare_tag_dir, prune, supersede_newer
from training.checkpoint.integrity import (
    CheckpointDamaged,
    SaveRecorder,
    describe,
    manifest_of,
    merge,
    read_marker,
    verify,
)
from training.checkpoint.layout import (
    MARKER,
    POINTER,
    PROGRESS,
    atomic_write,
    complete_tags,
    is_complete,
    rank_file,
    step_of,
    tag_for,
)
from training.checkpoint.safe_load import assert_safe_loader, install_safe_loader, scan_checkpoint
from training.checkpoint.state import load_rank_state, rng_state, save_rank_state, set_rng_state
from training.checkpoint.store import CheckpointStore, LocalDirStore, remote_tags, safe_read, stage_from_store
from training.config import RESUMABLE_FIELDS, TrainConfig, config_diff
from training.dist import agree
from training.preempt import say
from training.reshard import load_universal, to_universal, universal_dir

#: Newest committed checkpoints `resume="auto"` tries, in order, before giving up.
MAX_CANDIDATES = 20
#: Characters of one rank's damage report sent to the others (the exchange holds 8 KiB a rank).
_REPORT_CHARS = 3000


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
        self._written = SaveRecorder(engine)  # which files this rank's save wrote: hashed for the manifest

    def save(self, step: int, cfg: TrainConfig, trainer_state: Callable[[], dict[str, Any]]) -> str:
        """Save the engine + per-rank state as tag `step{N}` and commit it (all ranks call this).

        `trainer_state()` gives this rank's own resumable state (loader cursor, counters); the
        step, RNG states, config and world size are added here.
        """
        assert self.root is not None, "Trainer was built without checkpoint_dir"
        tag, root, rank = tag_for(step), self.root, self.dist.rank

        def prepare() -> None:
            # With a store each node stages its own ranks' files: every node clears its copy (a
            # file left from an earlier attempt would be uploaded with the new ones).
            if self.dist.is_main or (self.store is not None and self.dist.local_rank == 0):
                root.mkdir(parents=True, exist_ok=True)
                prepare_tag_dir(root, tag, self.store if self.dist.is_main else None)

        self._agree(cfg, f"preparing checkpoint {tag}", prepare)
        state = {"step": step, **trainer_state()}
        client = {"step": step, "config_hash": cfg.config_hash()}
        self._written.written_in(root / tag)  # forget anything recorded outside a save
        self.engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
        state.update(rng=rng_state(), config=cfg.to_dict(), config_hash=cfg.config_hash(),
                     world_size=self.dist.world_size)

        def write() -> dict[str, Any]:
            """This rank's client state, then size + sha256 of every file this rank wrote, hashed
            here on the node that wrote them (another node's files never reach this one)."""
            names = self._written.written_in(root / tag)
            save_rank_state(root / tag, rank, state)
            return describe(root / tag, [*names, rank_file(rank)])

        # Every rank has finished writing only after this: only then may the checkpoint count.
        files = merge(self._agree(cfg, f"writing checkpoint {tag}", write, share=True))
        if self.store is not None:
            store = self.store
            self._agree(cfg, f"uploading checkpoint {tag}",
                        lambda: store.upload_dir(str(root / tag), tag) if self.dist.local_rank == 0 else None)
        self._agree(cfg, f"committing checkpoint {tag}",
                    lambda: self._commit(tag, step, cfg.checkpoint.keep, files) if self.dist.is_main else None)
        return tag

    def _commit(self, tag: str, step: int, keep: int, files: dict[str, dict[str, Any]]) -> None:
        """Rank 0: marker (with every rank's file checksums) + pointer locally, then in the store
        (marker last: it makes it count)."""
        assert self.root is not None
        commit(self.root, tag, step, self.dist.world_size, files)
        if self.store is not None:
            self.store.write_text(f"{tag}/{MARKER}", (self.root / tag / MARKER).read_text())
            self.store.write_text(POINTER, (self.root / POINTER).read_text())
        prune(self.root, keep, self.store)

    def restore(self, resume: str | int, cfg: TrainConfig) -> dict[str, Any] | None:
        """Load a checkpoint into the engine and this process's RNGs; returns this rank's saved
        state (step, loader cursor, counters; `damaged`: the tags skipped), or None when "auto"
        finds none.

        `resume`: "auto" (newest intact committed checkpoint in the store, else in `root`), a
        step (500 or "500"), a tag ("step500") or a checkpoint directory path. Rank 0 alone
        decides which checkpoints and where (every rank gets its decision); with a store, each
        node's local rank 0 stages one (marker last) and checks its files against the checksums
        in its marker; every rank learns whether any rank found damage. A damaged checkpoint is
        reported by name and "auto" goes on to the next older one; an asked-for one is refused.
        Once one loads, committed checkpoints newer than it are set aside (`supersede_newer`).
        """
        plan = self._agree(cfg, "choosing the checkpoint to resume from",
                           lambda: self._plan(resume) if self.dist.is_main else None, share=True)[0]
        if not plan["tags"]:
            return None
        damaged: list[tuple[str, str]] = []  # (tag, what is wrong) of each one skipped
        for tag in plan["tags"]:
            # Staged: every node downloads into its OWN root; rank 0's path may not exist on this node.
            tag_dir = self.root / tag if plan["stage"] and self.root is not None else Path(plan["base"]) / tag
            state, report = self._restore_one(tag_dir, plan["stage"], cfg)
            if state is not None:
                break
            damaged.append((tag, report))
            if plan["explicit"]:
                raise CheckpointDamaged(f"{report}. Resume another step, or 'auto' (the newest intact one)")
            if self.dist.is_main:
                say(f"rank 0: {report}; trying the next older checkpoint")
        else:
            raise CheckpointDamaged(
                f"no intact checkpoint to resume from: {'; '.join(r for _, r in damaged)}. Restore the files "
                "from a copy, or start a fresh run (no resume)")
        if plan["ours"] and (plan["explicit"] or damaged):
            self._set_aside_newer(tag, damaged, cfg)
        return {**state, "progress": plan.get("progress"), "damaged": [t for t, _ in damaged]}

    def _restore_one(self, tag_dir: Path, stage: bool, cfg: TrainConfig) -> tuple[dict[str, Any] | None, str]:
        """Every rank: stage, check and load one checkpoint; (state, "") or (None, the damage
        every rank agrees on). Anything but damage (a failed download, another config) raises."""
        tag = tag_dir.name
        if stage:
            self._agree(cfg, f"downloading checkpoint {tag} into {tag_dir.parent} on every node",
                        lambda: self._stage(tag) if self.dist.local_rank == 0 else None)
        found: dict[str, Any] = {}

        def check() -> str | None:
            try:
                found["state"] = self._check(tag_dir, cfg)
            except CheckpointDamaged as e:
                return str(e)[:_REPORT_CHARS]
            return None

        reports = self._agree(cfg, f"checking checkpoint {tag_dir}", check, share=True)
        seen = [(r, text) for r, text in enumerate(reports) if text]
        if seen:
            ranks = f" (found by rank(s) {[r for r, _ in seen]})" if self.dist.world_size > 1 else ""
            return None, "; ".join(dict.fromkeys(text for _, text in seen)) + ranks
        state = found["state"]
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
        return state, ""

    def _set_aside_newer(self, tag: str, damaged: list[tuple[str, str]], cfg: TrainConfig) -> None:
        """Rank 0, after resuming `tag` on purpose or past damaged ones: un-commit the newer
        checkpoints (training goes on from `tag`: they belong to an abandoned history, and
        retention must not keep them as the newest while it deletes intact older ones)."""
        def set_aside() -> None:
            if not self.dist.is_main:
                return
            assert self.root is not None
            newer = supersede_newer(self.store if self.store is not None else LocalDirStore(self.root), step_of(tag) or 0)
            if damaged:
                lost = (step_of(damaged[0][0]) or 0) - (step_of(tag) or 0)
                say(f"rank 0: resumed from {tag}, the newest intact checkpoint, instead of {damaged[0][0]}: "
                    f"{lost} step(s) are lost and will be recomputed")
            if newer:
                say(f"rank 0: checkpoint(s) {', '.join(newer)}, newer than {tag}, set aside: their {MARKER} is "
                    "renamed superseded.json (rename it back to resume one of them)")

        self._agree(cfg, f"setting aside the checkpoints newer than {tag}", set_aside)

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

    def _plan(self, resume: str | int) -> dict[str, Any]:
        """Rank 0: which checkpoint to restore and whether nodes must download it first.

        With a store the store is the truth (a node's staging folder may hold another node's
        files, or a tag whose upload never finished); without one, `root` is.
        """
        return {**self._choose(resume), "progress": self.read_progress()}

    def _choose(self, resume: str | int) -> dict[str, Any]:
        """`tags` to try in order, the folder they are in (`base`), whether each node stages them
        from the store, whether they were asked for by name (`explicit`), and whether they are
        this manager's own checkpoints (`ours`: newer ones may be set aside after the resume)."""
        root = self.root
        if resume == "auto":
            if root is None:
                raise ValueError("resume='auto' needs checkpoint_dir")
            tags = remote_tags(self.store) if self.store is not None else complete_tags(root)
            return {"tags": tags[::-1][:MAX_CANDIDATES], "base": str(root), "stage": self.store is not None,
                    "explicit": False, "ours": True}
        resume = tag_for(int(resume)) if isinstance(resume, int) or str(resume).isdigit() else str(resume)
        if self.store is not None and root is not None and step_of(resume) is not None:
            return {"tags": [resume], "base": str(root), "stage": True, "explicit": True, "ours": True}
        p = Path(resume)
        if not p.is_dir() and root is not None:
            p = root / resume
        ours = root is not None and step_of(p.name) is not None and p.parent.resolve() == root.resolve()
        return {"tags": [p.name], "base": str(p.parent), "stage": False, "explicit": True, "ours": ours}

    def _stage(self, tag: str) -> None:
        """Node-local rank 0: download `tag` into the node's staging folder, marker last."""
        assert self.store is not None and self.root is not None
        stage_from_store(self.store, tag, self.root)

    def _check(self, tag_dir: Path, cfg: TrainConfig) -> dict[str, Any]:
        """This rank: the checkpoint is complete, intact (CheckpointDamaged if not), safe to load,
        ours and of this config.

        Each node's local rank 0 checks every file of the copy its node loads against the
        checksums in the marker (every rank of the node reads from that copy, and DeepSpeed's
        ZeRO 1/2 loader reads every rank's optimizer file), in threads, before any rank loads.
        """
        if not is_complete(tag_dir):
            raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint (no {MARKER}); resume from "
                                    "a committed one (see latest_complete.json)")
        marker = read_marker(tag_dir)
        if self.dist.local_rank == 0:
            files = manifest_of(marker)
            if files is None:
                say(f"rank {self.dist.rank}: warning: checkpoint {tag_dir.name} has no checksums (committed by an "
                    f"older vitscale: no 'files' in its {MARKER}), so its files cannot be verified; loading it "
                    "unverified. Checkpoints saved from now on have them")
            else:
                verify(tag_dir, files)  # before the unpickler: a flipped bit is damage, not tampering
            scan_checkpoint(tag_dir)  # refuses a tampered .pt before DeepSpeed opens any
        saved_world = marker.get("world_size", self.dist.world_size)
        # At another world size every rank takes rank 0's state: the step, counters and the
        # loader cursor (which resumes at any world size) are the same on every rank.
        state = load_rank_state(tag_dir, self.dist.rank if saved_world == self.dist.world_size else 0)
        state["world_size"] = int(saved_world)
        if state["config_hash"] != cfg.config_hash():
            raise ValueError(resume_refusal(tag_dir, state["config"], cfg))
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


def resume_refusal(tag_dir: Path, saved: dict[str, Any], cfg: TrainConfig) -> str:
    """Why a checkpoint written under config ``saved`` cannot resume a run of ``cfg``: the
    differences, one per line; another objective first, in words (its modules differ: an MAE
    run has a decoder a classifier's checkpoint never had, and no head)."""
    current = cfg.to_dict()
    diff = config_diff(saved, current)
    was = (saved.get("objective") or {}).get("kind", "classification")  # before objectives: classification
    now = current["objective"]["kind"]
    if was != now:
        head = (f"refusing to resume from {tag_dir}: objective: {was} -> {now}: a checkpoint of another objective "
                "cannot resume this run; start a new run, or fine-tune from its exported weights")
        rest = [d for d in diff if not d.startswith("objective.")]
        return head + ("; other differences:\n  " + "\n  ".join(rest) if rest else "")
    return (f"refusing to resume from {tag_dir}: the config changed since it was written "
            f"(only {sorted(RESUMABLE_FIELDS)} may change):\n  " + "\n  ".join(diff))
