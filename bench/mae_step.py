"""MAE pre-training step time / supervised step time, same ViT, same image size, same Trainer.

Claim (issue #24): MAE's encoder sees a quarter of the patches, so a pre-training step costs
well under a supervised step of the same ViT: expect <= 0.5 at 224 px for ViT-L/H (MAE paper:
"3x or more" faster), more for ViT-B, whose 8 x 512 decoder runs on all 197 tokens (the
analytic FLOPs ratio, printed too, is 0.56 for B/16 with MAE's decoder). Both runs go through
``training.Trainer`` (DeepSpeed ZeRO-1, the same optimizer and schedule), alternating in rounds
within one process on pre-made batches; the ratio of median round times is printed.

    .venv/bin/python bench/mae_step.py                          # CPU: Ti/16 at 224, ~2 min
    .venv/bin/python bench/mae_step.py --variant B/16 --device cuda --micro 128   # a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import create_model, train_flops_per_image, vit_config  # noqa: E402
from model.flops import mae_macs_per_image  # noqa: E402
from pipeline.masking import MaskConfig, draw_mask  # noqa: E402
from training import TrainConfig, Trainer  # noqa: E402
from training.config import EngineConfig, OptimConfig, ScheduleConfig  # noqa: E402
from training.objectives import MAEConfig  # noqa: E402


class Batches:
    """Cycles over pre-made batches (supervised: (x, y); MAE: (x, y, mask))."""

    def __init__(self, batches: list[tuple[torch.Tensor, ...]]) -> None:
        self.batches, self.pos = batches, 0

    def __iter__(self):  # noqa: ANN204 - a plain generator
        while True:
            yield self.batches[self.pos % len(self.batches)]
            self.pos += 1

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.pos = d["pos"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="Ti/16")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per round")
    a = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if a.device == "cpu" else "cuda")
    precision = "bf16" if a.device == "cuda" else "fp32"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.micro, 3, a.image_size, a.image_size, generator=g)
    y = torch.randint(0, 1000, (a.micro,), generator=g)
    patch = int(a.variant.split("/")[1])
    grid = a.image_size // patch
    masks = torch.from_numpy(np.stack([draw_mask(MaskConfig(kind="random", ratio=0.75, patch_size=patch), grid,
                                                 np.random.default_rng(i)) for i in range(a.micro)]))
    base = TrainConfig(global_batch=a.micro, micro_batch=a.micro, profile="cpu" if a.device == "cpu" else "auto",
                       log_every=10**6, optim=OptimConfig(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05),
                       schedule=ScheduleConfig(total_steps=10**6), engine=EngineConfig(precision=precision))
    sup = Trainer(create_model(a.variant, num_classes=1000, image_size=a.image_size), base, Batches([(x, y)]),
                  console=False)
    mae = Trainer(create_model(a.variant, num_classes=0, image_size=a.image_size, posemb="sincos2d"),
                  dataclasses.replace(base, objective=MAEConfig()), Batches([(x, y, masks)]), console=False)
    times: dict[str, list[float]] = {"supervised": [], "mae": []}
    for r in range(a.rounds + 1):  # round 0 warms up both
        for name, trainer in (("supervised", sup), ("mae", mae)):
            t0 = time.perf_counter()
            for _ in range(a.steps):
                trainer.train_step()
            if a.device == "cuda":
                torch.cuda.synchronize()
            if r:
                times[name].append((time.perf_counter() - t0) / a.steps)
    s, m = statistics.median(times["supervised"]), statistics.median(times["mae"])
    enc = vit_config(a.variant, num_classes=0, image_size=a.image_size)
    flops_ratio = (6 * mae_macs_per_image(enc, 512, 8, 2048, int(grid * grid * (1 - 0.75)))
                   / train_flops_per_image(vit_config(a.variant, num_classes=1000, image_size=a.image_size)))
    print(f"{a.variant} at {a.image_size}px, micro batch {a.micro}, {a.device} ({precision}), {a.rounds} rounds x "
          f"{a.steps} steps: supervised {s * 1e3:.1f} ms/step, MAE {m * 1e3:.1f} ms/step")
    print(f"MAE / supervised step time: {m / s:.3f}  (analytic FLOPs ratio {flops_ratio:.3f}; decoder 8 x 512)")


if __name__ == "__main__":
    main()
