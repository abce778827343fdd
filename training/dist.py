"""Process-group setup from the standard env vars (torchrun, deepspeed launcher, Ray Train)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

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
        if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
            os.environ.update(
                RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
            )
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"distributed env incomplete: {missing} not set (set all of RANK, WORLD_SIZE, "
                               f"MASTER_ADDR, MASTER_PORT, or none of them for a single process)")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


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
