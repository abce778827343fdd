"""Preemption: SIGTERM -> finish the step, every rank saves together, exit 0 within a grace.

A preemptible node gets SIGTERM and a grace period (Kubernetes: 30 s by default) before
SIGKILL. The Trainer installs :meth:`Preemption.install`'s handler, which only records the
request (a signal handler must not do I/O or collectives); the train loop calls
:meth:`Preemption.poll` once per optimizer step on every rank, and when it says "stop" every
rank writes a checkpoint of the current step through the usual commit protocol and leaves
with :class:`Preempted` (``SystemExit(0)``).

Agreement costs one all-reduce of one int per step, issued asynchronously on a CPU (gloo) group
and read one step later, when it has long completed: no device sync, and no rank waits for
another there (the gradient all-reduce already keeps them in step). So the save happens at the
end of the step after the one in flight when the signal came; nothing is lost either way.

If the save cannot finish within the grace (slow S3), a timer started at the signal exits the
process with 0 before SIGKILL would, saying so: the half-written checkpoint has no commit
marker, so the previous complete one stays the newest and the restart resumes from there.
Works under torchrun, the deepspeed launcher and anything that runs the Trainer in the main
thread (signals can only be handled there; elsewhere the handler is not installed and says so).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from training.dist import wait


class Preempted(SystemExit):
    """Raised by `Trainer.fit` after a preemption checkpoint: exits the process with code 0."""

    def __init__(self, step: int, tag: str | None) -> None:
        super().__init__(0)
        self.step, self.tag = step, tag


def say(msg: str) -> None:
    """One line to stderr, unbuffered (the process may be killed right after)."""
    try:
        os.write(2, (msg.rstrip("\n") + "\n").encode())
    except OSError:
        pass


class Preemption:
    """SIGTERM handling and the once-per-step agreement on stopping (see the module doc).

    `grace_s`: seconds from the signal to the forced exit; `timeout_s` bounds the flag's
    collective (a rank that never shows up fails instead of hanging). `what_is_lost()` names,
    for the forced-exit message, the checkpoint the restart will resume from.
    """

    def __init__(self, grace_s: float, rank: int, world_size: int, *, timeout_s: float,
                 what_is_lost: Callable[[], str]) -> None:
        self.grace_s, self.rank, self.world_size, self.timeout_s = grace_s, rank, world_size, timeout_s
        self.what_is_lost = what_is_lost
        self.requested_at: float | None = None  # time.monotonic() of the signal (or of the agreement)
        self.signal_step: int | None = None  # this rank's step when its signal came
        self.step = 0  # kept current by the Trainer, for the handler's message
        self.finished = False
        self._timer: threading.Timer | None = None
        self._old_handler: Any = None
        self._installed = False
        self._pid = os.getpid()
        self._pending: tuple[Any, torch.Tensor] | None = None
        # A CPU group even under nccl: the flag never touches the device.
        self._group = None
        if world_size > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")

    # ------------------------------------------------------------------ signal side
    def install(self) -> None:
        """Handle SIGTERM in this process (main thread only; elsewhere say why not)."""
        if self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            say(f"rank {self.rank}: preemption handler not installed: the Trainer runs outside the main thread, "
                "where Python cannot handle signals; SIGTERM keeps its default action (the restart resumes "
                "from the newest checkpoint). Run fit() in the main thread to checkpoint on SIGTERM")
            return
        self._pid = os.getpid()
        self._old_handler = signal.signal(signal.SIGTERM, self._on_signal)
        self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._old_handler if self._old_handler is not None else signal.SIG_DFL)
            self._installed = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker inherited the handler: die as usual
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if self.requested_at is not None:
            return
        self.signal_step = self.step
        self._start_grace()
        say(f"rank {self.rank}: SIGTERM at step {self.step}: finishing the step, then every rank saves a "
            f"checkpoint and exits 0 (grace {self.grace_s:.0f} s)")

    def _start_grace(self) -> None:
        self.requested_at = time.monotonic()
        margin = min(2.0, 0.1 * self.grace_s)  # exit before the platform's SIGKILL, not at it
        self._timer = threading.Timer(max(self.grace_s - margin, 0.0), self._out_of_time)
        self._timer.daemon = True
        self._timer.start()

    def _out_of_time(self) -> None:
        if self.finished:
            return
        since = time.monotonic() - (self.requested_at or time.monotonic())
        say(f"rank {self.rank}: preemption: the checkpoint of step {self.step} did not finish within "
            f"preempt_grace_s={self.grace_s:g} (slow storage?); exiting 0 without it, {since:.1f} s after the stop request. It has no commit marker, "
            f"so {self.what_is_lost()}. Raise preempt_grace_s (and the platform's grace period) if saves need longer")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(0)

    def remaining_s(self) -> float:
        """Seconds left of the grace (the full grace when no stop was requested)."""
        if self.requested_at is None:
            return self.grace_s
        return max(self.grace_s - (time.monotonic() - self.requested_at), 0.0)

    def done(self) -> None:
        """The preemption save finished (or was not needed): the timer must not fire."""
        self.finished = True
        if self._timer is not None:
            self._timer.cancel()

    # ------------------------------------------------------------------ loop side
    def poll(self) -> bool:
        """Every rank, once per optimizer step: True when every rank must stop now.

        One rank: this process's own flag. Several: the previous step's all-reduce (MAX) of
        every rank's flag decides, so all ranks decide the same at the same step; then this
        step's flag goes out asynchronously.
        """
        if self.world_size == 1:
            return self.requested_at is not None
        stop = False
        if self._pending is not None:
            work, flag = self._pending
            self._pending = None
            wait(work, what="agreeing on preemption", timeout_s=self.timeout_s)
            stop = bool(flag.numpy()[0])  # a CPU tensor: no device sync
        if stop:
            if self.requested_at is None:  # another rank was signalled: its grace is ours too
                self._start_grace()
            return True
        flag = torch.tensor([1 if self.requested_at is not None else 0], dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, flag)
        return False

    def drain(self) -> None:
        """End of fit: complete the outstanding flag collective (every rank has one)."""
        if self._pending is not None:
            work, _ = self._pending
            self._pending = None
            wait(work, what="agreeing on preemption", timeout_s=self.timeout_s)
