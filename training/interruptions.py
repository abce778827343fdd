"""The Trainer's side of interruptions: preemption (SIGTERM, a platform's notice), the hang
watchdog's report and fault accounting (what a restart loses).

A mixin of :class:`training.trainer.Trainer`, kept apart so that ``trainer.py`` reads as the
training loop; the mechanisms themselves live in ``training.preempt``, ``training.watchdog`` and
``training.faults``. Every method here runs on every rank, at the points the loop calls them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from training import checkpoint as ckpt
from training.faults import FaultStats, ProgressLog
from training.preempt import RECLAIM_GRACE_S, Preempted, Preemption, say
from training.watchdog import Watchdog

if TYPE_CHECKING:
    from training.config import TrainConfig


class Interruptions:
    """Preemption, hang and fault-accounting methods of the Trainer (see the module docstring)."""

    # Set by the Trainer (declared for readers and type checkers).
    cfg: TrainConfig
    dist: Any
    sink: Any
    checkpoints: Any
    checkpoint_dir: Any
    console: Any
    _step: int
    save_checkpoint: Callable[..., str]  # Trainer.save_checkpoint

    def _init_fault_handling(self, cfg: TrainConfig) -> None:
        """Preemption, hang watchdog and fault accounting (training.preempt/watchdog/faults)."""
        self._saved_step: int | None = None  # newest checkpoint written or restored by this process
        self.faults = FaultStats()  # restarts, world-size changes, lost steps: carried in checkpoints
        self._progress = (ProgressLog(self.checkpoints.write_progress)
                          if self.dist.is_main and self.checkpoint_dir is not None else None)
        self.watchdog = Watchdog(cfg.faults.hang_timeout_s, self.dist.rank, report=self._report_hang,
                                 slow_phases={"checkpoint": cfg.checkpoint.io_timeout_s, "startup": cfg.checkpoint.io_timeout_s})
        self.preemption = Preemption(cfg.faults.preempt_grace_s, self.dist.rank, self.dist.world_size,
                                     timeout_s=cfg.checkpoint.io_timeout_s, what_is_lost=self._what_a_restart_loses)

    def _stop_preempted(self) -> NoReturn:
        """Every rank, once they agreed to stop: checkpoint this step within the grace, exit 0."""
        p, t0, tag = self.preemption, time.monotonic(), None
        self.faults.preemptions += 1
        if self.checkpoint_dir is None:
            say(f"rank {self.dist.rank}: preempted at step {self._step}: no checkpoint_dir, nothing saved")
        elif self._saved_step == self._step:
            tag = ckpt.tag_for(self._step)  # this step is already saved
        else:
            # Collectives of this save wait at most what is left of the grace (the timer ends the
            # process just before): a slow rank cannot keep the others past SIGKILL.
            cfg = self.cfg.replace(**{"checkpoint.io_timeout_s": max(p.remaining_s(), 1.0)})
            try:
                tag = self.save_checkpoint(cfg)
            except Exception as e:  # noqa: BLE001 - the run must still leave cleanly: exit 0
                say(f"rank {self.dist.rank}: preemption checkpoint of step {self._step} failed ({type(e).__name__}: "
                    f"{e}); {self._what_a_restart_loses()}")
                if self.dist.world_size > 1:
                    # A collective failed: a peer is gone (its grace ended first). Tearing down a
                    # process group with a dead peer can abort (gloo: SIGABRT), so leave now, with 0.
                    p.exit_now("exiting 0 without tearing down the broken process group")
        p.done()
        if tag is not None:
            when = f"signal at step {p.signal_step}" if p.signal_step is not None else "another rank was signalled"
            say(f"rank {self.dist.rank}: preempted at step {self._step} ({when}): "
                f"checkpoint {tag} complete after {time.monotonic() - t0:.1f} s; exiting 0")
        self.sink.log_metrics({"fault/preempted_at_step": float(self._step)}, self._step)
        raise Preempted(self._step, tag)

    def _save_on_notice(self) -> None:
        """Every rank, on an agreed preemption notice: checkpoint this step now (at the notice,
        then once more just before its deadline; training.preempt)."""
        first = self.preemption.notice_saves == 1
        if first:
            self.faults.preemptions += 1
        if self.checkpoint_dir is None:
            return
        if self._saved_step != self._step:
            t0 = time.monotonic()
            tag = self.save_checkpoint()
            when = "at the notice" if first else "just before the deadline"
            then = "training goes on" if first else "holding for the platform to stop this attempt"
            say(f"rank {self.dist.rank}: preemption notice: checkpoint {tag} complete {when} after "
                f"{time.monotonic() - t0:.1f} s; {then}")
            self.sink.log_metrics({"fault/preemption_save_at_step": float(self._step)}, self._step)
        if not first:
            self._hold_for_reclaim()

    def _hold_for_reclaim(self) -> None:
        """After the save just before the deadline: any step trained now would be recomputed by the
        restart, so every rank waits (the watchdog kept fed) until the deadline plus a grace; a
        drain that was cancelled (no reclaim by then) lets training go on."""
        until = self.preemption.reclaim_expected_by()
        if until is None:
            return
        while (left := until - time.time()) > 0:
            self.watchdog.beat("awaiting_reclaim", self._step)
            time.sleep(min(1.0, left))
        say(f"rank {self.dist.rank}: the node was not reclaimed by its deadline + "
            f"{RECLAIM_GRACE_S:.0f} s (a cancelled drain?); training goes on from step {self._step}")

    def _what_a_restart_loses(self) -> str:
        if self._saved_step is None:
            return "no checkpoint was completed by this process: the restart resumes from the newest one in storage"
        return (f"the previous complete checkpoint {ckpt.tag_for(self._saved_step)} stays the newest: the restart "
                f"resumes there and recomputes {self._step - self._saved_step} step(s)")

    def _report_hang(self, text: str, path: Path) -> None:
        """Watchdog thread, on a hang: the dump to the sink (rank 0's MLflow run)."""
        where = {"fault.hang": f"rank {self.dist.rank}, step {self.watchdog.step}, phase {self.watchdog.phase}"}
        set_tags = getattr(self.sink, "set_tags", None)  # MLflowSink: a tag (params cannot change per attempt)
        set_tags(where) if callable(set_tags) else self.sink.log_params(where)
        self.sink.log_artifact(str(path), "faults")
