"""The cards a plan can target, the measured speeds it builds on, and where each number comes from.

Peak FLOP/s are ``training.metrics.PEAK_TFLOPS`` (the Trainer's MFU uses the same table). The
MFU is the Trainer's own, measured on our runs (BENCHMARKS.md, "training: Trainer step vs a plain
PyTorch AdamW loop", B/16 bf16, micro batch 256); a card we have not measured borrows the
H100's, and says so. Interconnect bandwidths are the usual NCCL bus bandwidths of such nodes,
assumed (this project has no multi-node GPU measurement yet).
"""

from __future__ import annotations

from dataclasses import dataclass

from training.metrics import PEAK_TFLOPS

_GPU_BENCH = "the Trainer, B/16 bf16 micro 256 (BENCHMARKS.md, bench/gpu.sh)"


@dataclass(frozen=True)
class Device:
    """One kind of accelerator in a node of ``per_node`` of them.

    ``mfu`` / ``mfu_compiled``: model FLOPs utilisation of the Trainer, eager and under
    ``train.engine.compile``; ``achieved_tflops`` replaces peak x MFU where a peak means nothing
    (CPUs); ``intra_gbs`` / ``inter_gbs``: all-reduce bus bandwidth per GPU inside a node and
    across nodes, GB/s.
    """

    key: str
    title: str
    memory_gb: float
    peak: dict[str, float]
    mfu: float
    mfu_compiled: float
    mfu_source: str
    per_node: int
    intra_gbs: float
    inter_gbs: float
    achieved_tflops: float | None = None

    def tflops(self, precision: str, compiled: bool) -> float:
        """Model TFLOP/s one device sustains at ``precision`` (peak x measured MFU)."""
        if self.achieved_tflops is not None:
            return self.achieved_tflops
        peak = self.peak.get(precision, float("nan"))
        if not peak == peak:  # NaN: the card has no such precision
            raise ValueError(f"{self.title} has no {precision} throughput (T4: no bf16); set "
                             f"train.engine.precision=fp16 (or fp32)")
        return peak * (self.mfu_compiled if compiled else self.mfu)


_H100_MFU = dict(mfu=0.264, mfu_compiled=0.299)

DEVICES: dict[str, Device] = {
    "h100": Device("h100", "NVIDIA H100 80GB SXM", 80, PEAK_TFLOPS["H100"], **_H100_MFU,
                   mfu_source=f"{_GPU_BENCH}: compiled 29.9 % on an H100; eager 26.4 % on an H200 (same peak; "
                              "no eager Trainer run on an H100)",
                   per_node=8, intra_gbs=360.0, inter_gbs=40.0),
    "h200": Device("h200", "NVIDIA H200 141GB", 141, PEAK_TFLOPS["H200"], mfu=0.264, mfu_compiled=0.312,
                   mfu_source=f"{_GPU_BENCH}: H200, eager 26.4 % (25.8-26.9), compiled 31.2 %",
                   per_node=8, intra_gbs=360.0, inter_gbs=40.0),
    "a100": Device("a100", "NVIDIA A100 80GB SXM", 80, PEAK_TFLOPS["A100"], **_H100_MFU,
                   mfu_source=f"not measured on an A100: the H100's MFU ({_GPU_BENCH})",
                   per_node=8, intra_gbs=230.0, inter_gbs=20.0),
    "t4": Device("t4", "NVIDIA T4 16GB", 16, PEAK_TFLOPS["T4"], **_H100_MFU,
                 mfu_source=f"not measured on a T4: the H100's MFU ({_GPU_BENCH})",
                 per_node=4, intra_gbs=10.0, inter_gbs=1.5),
    # One training process on one core of the dev machine: what the CPU checks of tests/test_plan.py run.
    "cpu": Device("cpu", "one CPU core (dev-2c)", 24, {}, mfu=float("nan"), mfu_compiled=float("nan"),
                  mfu_source="the Trainer, Ti/16 224 px batch 8, 1 thread fp32, dev-2c idle: 810 ms/step = "
                             "0.0745 TFLOP/s achieved (BENCHMARKS.md)",
                  per_node=1, intra_gbs=10.0, inter_gbs=1.0, achieved_tflops=0.0745),
}

#: CPU time to decode one training image and hand it on, seconds: the loader at num_workers=0
#: (a ~500x375 JPEG to a 224 px crop: our region decode + resize 0.71 ms, the per-sample sha256,
#: read and batch write 0.10-0.12 ms) + the main process (0.01 ms); BENCHMARKS.md, "the loader
#: against its peers", session 10 (dev-2c, quiet).
DECODE_S = 0.85e-3
DECODE_SOURCE = "BENCHMARKS.md loader vs peers (dev-2c, session 10): loader 0.81-0.84 ms/img in-process + main 0.01 ms"
#: Mean stored bytes of a sample when no --data is given: ImageNet-1k's training JPEGs (~138 GB /
#: 1.28M images) plus the two tar members' 512-byte headers and padding.
DEFAULT_SAMPLE_BYTES = 110_000
#: write_shards' default shard size (pipeline/write_shards.py).
DEFAULT_SAMPLES_PER_SHARD = 1000
#: Requests per shard a rank opens: its rows file and one streaming Range GET of the tar (pipeline/stream.py).
REQUESTS_PER_SHARD = 2
#: S3's documented request rate per partitioned prefix (GET/HEAD).
S3_GET_PER_PREFIX = 5500


def get_device(name: str) -> Device:
    """The device called ``name``; ValueError listing the known ones."""
    key = name.strip().lower()
    if key not in DEVICES:
        raise ValueError(f"unknown --gpu {name!r}; choose one of {', '.join(DEVICES)}")
    return DEVICES[key]
