"""Trainer step time per architecture of timm's zoo vs timm's own model in a plain PyTorch loop.

Claim (#25): for every architecture the pipeline trains (DeiT, Swin, PVT-v2, CaiT, BEiT, ResNet),
our Trainer (DeepSpeed ZeRO-1 engine, NaN guard, lr schedule, clipping) over the network our
pipeline builds (``model.TimmSpec`` -> ``build_network``) costs at most 5% more per step than
``timm.create_model(name)`` trained by a hand-written AdamW loop doing the same maths: the
pipeline adds no per-architecture overhead. As ``bench/train_step.py`` does for our ViT: both
sides have the same weights (copied), optimizer groups, schedule and pre-made batches, and run
alternately in rounds in one process; the ratio of median round times is printed per model.

    .venv/bin/python bench/arch_step.py                              # CPU: the small sizes at 224 px
    .venv/bin/python bench/arch_step.py --archs swin_tiny_patch4_window7_224 --rounds 5
    .venv/bin/python bench/arch_step.py --device cuda --batch 128    # bf16, every architecture
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import Batches, plain_loop, timed, timed2  # noqa: E402

from model import TimmSpec, build_network, train_flops_per_image  # noqa: E402
from training import TrainConfig, Trainer  # noqa: E402
from training.config import EngineConfig, OptimConfig, ScheduleConfig  # noqa: E402
from training.metrics import device_name, mfu, peak_tflops  # noqa: E402

#: The small size of each architecture (its recipe's, orchestration/experiment/recipes_zoo.py).
CPU_ARCHS = ("deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "pvt_v2_b0", "cait_xxs24_224", "resnet18")
GPU_ARCHS = (*CPU_ARCHS[:4], "beit_base_patch16_224", "resnet50")


def bench_one(name: str, a: argparse.Namespace, cuda: bool) -> dict[str, float]:
    import timm

    size, batch = a.image_size, a.batch or (128 if cuda else 8)
    precision = "bf16" if cuda else "fp32"
    cfg = TrainConfig(global_batch=batch, micro_batch=batch, log_every=10**6, profile="h100" if cuda else "cpu",
                      optim=OptimConfig(lr=1e-3), schedule=ScheduleConfig(warmup_steps=10, total_steps=10**6),
                      engine=EngineConfig(zero_stage=1, precision=precision))
    torch.manual_seed(0)
    spec_cfg = TimmSpec(name=name).config(num_classes=1000, image_size=size)
    ours = build_network(spec_cfg)
    img = {"img_size": size} if spec_cfg.family.img_size else {}
    baseline = timm.create_model(name, pretrained=False, num_classes=1000, drop_rate=0.0, drop_path_rate=0.0, **img)
    baseline.load_state_dict(copy.deepcopy(ours.state_dict()))  # timm's model, our weights
    g = torch.Generator().manual_seed(0)
    batches_cpu = [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g))
                   for _ in range(4)]
    trainer = Trainer(ours, cfg, Batches(batches_cpu), console=False)
    device = trainer.dist.device
    dtype = torch.bfloat16 if cuda else torch.float32
    dev_batches = [(x.to(device, dtype), y.to(device)) for x, y in batches_cpu]
    trainer.train_loader = Batches(dev_batches)
    baseline.to(device)
    plain = plain_loop(baseline, cfg, [(x.to(device), y) for x, y in dev_batches], device)
    timed(trainer.train_step, 2, device)  # warm-up: allocator, kernels, DeepSpeed's first step
    timed(plain, 2, device)
    t_tr, t_pl, c_tr, c_pl = [], [], [], []
    for _ in range(a.rounds):
        for fn, wall, cpu in ((trainer.train_step, t_tr, c_tr), (plain, t_pl, c_pl)):
            w, c = timed2(fn, a.steps, device)
            wall.append(w)
            cpu.append(c)
    tr, pl = statistics.median(t_tr), statistics.median(t_pl)
    flops = train_flops_per_image(spec_cfg)
    peak = peak_tflops(device_name(device), precision)
    out = {"trainer_ms": tr * 1e3, "plain_ms": pl * 1e3, "ratio": tr / pl,
           "pairwise": statistics.median(x / y for x, y in zip(t_tr, t_pl, strict=True)),
           "cpu_ratio": statistics.median(c_tr) / statistics.median(c_pl), "gmacs": flops / 6e9,
           "mfu": mfu(flops, batch / tr, peak)}
    del trainer
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--archs", default=None, help="comma-separated timm names (default: each family's small size)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=None, help="micro batch (default 8 CPU, 128 CUDA)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="steps per round")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared box)")
    a = p.parse_args()
    cuda = a.device == "cuda"
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(a.threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    archs = a.archs.split(",") if a.archs else (GPU_ARCHS if cuda else CPU_ARCHS)
    print(f"device: {device_name(torch.device('cuda' if cuda else 'cpu'))}; {a.image_size}px, micro batch "
          f"{a.batch or (128 if cuda else 8)}, {'bf16' if cuda else 'fp32'}, {a.rounds} rounds x {a.steps} steps, "
          f"threads={torch.get_num_threads()}")
    print(f"{'architecture':32s} {'GMACs':>6s} {'Trainer ms':>11s} {'plain ms':>9s} {'ratio':>6s} {'pairwise':>8s} "
          f"{'CPU-time':>8s} {'MFU':>6s}")
    worst = 0.0
    for name in archs:
        r = bench_one(name, a, cuda)
        worst = max(worst, min(r["ratio"], r["pairwise"]))
        print(f"{name:32s} {r['gmacs']:6.2f} {r['trainer_ms']:11.1f} {r['plain_ms']:9.1f} {r['ratio']:6.3f} "
              f"{r['pairwise']:8.3f} {r['cpu_ratio']:8.3f} {r['mfu']:6.1%}", flush=True)
    print(f"worst ratio Trainer / plain (the lower of median-of-rounds and median of pairwise) = {worst:.3f} "
          f"(goal <= 1.05); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
