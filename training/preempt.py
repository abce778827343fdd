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
thread (signals can only be handled there). A launcher that runs the Trainer in another thread
(Ray Train runs the train function in a thread of its worker actor) hands :meth:`Preemption.attach`
a `run_on_main_thread` callable; the handler is then installed by the process's main thread
(the actor's own task loop), which also runs it. Without one, the handler is not installed and
the Trainer says so.

A launcher can also pass a `notice`: a cheap callable polled once per step that returns the
deadline (``time.time()`` seconds; ``math.inf`` when none was given) while the platform
announces an imminent preemption of some rank's node (Ray Train's drain-based preemption
info), else None. On a notice every rank saves a checkpoint together at once (in case the
deadline is missed) and training goes on; when the deadline comes within `jit_margin_s()` (two
of the slowest saves seen plus three steps and 2 s) every rank saves once more, so the restart
recomputes only the few steps after that. After that last save every rank holds (no more steps:
the restart would recompute them) until the deadline plus `RECLAIM_GRACE_S`, while the platform
tears the group down; if it does not (a cancelled drain), training goes on. A signal (flag STOP)
outranks a notice (flag SAVE) in the agreement.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from training.dist import wait

#: What :meth:`Preemption.poll` decides for this step (the all-reduce takes the MAX).
GO, SAVE, STOP = 0, 1, 2

#: The Preemption whose handler is installed in this process (a signal handler is process-wide;
#: a module global, so that the install function can be sent by reference to the main thread).
_ACTIVE: Preemption | None = None
_PREVIOUS: Any = None  # the handler ours replaced (Ray's worker installs one)


def _handle_sigterm(signum: int, frame: Any) -> None:
    p = _ACTIVE
    if p is None or os.getpid() != p._pid:
        # A forked DataLoader worker inherited the handler, or no run is active: die as usual.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    p._on_signal(signum, frame)


def install_sigterm_handler() -> None:
    """Install the active Preemption's SIGTERM handler; must run on the process's main thread."""
    global _PREVIOUS
    previous = signal.signal(signal.SIGTERM, _handle_sigterm)
    if previous is not _handle_sigterm:
        _PREVIOUS = previous


def restore_sigterm_handler() -> None:
    """Put back the handler `install_sigterm_handler` replaced; main thread only."""
    global _PREVIOUS
    signal.signal(signal.SIGTERM, _PREVIOUS if _PREVIOUS is not None else signal.SIG_DFL)
    _PREVIOUS = None


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


#: How long past a notice's deadline the ranks hold after their last save before deciding the
#: platform is not reclaiming the node after all (a cancelled drain) and training on.
RECLAIM_GRACE_S = 15.0


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
        self._installed: str | None = None  # "main" or "runner": how the handler got installed
        self.run_on_main_thread: Callable[[Callable[[], None]], None] | None = None
        self.notice: Callable[[], float | None] | None = None
        self.notice_saves = 0  # agreed saves for the current notice: 0, 1 (at once), 2 (near the deadline)
        self.save_s = 0.0  # the slowest checkpoint save seen (the Trainer keeps it current)
        self.step_s = 0.0  # the last interval between two polls (one optimizer step)
        self._last_poll: float | None = None
        self._pid = os.getpid()
        self._pending: tuple[Any, torch.Tensor] | None = None
        # A CPU group even under nccl: the flag never touches the device.
        self._group = None
        if world_size > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")

    # ------------------------------------------------------------------ signal side
    def attach(self, *, run_on_main_thread: Callable[[Callable[[], None]], None] | None = None,
               notice: Callable[[], float | None] | None = None) -> None:
        """Launcher hooks (see the module doc): how to run a function on the main thread when the
        Trainer does not run there, and a per-step preemption notice."""
        self.run_on_main_thread, self.notice = run_on_main_thread, notice

    def install(self) -> None:
        """Handle SIGTERM in this process (on the main thread, directly or through the runner)."""
        global _ACTIVE
        if self._installed:
            return
        self._pid = os.getpid()
        _ACTIVE = self
        try:
            if threading.current_thread() is threading.main_thread():
                install_sigterm_handler()
                self._installed = "main"
            elif self.run_on_main_thread is not None:
                self.run_on_main_thread(install_sigterm_handler)
                self._installed = "runner"
        except Exception as e:  # noqa: BLE001 - training goes on; SIGTERM keeps its old meaning
            say(f"rank {self.rank}: preemption handler not installed ({type(e).__name__}: {e}); SIGTERM keeps "
                "its default action (the restart resumes from the newest checkpoint)")
        if not self._installed:
            _ACTIVE = None
            if self.run_on_main_thread is None:
                say(f"rank {self.rank}: preemption handler not installed: the Trainer runs outside the main thread, "
                    "where Python cannot handle signals, and no run_on_main_thread was attached; SIGTERM keeps its "
                    "default action (the restart resumes from the newest checkpoint)")

    def uninstall(self) -> None:
        global _ACTIVE
        how, self._installed = self._installed, None
        try:
            if how == "main":
                restore_sigterm_handler()
            elif how == "runner" and self.run_on_main_thread is not None:
                self.run_on_main_thread(restore_sigterm_handler)
        except Exception as e:  # noqa: BLE001 - the handler stays; with _ACTIVE gone it dies as usual
            say(f"rank {self.rank}: could not restore the previous SIGTERM handler ({type(e).__name__}: {e})")
        if _ACTIVE is self:
            _ACTIVE = None

    def _on_signal(self, signum: int, frame: Any) -> None:
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
        self.exit_now(f"preemption: the checkpoint of step {self.step} did not finish within "
                      f"preempt_grace_s={self.grace_s:g} (slow storage?); exiting 0 without it, {since:.1f} s after "
                      f"the stop request. It has no commit marker, so {self.what_is_lost()}. Raise preempt_grace_s "
                      "(and the platform's grace period) if saves need longer")

    def exit_now(self, why: str) -> NoReturn:
        """Leave the process with 0 at once (no interpreter teardown), saying why."""
        self.done()
        say(f"rank {self.rank}: {why}")
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
    def poll(self) -> int:
        """Every rank, once per optimizer step: GO, SAVE (a notice: save once, go on) or STOP.

        One rank: this process's own flag. Several: the previous step's all-reduce (MAX) of
        every rank's flag decides, so all ranks decide the same at the same step; then this
        step's flag goes out asynchronously.
        """
        now = time.monotonic()
        if self._last_poll is not None:
            self.step_s = now - self._last_poll
        self._last_poll = now
        if self.world_size == 1:
            return self._agreed(self._local_flag())
        decided = GO
        if self._pending is not None:
            work, flag = self._pending
            self._pending = None
            wait(work, what="agreeing on preemption", timeout_s=self.timeout_s)
            decided = self._agreed(int(flag.numpy()[0]))  # a CPU tensor: no device sync
        if decided == STOP:
            return STOP
        flag = torch.tensor([self._local_flag()], dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, flag)
        return decided

    def _local_flag(self) -> int:
        if self.requested_at is not None:
            return STOP
        if self.notice is None or self.notice_saves >= 2:
            return GO
        try:
            deadline = self.notice()
        except Exception as e:  # noqa: BLE001 - a broken notice must not stop training
            say(f"rank {self.rank}: preemption notice failed ({type(e).__name__}: {e}); ignoring it from now on")
            self.notice = None
            return GO
        if deadline is None:
            return GO
        if self.notice_saves == 0 or deadline - time.time() <= self.jit_margin_s():
            return SAVE
        return GO

    def reclaim_expected_by(self) -> float | None:
        """After the agreed save just before the deadline: until when (``time.time()``) to hold for
        the reclaim, None when there is nothing to wait for (no notice, no deadline, or fewer than
        two saves)."""
        if self.notice is None or self.notice_saves < 2:
            return None
        try:
            deadline = self.notice()
        except Exception:  # noqa: BLE001 - a broken notice: train on (it is dropped at the next poll)
            return None
        if deadline is None or deadline == float("inf"):
            return None
        return deadline + RECLAIM_GRACE_S

    def jit_margin_s(self) -> float:
        """How long before a notice's deadline the last save starts: the agreement takes a step,
        the save then needs its time; doubled, plus slack, for a slower storage on the day."""
        return 2.0 * self.save_s + 3.0 * self.step_s + 2.0

    def _agreed(self, decided: int) -> int:
        if decided == STOP and self.requested_at is None:  # another rank was signalled: its grace is ours too
            self._start_grace()
        if decided == SAVE:
            self.notice_saves += 1  # the same count on every rank: it follows agreed results only
        return decided

    def drain(self) -> None:
        """End of fit: complete the outstanding flag collective (every rank has one)."""
        if self._pending is not None:
            work, _ = self._pending
            self._pending = None
            wait(work, what="agreeing on preemption", timeout_s=self.timeout_s)
