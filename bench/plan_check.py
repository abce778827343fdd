"""The plan's activation memory and step time against one real forward + backward (issue #29).

    .venv/bin/python bench/plan_check.py                                    # CPU: Ti/16 112 px, micro 8, fp32, 1 thread
    python3 bench/plan_check.py --device cuda --variant B/16 --precision bf16 --micro 128   # a lent GPU

The baseline is the real step of the same network: activation bytes measured by
``torch.cuda.max_memory_allocated`` above the weights (GPU) or torch's profiler's allocation events
(CPU), gradients dropped as DeepSpeed takes them; step time = the median of ``--iters`` steps
(forward, backward, AdamW), process CPU time on CPU, wall time after a synchronize on a GPU. The
plan is ``orchestration.planning``'s, on device ``cpu`` (measured FLOP/s of one core) or ``h100``
(peak x the Trainer's measured MFU: the step it predicts is the Trainer's, eager). Prints
``estimate / measured`` for each.
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[1]))

import argparse
import time

import torch

from model import ViTSpec, build_network
from orchestration.experiment import apply_overrides, get_recipe
from orchestration.planning import DataFacts, get_device, plan
from orchestration.planning import trace as tr
from training.objectives import ClassificationConfig, objective_for


def measured_activations(net: object, micro: int, dtype: torch.dtype, device: str) -> int:
    torch.manual_seed(0)
    module = build_network(net).to(device=device, dtype=dtype).train()  # type: ignore[arg-type]
    for p in module.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    step = tr.STEPS["classification"]
    objective = objective_for(ClassificationConfig())
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        images = torch.randn(micro, 3, net.image_size, net.image_size, device=device, dtype=dtype)  # type: ignore[attr-defined]
        step(objective, module, images, net).backward()  # type: ignore[arg-type]
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return tr.profiled_peak_bytes(step, objective, module,  # type: ignore[arg-type]
                                  lambda: torch.randn(micro, 3, net.image_size, net.image_size, dtype=dtype), net)  # type: ignore[arg-type]


def measured_step(net: object, micro: int, dtype: torch.dtype, device: str, iters: int) -> float:
    torch.manual_seed(0)
    model = build_network(net).to(device=device, dtype=dtype)  # type: ignore[arg-type]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(micro, 3, net.image_size, net.image_size, device=device, dtype=dtype)  # type: ignore[attr-defined]
    y = torch.randint(0, net.num_classes, (micro,), device=device)  # type: ignore[attr-defined]
    times = []
    for i in range(iters + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter() if device == "cuda" else time.process_time()
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() if device == "cuda" else time.process_time()) - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--variant", default="Ti/16")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--plan-gpu", default=None, help="device of the plan (default: cpu, or h100 with --device cuda)")
    a = ap.parse_args()
    if a.device == "cpu":
        torch.set_num_threads(1)  # the plan's cpu device is one core
    dtype = tr.DTYPES[a.precision]
    net = ViTSpec(variant=a.variant).config(num_classes=1000, image_size=a.image_size)
    exp = apply_overrides(get_recipe("vit_mu_smoke"), [
        f"model.variant={a.variant}", f"image_size={a.image_size}", f"train.micro_batch={a.micro}",
        f"train.global_batch={a.micro}", "resources.workers=1", f"train.engine.precision={a.precision}",
        "train.engine.zero_stage=0"])
    p = plan(exp, get_device(a.plan_gpu or ("h100" if a.device == "cuda" else "cpu")), gpus=1,
             data=DataFacts(images=10**6, classes=1000, sample_bytes=1e5, shards=1000, source="bench"))
    acts = measured_activations(net, a.micro, dtype, a.device)
    step = measured_step(net, a.micro, dtype, a.device, a.iters)
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu, 1 thread"
    print(f"{a.variant} {a.image_size} px micro {a.micro} {a.precision} on {name}")
    print(f"activations: planned {p.memory.activations / 1e6:,.1f} MB, measured {acts / 1e6:,.1f} MB, "
          f"ratio {p.memory.activations / acts:.3f}")
    print(f"step: planned {p.step_s * 1e3:,.1f} ms, measured {step * 1e3:,.1f} ms, ratio {p.step_s / step:.3f}")


if __name__ == "__main__":
    main()
