"""The one seam for rank-0 side effects (MetricsSink), device peak FLOP/s and MFU."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

# Dense peak TFLOP/s per device (vendor datasheets, no sparsity). Matched by substring of
# torch.cuda.get_device_name(), first match wins, so the specific names come first.
# fp32 on Ampere+ is TF32 tensor-core throughput (what torch uses with allow_tf32).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIE": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},  # SXM
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "H20": {"bf16": 148.0, "fp16": 148.0, "fp32": 74.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0},
    "V100": {"bf16": float("nan"), "fp16": 125.0, "fp32": 15.7},
    "T4": {"bf16": float("nan"), "fp16": 65.0, "fp32": 8.1},
}


def device_name(device: torch.device | str) -> str:
    """Human name of `device` ('cpu' or the CUDA device name)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def peak_tflops(name: str, precision: str) -> float:
    """Peak dense TFLOP/s of one device called `name` at `precision`; NaN if unknown.

    CPUs have no entry on purpose: their peak depends on cores, clocks and AVX width, so on CPU
    the Trainer reports achieved TFLOP/s and `mfu` = NaN rather than a made-up ratio.
    """
    upper = name.upper()
    for key, table in PEAK_TFLOPS.items():
        if key in upper:
            return table.get(precision, float("nan"))
    return float("nan")


def mfu(flops_per_image: float, images_per_s: float, peak: float, n_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over `n_devices` x `peak` TFLOP/s (0..1)."""
    if not (peak > 0) or math.isnan(peak):
        return float("nan")
    return flops_per_image * images_per_s / (peak * 1e12 * n_devices)


@runtime_checkable
class MetricsSink(Protocol):
    """Where the Trainer's metrics go (MLflow in orchestration). Called on rank 0 only."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None: ...

    def on_eval(self, model: nn.Module, step: int) -> None:
        """After each evaluation, with the (gathered) model in eval mode, e.g. attention maps."""
        ...

    def close(self) -> None: ...


class NullSink:
    """Discards everything (ranks other than 0, or no tracking)."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        pass

    def on_eval(self, model: nn.Module, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink(NullSink):
    """Appends one JSON line per call to `path` (local runs, tests, benches)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def log_params(self, params: dict[str, Any]) -> None:
        self._write({"params": params})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._write({"step": step, **metrics})
