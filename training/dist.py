"""Process-group setup from the standard env vars (torchrun, deepspeed launcher, Ray Train)."""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, node-local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a single-process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Set ("pid:port") with the 1-process fallback's variables, which child processes inherit.
SOLO_ENV = "VITSCALE_SOLO_DIST_PID"
_SOLO_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Seconds the exit hook releases the GIL for, before and after destroying the group (_destroy_at_exit).
_EXIT_DRAIN_S = 0.05


def _inherited_solo_vars() -> bool:
    """True when RANK/.../MASTER_PORT are another process's 1-process fallback, unchanged: the
    marker names another pid and the port is still the one it picked. A launcher that sets a
    rank's variables (torchrun, Ray Train, a test's spawner) sets another port: kept."""
    pid, _, port = os.environ.get(SOLO_ENV, "").partition(":")
    return bool(pid) and pid != str(os.getpid()) and os.environ.get("MASTER_PORT") == port


def init_distributed() -> DistInfo:
    """Join (or create) the default process group and pick this rank's device.

    Uses an existing group when one is initialised (Ray Train's TorchTrainer does that), else
    RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from the environment (torchrun, the
    deepspeed launcher); with none of them set, a 1-rank group on a free local port.
    Backend: nccl with CUDA, gloo on CPU.
    """
    import deepspeed  # heavy import; only when a Trainer is built

    cuda = torch.cuda.is_available()
    if not cuda:
        _plain_gloo_collectives()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        if _inherited_solo_vars():
            # A parent's 1-process fallback below, inherited unchanged (a launcher would have set
            # its own): its port is the parent's, still listening (seen: every Tune trial of a
            # study started from a process that had trained in-process failed with EADDRINUSE).
            for k in (*_SOLO_VARS, SOLO_ENV):
                os.environ.pop(k, None)
        if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
            os.environ.update(
                RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
            )
            os.environ[SOLO_ENV] = f"{os.getpid()}:{os.environ['MASTER_PORT']}"  # children: not a launcher's
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"distributed env incomplete: {missing} not set (set all of RANK, WORLD_SIZE, "
                               f"MASTER_ADDR, MASTER_PORT, or none of them for a single process)")
    created = not dist.is_initialized()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if created:
        atexit.register(_destroy_at_exit)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def _destroy_at_exit() -> None:
    """Tear down the group this module created, and let gloo's threads finish, before the
    interpreter's finalization starts.

    A rank sometimes aborted *after* a successful run, "terminate called without an active
    exception" (exit -6; a job runner reads it as a failed job). The core dump: a gloo worker
    thread freeing its last finished all-gather, whose tensor still had a Python object, asked
    for the GIL while the interpreter was finalizing; Python ends such a thread with
    pthread_exit, whose unwind crossed a noexcept destructor. The worker asks for the GIL right
    after the collective completes, so a short GIL-free wait here lets it finish first. A group
    someone else created (Ray Train) is theirs to destroy.
    """
    time.sleep(_EXIT_DRAIN_S)  # GIL released: threads waiting for it run now, not in finalization
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as exc:  # exiting anyway: say why, do not mask the exit status
            print(f"vitscale: destroy_process_group at exit failed: {exc}", flush=True)
    time.sleep(_EXIT_DRAIN_S)


def _plain_gloo_collectives() -> None:
    """On CPU, keep DeepSpeed's collectives on gloo instead of its JIT-built shm comm op.

    The op is compiled (ninja + c++) in every fresh process behind a machine-wide lock in
    ~/.cache/torch_extensions, and its all-reduce path made a 1-process ZeRO-1 step ~1.8x
    slower than a plain loop here; gloo is what a CPU run needs.
    """
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError, TypeError):  # a DeepSpeed without the table
        pass


def barrier() -> None:
    """Barrier on the default group (no-op without one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op for a single rank); returns `t`."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            on_gpu = t.cuda()
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            t.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class CollectiveTimeout(RuntimeError):
    """A collective that waits on another rank's I/O did not complete in time."""


#: Bytes each rank may contribute to `exchange_json` (errors are truncated to fit).
EXCHANGE_BYTES = 8192


def exchange_json(obj: Any, *, what: str, timeout_s: float) -> list[Any]:
    """Every rank's JSON-able `obj`, in rank order (an all-gather; `[obj]` without a group).

    The one collective the checkpoint protocol agrees through: rank 0's entry is a decision
    every rank then follows, the others' entries say whether each rank succeeded. Values travel
    as JSON bytes in a tensor (no pickle), and the wait is bounded: after `timeout_s` this rank
    raises CollectiveTimeout naming `what`, instead of hanging on a rank that died or is stuck.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [json.loads(json.dumps(obj))]
    data = json.dumps(obj).encode()
    if len(data) > EXCHANGE_BYTES:
        raise ValueError(f"{what}: {len(data)} bytes of JSON to exchange, more than {EXCHANGE_BYTES}")
    device = _collective_device()
    buf = torch.full((EXCHANGE_BYTES,), ord(" "), dtype=torch.uint8)  # JSON ignores trailing spaces
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(device)
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    work = dist.all_gather(out, buf, async_op=True)
    wait(work, what=what, timeout_s=timeout_s)
    return [json.loads(t.cpu().numpy().tobytes().decode()) for t in out]


def wait(work: Any, *, what: str, timeout_s: float) -> None:
    """Wait for an async collective at most `timeout_s`; CollectiveTimeout names `what` and the fix."""
    try:
        work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as e:
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise CollectiveTimeout(
            f"rank {rank}: {what} did not complete within {timeout_s:.0f} s: another rank died or is stuck "
            f"(its log says why), so this worker fails instead of waiting forever. If checkpoint I/O is "
            f"legitimately this slow, raise TrainConfig.io_timeout_s ({e})"
        ) from e


def timed_barrier(*, what: str, timeout_s: float) -> None:
    """A barrier that fails this rank with CollectiveTimeout after `timeout_s` (no-op without a group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        work = dist.all_reduce(torch.zeros(1, device=_collective_device()), async_op=True)
        wait(work, what=what, timeout_s=timeout_s)


def _collective_device() -> torch.device:
    """Where collective buffers must live: the current GPU under nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def agree(what: str, fn: Callable[[], Any], *, timeout_s: float, share: bool = False) -> Any:
    """Run `fn` here, then one bounded collective in which every rank reports success or its
    error; if any rank failed, every rank raises (this rank's own error, or one naming the
    failed ranks). Returns `fn`'s result, or with `share` every rank's results in rank order.

    Anything that may fail or wait on I/O in a multi-rank protocol (the checkpoint commit,
    resume) goes through here, so all ranks run the same sequence of collectives whatever
    happens: then all raise or all go on, and none waits forever on a rank that gave up.
    """
    result: Any = None
    error: BaseException | None = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised below
        error = e
    text = f"{type(error).__name__}: {error}"[: EXCHANGE_BYTES // 8] if error is not None else None
    replies = exchange_json({"result": result if share else None, "error": text}, what=what, timeout_s=timeout_s)
    failed = [(r, x["error"]) for r, x in enumerate(replies) if x["error"] is not None]
    if error is not None:
        raise error
    if failed:
        ranks = [r for r, _ in failed]
        raise RuntimeError(f"{what} failed on rank(s) {ranks}; rank {ranks[0]}: {failed[0][1]}")
    return [x["result"] for x in replies] if share else result
