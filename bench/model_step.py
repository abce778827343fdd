"""Forward+backward step time of our ViT-S/16 against timm's ``vit_small_patch16_224``.

Both models hold identical weights (timm's random init, head randomised, copied into ours
with ``model.weights.from_timm_state_dict``), see the same batch, dtype and thread count,
and run alternately in one process, so machine noise hits both alike. Prints the median
ratio ours/timm (< 1 = ours faster). Goal: <= 1.00.

With ``--device cuda`` it also prints images/s and MFU of our B/16 in bf16 autocast.

    .venv/bin/python bench/model_step.py                       # CPU, ~1 min on 2 cores
    .venv/bin/python bench/model_step.py --device cuda --batch 64 --iters 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import create_model, from_timm_state_dict, train_flops_per_image  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Dense bf16/fp16 tensor-core peak, TFLOP/s, matched as substrings of the device name
# (first match wins). training/metrics.py owns the project's table; this one only labels the bench.
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("T4", 65.0))


def make_pair(batch: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(ours, timm) ViT-S/16 with identical weights, in train mode, on ``device``."""
    import timm

    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=1000)
    with torch.no_grad():
        ref.head.weight.normal_(std=0.02)  # a non-zero head, so backward reaches the whole network
    ours = create_model("S/16", num_classes=1000)
    ours.load_state_dict(from_timm_state_dict(ref.state_dict()))
    ours.to(device).eval()
    ref.to(device).eval()
    x = torch.randn(2, 3, 224, 224, device=device)
    with torch.no_grad():
        err = (ours(x) - ref(x)).abs().max().item()
    if err > 1e-3:
        raise SystemExit(f"ours and timm disagree (max |dlogit| {err:.2e}); the comparison would be meaningless")
    return ours.train(), ref.train()


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None) -> Callable[[], None]:
    """One forward+backward (no optimizer: identical for both and not what we measure)."""
    ctx = (lambda: torch.autocast(x.device.type, dtype=amp)) if amp is not None else nullcontext

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with ctx():
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()

    return step


def timed(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step.

    On a CPU shared with other jobs the CPU time is the steadier of the two: it does not
    count the time this process waited for a core.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def compare(args: argparse.Namespace, device: torch.device) -> float:
    amp = None if args.dtype == "fp32" else DTYPES[args.dtype]
    ours, ref = make_pair(args.batch, device)
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    steps = {"ours": step_fn(ours, x, y, amp), "timm": step_fn(ref, x, y, amp)}
    for _ in range(args.warmup):
        for s in steps.values():
            s()
    times: dict[str, list[float]] = {"ours": [], "timm": []}
    ratios, cpu_ratios = [], []
    for i in range(args.iters):
        order = ("ours", "timm") if i % 2 == 0 else ("timm", "ours")  # alternate who goes first
        t = {name: timed(steps[name], device) for name in order}
        for name in order:
            times[name].append(t[name][0])
        ratios.append(t["ours"][0] / t["timm"][0])
        cpu_ratios.append(t["ours"][1] / t["timm"][1])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"S/16 fwd+bwd  batch {args.batch}  {args.dtype}  device {device_name(device)}  "
          f"threads {torch.get_num_threads()}  iters {args.iters}")
    print(f"  ours  median {med['ours'] * 1e3:8.1f} ms   ({args.batch / med['ours']:.1f} img/s)")
    print(f"  timm  median {med['timm'] * 1e3:8.1f} ms   ({args.batch / med['timm']:.1f} img/s)")
    ratio = statistics.median(ratios)
    print(f"  pairwise wall ratios ours/timm: {' '.join(f'{r:.3f}' for r in ratios)}")
    if device.type == "cpu":
        print(f"  median CPU-time ratio ours/timm: {statistics.median(cpu_ratios):.3f}")
    print(f"median ratio ours/timm: {ratio:.3f}  (wall; goal <= 1.00)")
    return ratio


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def mfu_b16(args: argparse.Namespace, device: torch.device) -> None:
    """images/s and MFU of our B/16, bf16 autocast, fp32 master weights."""
    model = create_model("B/16", num_classes=1000).to(device).train()
    with torch.no_grad():
        model.head.weight.normal_(std=0.02)
    batch = args.mfu_batch
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    step = step_fn(model, x, y, torch.bfloat16)
    for _ in range(args.warmup):
        step()
    t = statistics.median(timed(step, device)[0] for _ in range(args.iters))
    ips = batch / t
    name = device_name(device)
    peak = next((p for key, p in PEAK_TFLOPS if key in name), None)
    achieved = ips * train_flops_per_image(model.cfg) / 1e12
    mfu = f"{achieved / peak:.1%} of {peak:.0f} TFLOP/s" if peak else "n/a (unknown peak for this device)"
    print(f"B/16 bf16 fwd+bwd  batch {batch}  {name}: {ips:.0f} img/s, {achieved:.0f} TFLOP/s model FLOPs, MFU {mfu}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="fp32, or autocast to bf16/fp16")
    p.add_argument("--mfu-batch", type=int, default=128, help="B/16 batch for the --device cuda MFU line")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    compare(args, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        mfu_b16(args, device)


if __name__ == "__main__":
    main()
