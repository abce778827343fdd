"""DataLoader workers leave a SIGTERM meant for the training process to it (``worker_init_fn``).

See :func:`leave_sigterm_to_the_parent`: a preemption signal sent to the whole process group
must reach the training loop's checkpoint-and-stop path, not kill its loader workers first.
"""

from __future__ import annotations

import os
import signal
import threading

#: How often a DataLoader worker checks that the process that forked it still exists.
PARENT_CHECK_S = 1.0


def leave_sigterm_to_the_parent(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: a SIGTERM meant for the training process is not this worker's.

    Launchers stop a rank by signalling its whole process group (``torchrun`` does
    ``os.killpg``; a container stop or a node shutdown signals every process), so the
    DataLoader workers get the preemption SIGTERM too. torch's worker handler dies on any SIGTERM
    not sent by its parent, and the main process then raises "DataLoader worker exited
    unexpectedly" in the middle of the step it was to finish and checkpoint. Here SIGTERM is
    blocked and one thread takes it with its sender: from the parent (the DataLoader shutting a
    worker down) the worker exits 0 as torch's handler does; from anyone else it is ignored, the
    main process decides (finish the step, save, stop the loader). The same thread ends a worker
    whose parent is gone (``os._exit`` after a preemption save or a hang dump) within
    :data:`PARENT_CHECK_S`, even one stuck in a read.
    """
    if not hasattr(signal, "sigtimedwait"):  # macOS, Windows: torch's own handling stays
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it

    def watch() -> None:
        while True:
            info = signal.sigtimedwait({signal.SIGTERM}, PARENT_CHECK_S)
            if os.getppid() != parent or (info is not None and info.si_pid == parent):
                os._exit(0)

    threading.Thread(target=watch, name="vitscale-loader-sigterm", daemon=True).start()
