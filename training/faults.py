"""Fault accounting: restarts, world-size changes, lost (recomputed) steps and time lost.

The counters travel in every checkpoint's trainer state, so they add up over any number of
restarts. What a failed attempt reached is known from a small progress record (step, wall
time, seconds per step) that rank 0 writes next to the checkpoints at every log line, in a
background thread (never in the step's way); on resume, the steps between the checkpoint and
that record are the ones recomputed, and the time lost is the gap from the record to the
resume plus the time those steps took.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PROGRESS = "progress.json"


@dataclass(kw_only=True)
class FaultStats:
    """Totals over a run's attempts, plus what the most recent fault cost (`last_*`)."""

    restarts: int = 0
    world_size_changes: int = 0
    preemptions: int = 0
    lost_steps: int = 0
    lost_time_s: float = 0.0
    last_lost_steps: int = 0
    last_lost_time_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def restored(cls, saved: dict[str, Any] | None, *, saved_world: int, world: int, step: int,
                 progress: dict[str, Any] | None, now: float | None = None) -> FaultStats:
        """The counters of a checkpoint written at `step` by `saved_world` ranks, plus this restart.

        `progress`: the failed attempt's last progress record (None: nothing recorded, e.g. a
        run that died before its first log line).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        stats = cls(**{k: v for k, v in (saved or {}).items() if k in known})
        now = time.time() if now is None else now
        lost, gap = 0, 0.0
        if progress is not None:
            lost = max(int(progress.get("step", 0)) - step, 0)
            gap = max(now - float(progress.get("time", now)), 0.0) + lost * float(progress.get("step_s", 0.0))
        stats.restarts += 1
        stats.world_size_changes += int(saved_world > 0 and saved_world != world)
        stats.lost_steps += lost
        stats.lost_time_s += gap
        stats.last_lost_steps, stats.last_lost_time_s = lost, gap
        stats.history = [*stats.history, {"resumed_at_step": step, "lost_steps": lost, "lost_time_s": round(gap, 3),
                                          "world_size": world, "previous_world_size": saved_world}][-20:]
        return stats

    def metrics(self) -> dict[str, float]:
        """For the sink: `fault/...` totals and the last fault's cost."""
        return {f"fault/{k}": float(v) for k, v in self.to_dict().items() if k != "history"}


class ProgressLog:
    """Rank 0: write `{"step", "time", "step_s"}` with `write(text)` in a background thread.

    At most one write in flight; a record that arrives meanwhile replaces the queued one (only
    the newest matters), so slow storage never slows the step.
    """

    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._queued: str | None = None
        self._busy = False

    def record(self, step: int, step_s: float) -> None:
        text = json.dumps({"step": step, "time": time.time(), "step_s": step_s})
        with self._lock:
            self._queued = text
            if self._busy:
                return
            self._busy = True
        threading.Thread(target=self._drain, name="vitscale-progress", daemon=True).start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                text, self._queued = self._queued, None
                if text is None:
                    self._busy = False
                    return
            try:
                self._write(text)
            except Exception:  # noqa: BLE001 - accounting only: a failed write must not fail training
                pass
