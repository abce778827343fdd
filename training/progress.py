"""Progress on the console: what rank 0 prints while it trains, so a slow run can be told from a hung one.

The Trainer's metrics go to its ``MetricsSink`` (MLflow in orchestration); a person watching a
terminal, ``ray job logs`` or a ``torchrun`` log sees nothing of those. :class:`ConsoleProgress`
prints plain lines on stdout instead, on rank 0 only (under Ray Train a worker's stdout reaches
the driver, hence the job log), at the moments a person waits for:

* the start: steps from/to, batch split, device and profile;
* the first step of this process (its duration includes the warm-up, and gives a first ETA);
* every ``log_every`` steps: step/total, loss, lr, img/s, data-wait fraction, elapsed, ETA;
* after the first full log window, when the ETA is over an hour, what to change on this machine;
* each evaluation, periodic evaluation (few-shot) and checkpoint, with its duration;
* one summary line at the end of ``fit``.

The lines reuse the numbers the Trainer already computed for its sink at each log line, so
printing adds no host synchronisation to a step. Plain lines rather than a redrawn bar: they
read the same in a terminal, a job log and a CI log, and every one of them can be grepped.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

import torch

from training.config import TrainConfig
from training.profiles import detect_profile_name

#: ETAs above this many seconds get a note on what to change, once, after the first log window.
LONG_RUN_S = 3600.0
#: The length of run the note suggests instead (steps that take about this long here).
SUGGESTED_RUN_S = 15 * 60.0


def duration(seconds: float) -> str:
    """``0.4s``, ``45s``, ``2m05s``, ``3h12m``, ``2d04h``: short and unambiguous for a console line."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 9.95:
        return f"{max(seconds, 0.0):.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class LogWindow:
    """Step losses (kept on the device) and data-wait time between two log lines."""

    def __init__(self, device: torch.device) -> None:
        self.start = time.perf_counter()
        self.steps = 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.wait = 0.0

    def add(self, loss: torch.Tensor | None, wait: float) -> None:
        self.wait += wait
        if loss is not None:
            self.steps += 1
            self.loss_sum += loss


class ConsoleProgress:
    """Rank 0's progress lines (see the module doc); every method is a no-op when not ``enabled``.

    ``out`` defaults to the current ``sys.stdout`` at each print (pytest's capture, a redirect);
    ``clock`` is injectable for tests.
    """

    def __init__(self, cfg: TrainConfig, *, world_size: int, accum: int, device: str, enabled: bool = True,
                 out: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.world_size = world_size
        self.accum = accum
        self.device = device
        self.enabled = enabled
        self._out = out
        self._clock = clock
        self._t0 = self._anchor_t = 0.0
        self._s0 = self._anchor_s = self._stop = 0
        self._first_step_seen = False
        self._anchored = False

    # ------------------------------------------------------------------ events
    def started(self, step: int, stop: int) -> None:
        """``fit`` begins at ``step`` (after any restore) and ends at ``stop``."""
        self._t0 = self._anchor_t = self._clock()
        self._s0 = self._anchor_s = step
        self._stop = stop
        self._first_step_seen = self._anchored = False
        e, c = self.cfg.engine, self.cfg
        where = f"resuming at step {step}: steps {step} -> {stop}" if step else f"steps 0 -> {stop}"
        self._say(
            f"[train] {where} of {c.schedule.total_steps}, on {self.world_size} x {self.device} ({self.profile()} "
            f"profile, {e.precision}, ZeRO-{e.zero_stage}); global batch {c.global_batch} = micro {c.micro_batch} "
            f"x accum {self.accum} x {self.world_size} rank(s); a line every {c.log_every} steps"
        )

    def stepped(self, step: int) -> None:
        """After each optimizer step: prints once, after the first step of this process."""
        if self._first_step_seen or step <= self._s0:
            return
        self._first_step_seen = True
        took = self._clock() - self._t0
        if step % self.cfg.log_every == 0 or step >= self._stop:
            return  # a full line follows at once
        eta = took * (self._stop - step)
        self._say(f"[train] step {self._of(step)}: first step took {duration(took)} (warm-up included); "
                  f"ETA ~{duration(eta)} at this speed; next line at step {self._next_log(step)}")

    def logged(self, step: int, metrics: Mapping[str, float]) -> None:
        """A log line: ``metrics`` are the Trainer's for its sink (loss, lr, images_per_s, data_wait_frac)."""
        now = self._clock()
        eta = self._eta(step, now)
        pct = 100.0 * step / max(self._stop, 1)
        self._say(
            f"[train] step {self._of(step)} {pct:3.0f}%  loss {_num(metrics.get('loss'))}  "
            f"lr {_num(metrics.get('lr'), '.2e')}  {_num(metrics.get('images_per_s'), '.1f')} img/s  "
            f"data-wait {_num(100 * metrics.get('data_wait_frac', math.nan), '.0f')}%  "
            f"elapsed {duration(now - self._t0)}  ETA {duration(eta)}"
        )
        if not self._anchored:  # the first window: the ETA from here on leaves the warm-up out
            self._anchored = True
            self._anchor_t, self._anchor_s = now, step
            if eta > LONG_RUN_S and step < self._stop:
                self._say(self._long_run_note(eta, (now - self._t0) / max(step - self._s0, 1)))

    def evaluated(self, step: int, metrics: Mapping[str, float], seconds: float, name: str = "eval") -> None:
        """An evaluation (or a periodic one, ``name``) finished after ``seconds``."""
        shown = "  ".join(f"{k} {_num(v)}" for k, v in metrics.items() if not k.endswith(("/seconds", "_samples")))
        samples = metrics.get("eval_samples")
        extra = f"{int(samples)} samples, " if samples is not None and math.isfinite(samples) else ""
        self._say(f"[{name}] step {self._of(step)}  {shown}  ({extra}{duration(seconds)})")

    def saved(self, step: int, tag: str, seconds: float) -> None:
        self._say(f"[checkpoint] step {self._of(step)}  {tag} saved ({duration(seconds)})")

    def finished(self, step: int, result: Mapping[str, float]) -> None:
        """The one summary line at the end of ``fit``."""
        took = self._clock() - self._t0
        steps = step - self._s0
        per_step = took / steps if steps else math.nan
        images = steps * self.cfg.global_batch / took if took > 0 else math.nan
        evals = "".join(f", {k} {_num(v)}" for k, v in result.items() if k.startswith("eval_") and k != "eval_samples")
        self._say(f"[train] done: step {step}/{self._stop}, {steps} steps in {duration(took)} "
                  f"({per_step:.3g} s/step, {images:.1f} img/s), loss {_num(result.get('loss'))}{evals}, "
                  f"bad steps {int(result.get('bad_steps', 0))}")

    # ------------------------------------------------------------------ helpers
    def profile(self) -> str:
        """The hardware profile in use (``auto`` resolved to this machine's)."""
        return detect_profile_name() if self.cfg.profile == "auto" else self.cfg.profile

    def _eta(self, step: int, now: float) -> float:
        t, s = (self._anchor_t, self._anchor_s) if self._anchored and step > self._anchor_s else (self._t0, self._s0)
        if step <= s:
            return math.nan
        return (now - t) / (step - s) * max(self._stop - step, 0)

    def _long_run_note(self, eta: float, step_s: float) -> str:
        c = self.cfg
        fits = max(int(SUGGESTED_RUN_S / step_s) // c.log_every * c.log_every, c.log_every)
        return (f"[train] note: ETA {duration(eta)} at the current speed ({step_s:.3g} s/step); on this machine "
                f"({self.profile()} profile, {self.device}) consider train.schedule.total_steps={fits} (about "
                f"{duration(fits * step_s)} here; now {c.schedule.total_steps}) or a smaller train.global_batch "
                f"(now {c.global_batch}), or a machine with a GPU")

    def _next_log(self, step: int) -> int:
        return min((step // self.cfg.log_every + 1) * self.cfg.log_every, self._stop)

    def _of(self, step: int) -> str:
        width = len(str(self._stop))
        return f"{step:>{width}}/{self._stop}"

    def _say(self, line: str) -> None:
        # The stream's write, not print(): Ray Train patches print() in its workers to go to its
        # logger and, when stdout is wrapped (our redacting stream), to stdout as well: twice.
        if self.enabled:
            out = self._out or sys.stdout
            out.write(line + "\n")
            out.flush()


def _num(value: float | None, fmt: str = ".4g") -> str:
    if value is None:
        return "n/a"
    return format(float(value), fmt) if math.isfinite(float(value)) else str(float(value))
