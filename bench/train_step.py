"""Trainer step time (DeepSpeed) vs a plain PyTorch AdamW loop on the same model and batches.

Claim: the Trainer (DeepSpeed ZeRO-1 engine, NaN guard, lr schedule, grad clipping) costs at
most 5% over a hand-written loop doing the same maths (issue #15), with and without compile.
The two alternate in rounds within one process, on identical models, optimizers and pre-made
batches; the ratio of median round times is printed.

    .venv/bin/python bench/train_step.py                  # CPU, one process, ~1 min
    .venv/bin/python bench/train_step.py --device cuda    # ViT-B/16 bf16: images/s and MFU

On CUDA the Trainer runs bf16 ZeRO-1 with SDPA flash attention; `--compile` adds
`torch.compile` to both sides (the Trainer through `TrainConfig.compile`, i.e. inside its
DeepSpeed engine; the baseline with `model.compile()`). The baseline is the same model under
bf16 autocast with fused AdamW, the standard hand-written mixed-precision loop.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import create_model, train_flops_per_image  # noqa: E402
from training import TrainConfig, Trainer, lr_at, param_groups  # noqa: E402
from training.config import EngineConfig, OptimConfig, ScheduleConfig
from training.metrics import device_name, mfu, peak_tflops  # noqa: E402


class Batches:
    """Cycles over pre-made batches; resumable like a real loader."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches, self.pos = batches, 0

    def __iter__(self):  # noqa: ANN204 - a plain generator
        while True:
            b = self.batches[self.pos % len(self.batches)]
            self.pos += 1
            yield b

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.pos = d["pos"]


def plain_loop(model: torch.nn.Module, cfg: TrainConfig, batches: list, device: torch.device):  # noqa: ANN201
    """The baseline: AdamW (same param groups, schedule, clipping) in a hand-written loop."""
    fused = True  # same kernel as the Trainer uses
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, fused=fused)
    amp = torch.autocast("cuda", torch.bfloat16) if cfg.engine.precision == "bf16" else torch.autocast("cpu", enabled=False)
    state = {"step": 0, "i": 0}

    def step() -> float:
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, state["step"])
        images, targets = batches[state["i"] % len(batches)]
        state["i"] += 1
        with amp:
            loss = torch.nn.functional.cross_entropy(model(images).float(), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        return loss.item()

    return step


def timed(fn, n: int, device: torch.device) -> float:  # noqa: ANN001
    return timed2(fn, n, device)[0]


def timed2(fn, n: int, device: torch.device) -> tuple[float, float]:  # noqa: ANN001
    """(wall s, process CPU s) per call. On a shared CPU box the CPU time is the steadier
    measure: time spent waiting for a core that another job holds is not counted."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--variant", default=None, help="default: Ti/16 on CPU, B/16 on CUDA")
    p.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="default 224, the paper's resolution: DeepSpeed's overhead is per parameter and per step, "
        "so a toy resolution (e.g. 64) measures the overhead, not training",
    )
    p.add_argument("--batch", type=int, default=None, help="micro batch (default 8 CPU, 256 CUDA)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="steps per round")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--profile", action="store_true", help="print the top ops of 3 steps of each side")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared box)")
    a = p.parse_args()
    cuda = a.device == "cuda"
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(a.threads)
    variant = a.variant or ("B/16" if cuda else "Ti/16")
    size = a.image_size
    batch = a.batch or (256 if cuda else 8)
    rounds = a.rounds or (5 if cuda else 3)
    steps = a.steps or (10 if cuda else 5)
    precision = "bf16" if cuda else "fp32"
    cfg = TrainConfig(global_batch=batch, micro_batch=batch, log_every=10**6, profile="h100" if cuda else "cpu", optim=OptimConfig(lr=1e-3), schedule=ScheduleConfig(warmup_steps=10, total_steps=10**6), engine=EngineConfig(zero_stage=1, precision=precision, compile=a.compile))
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    model = create_model(variant, num_classes=1000, image_size=size)
    baseline = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batches_cpu = [
        (torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)) for _ in range(4)
    ]
    if a.compile:
        baseline.compile()  # the Trainer compiles its model itself (cfg.engine.compile)
    trainer = Trainer(model, cfg, Batches(batches_cpu))
    device = trainer.dist.device
    dtype = torch.bfloat16 if cuda else torch.float32
    # Same batches on the device for both sides (the Trainer's .to() is then a no-op).
    dev_batches = [(x.to(device, dtype), y.to(device)) for x, y in batches_cpu]
    trainer.train_loader = Batches(dev_batches)
    baseline.to(device)
    plain = plain_loop(baseline, cfg, [(x.to(device), y) for x, y in dev_batches], device)

    # warm-up (allocator, kernels, compile) then alternate rounds
    timed(trainer.train_step, 3, device)
    timed(plain, 3, device)
    t_tr, t_pl, c_tr, c_pl = [], [], [], []
    for _ in range(rounds):
        for fn, wall, cpu in ((trainer.train_step, t_tr, c_tr), (plain, t_pl, c_pl)):
            w, c = timed2(fn, steps, device)
            wall.append(w)
            cpu.append(c)
    tr, pl = statistics.median(t_tr), statistics.median(t_pl)
    pairwise = statistics.median(a / b for a, b in zip(t_tr, t_pl, strict=True))
    name = device_name(device)
    print(f"device: {name}; model {variant} @ {size}px, micro batch {batch}, {precision}, "
          f"{rounds} rounds x {steps} steps, threads={torch.get_num_threads()}, compile={a.compile}")
    print(f"plain PyTorch AdamW loop : {pl * 1e3:8.1f} ms/step  {batch / pl:8.1f} images/s")
    print(f"Trainer (DeepSpeed ZeRO-1): {tr * 1e3:8.1f} ms/step  {batch / tr:8.1f} images/s")
    print(f"ratio Trainer / plain = {tr / pl:.3f}  (goal <= 1.05); median of per-round ratios {pairwise:.3f}")
    if not cuda:
        print(f"CPU-time ratio Trainer / plain = {statistics.median(c_tr) / statistics.median(c_pl):.3f} "
              f"(process CPU s per step {statistics.median(c_tr):.3f} / {statistics.median(c_pl):.3f}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        for label, fn in (("Trainer", trainer.train_step), ("plain", plain)):
            with profile(activities=acts) as prof:
                timed(fn, 3, device)
            print(f"--- {label}: top ops over 3 steps")
            print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))
    flops = train_flops_per_image(model.cfg)
    peak = peak_tflops(name, precision)
    for label, t in (("Trainer", tr), ("plain", pl)):
        achieved = flops * batch / t / 1e9
        print(f"{label:8s}: {achieved:9.1f} GFLOP/s achieved, MFU = {mfu(flops, batch / t, peak):.1%} "
              f"(peak {peak} TFLOP/s {precision}; NaN on CPU: no nominal CPU peak)")


if __name__ == "__main__":
    main()
