"""Slow accuracy test: the mu ViT trained by the Trainer on shards of scikit-learn digits.

Real path end to end: digits -> JPEG class folders -> pipeline.write_dataset shards (train/val)
-> pipeline.build_loader (train preset with crops; exactly-once eval preset) -> Trainer
(DeepSpeed ZeRO-1, gloo, one CPU process) -> top-1 on the held-out split. The training runs in
a subprocess so that the test process never holds a DeepSpeed process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE = 32


def train_digits(workdir: Path) -> dict[str, float]:
    """Build the shards, train, evaluate; returns the Trainer's final metrics."""
    import torch

    from model import create_model
    from pipeline import AugmentConfig, DataConfig, IOConfig, SourceConfig, build_loader, write_dataset
    from pipeline.demo_data import make_digits_folder
    from training import JsonlSink, TrainConfig, Trainer
    from training.config import EngineConfig, OptimConfig, ScheduleConfig

    src = make_digits_folder(workdir / "src", image_size=IMAGE)
    url = str(workdir / "ds")
    write_dataset(src, url, samples_per_shard=300, val_fraction=0.2, seed=0, progress=False)
    # uint8 batches, normalized by the Trainer on its device: the path pretrain.py and sweeps use.
    data = DataConfig(source=SourceConfig(url=url), image_size=IMAGE, batch_size=64, seed=0, output="uint8",
                      augment=AugmentConfig(crop_scale=(0.8, 1.0), hflip=False),
                      io=IOConfig(num_workers=1, shuffle_buffer=256))
    train = build_loader(data, rank=0, world_size=1)
    val = build_loader(data.for_eval("val", batch_size=128, **{"preprocess.eval_crop_pct": 1.0}), rank=0, world_size=1)
    cfg = TrainConfig(global_batch=64, micro_batch=64, log_every=50, eval_every=0, profile="cpu", seed=0, optim=OptimConfig(lr=3e-3, weight_decay=0.05), schedule=ScheduleConfig(warmup_steps=30, total_steps=450, decay="cosine"), engine=EngineConfig(zero_stage=1))
    torch.manual_seed(0)
    model = create_model("mu/4", num_classes=train.num_classes, image_size=IMAGE)
    trainer = Trainer(model, cfg, train, eval_loader=val, sink=JsonlSink(workdir / "metrics.jsonl"))
    return trainer.fit()


@pytest.mark.slow
def test_mu_vit_reaches_95_on_digits(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    print(f"digits: {result} in {time.monotonic() - t0:.0f}s")
    assert result["eval_samples"] >= 300  # the whole held-out split, each sample once
    assert result["eval_top1"] >= 0.95, result


if __name__ == "__main__":
    out = Path(sys.argv[1])
    res = train_digits(out)
    (out / "result.json").write_text(json.dumps(res))
