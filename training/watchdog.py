"""Hang watchdog: a rank that makes no progress for `hang_timeout_s` dumps its stacks and dies.

A stuck S3 read, a rank spinning in a collective whose peer died, a deadlocked data worker:
each would otherwise burn the whole reservation. The Trainer calls :meth:`Watchdog.beat` at
every phase change (an attribute write and a clock read, nothing more); a daemon thread checks
the age of the last beat. When it exceeds the limit, the thread writes the last step and phase
and every thread's Python stack (``faulthandler``) to stderr and to the sink (the MLflow run
gets a ``hang`` tag-like param and the dump as an artifact), then ends the process with
:data:`HANG_EXIT_CODE`, so Ray Train / torchrun restart the group from the newest checkpoint.

The main thread cannot be interrupted reliably while it is blocked in C (a socket read, a
gloo collective), so the process is ended with ``os._exit`` from the watchdog thread.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.preempt import say

#: Exit status of a process the watchdog ended (non-zero: the launcher counts it as a failure).
HANG_EXIT_CODE = 86

#: Phases a beat names (what the rank was doing when it stopped making progress).
PHASES = ("startup", "data", "forward_backward", "optimizer_step", "collective", "eval", "checkpoint", "done")


class Watchdog:
    """Watches a heartbeat; see the module doc. `timeout_s` <= 0 disables it.

    `slow_phases` maps a phase to a longer limit (checkpoint I/O is bounded by io_timeout_s,
    not by the step time). `report(text, path)` hands the dump to the sink (rank 0's MLflow run);
    it gets at most `report_timeout_s`, so a dead tracking server cannot keep a hung rank alive.
    """

    def __init__(self, timeout_s: float, rank: int, *, slow_phases: dict[str, float] | None = None,
                 report: Callable[[str, Path], None] | None = None, report_timeout_s: float = 10.0,
                 exit: Callable[[int], Any] = os._exit) -> None:
        self.timeout_s, self.rank = timeout_s, rank
        self.slow_phases = slow_phases or {}
        self.report, self.report_timeout_s, self._exit = report, report_timeout_s, exit
        self.step, self.phase = 0, "startup"
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, phase: str, step: int | None = None) -> None:
        """Progress: this rank is now in `phase` (at `step`)."""
        self.phase = phase
        if step is not None:
            self.step = step
        self.last = time.monotonic()

    def start(self) -> None:
        if self.timeout_s <= 0 or self._thread is not None:
            return
        self.beat("startup")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="vitscale-hang-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _limit(self) -> float:
        return max(self.timeout_s, self.slow_phases.get(self.phase, 0.0))

    def _run(self) -> None:
        period = min(max(self.timeout_s / 10, 0.05), 5.0)
        while not self._stop.wait(period):
            idle = time.monotonic() - self.last
            if idle > self._limit():
                self._fire(idle)
                return

    def _fire(self, idle: float) -> None:
        head = (f"rank {self.rank}: HANG: no progress for {idle:.0f} s (hang_timeout_s={self._limit():g}) at step "
                f"{self.step}, phase {self.phase!r}; every thread's stack follows. Ending this worker with exit "
                f"code {HANG_EXIT_CODE} so the launcher restarts from the newest checkpoint. If this phase is "
                "legitimately this slow, raise TrainConfig.hang_timeout_s")
        say(head)
        fd, name = tempfile.mkstemp(prefix=f"vitscale-hang-rank{self.rank}-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(head + "\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        path = Path(name)
        try:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        except (OSError, ValueError):  # stderr closed or not a real file: the dump file has it
            say(path.read_text())
        if self.report is not None:
            text, report = path.read_text(), self.report
            t = threading.Thread(target=lambda: report(text, path), daemon=True)
            t.start()
            t.join(self.report_timeout_s)
        sys.stdout.flush()
        sys.stderr.flush()
        self._exit(HANG_EXIT_CODE)
