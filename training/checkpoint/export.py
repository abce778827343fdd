"""Consolidated weights out of a DeepSpeed engine (or a plain module) as safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_weights(
    engine_or_model: Any, path: str | Path, dtype: str = "fp32", metadata: dict[str, str] | None = None,
    prefix: str = "",
) -> Path | None:
    """Write consolidated weights as safetensors (param names as in `model.named_parameters()`).

    Accepts a plain nn.Module or a DeepSpeed engine; under ZeRO-3 the partitioned parameters
    are gathered first, so every rank must call this (collective). Rank 0 writes the file and
    gets its path; other ranks get None. `dtype` is "fp32", "bf16" or "fp16". `prefix` keeps only
    the tensors under it, named without it (``"encoder."``: an MAE's encoder on its own).
    """
    from safetensors.torch import save_file

    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {list(_DTYPES)}")
    torch_dtype = _DTYPES[dtype]
    module: nn.Module = getattr(engine_or_model, "module", engine_or_model)
    stage = engine_or_model.zero_optimization_stage() if hasattr(engine_or_model, "zero_optimization_stage") else 0
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def snapshot() -> dict[str, torch.Tensor]:
        # only floating tensors take the export dtype: a BatchNorm's num_batches_tracked (int64) stays
        # an integer, or a convnet's export would not load back (the loader refuses int <- float casts)
        return {k[len(prefix):]: v.detach().to("cpu", torch_dtype if v.is_floating_point() else v.dtype)
                .contiguous().clone() for k, v in module.state_dict().items() if k.startswith(prefix)}

    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            sd = snapshot() if rank == 0 else {}
    else:
        sd = snapshot() if rank == 0 else {}
    if rank != 0:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "dtype": dtype, **(metadata or {})}
    save_file(sd, str(path), metadata={k: str(v) for k, v in meta.items()})
    return path
