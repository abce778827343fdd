"""Does MAE pre-training learn something real? Few-shot and fine-tuning on held-out digit classes.

Claim (issue #24): MAE pre-training on images without labels gives an encoder that (a) beats the
same encoder at random initialisation on 10-shot linear evaluation of classes it never saw, and
(b) fine-tuned on 10 % of their labels beats the same fine-tune from scratch (same steps, seed).

The whole path is the project's: scikit-learn's digits at 16 px -> ``pipeline.write_dataset``
shards (digits 0-4 one dataset, 5-9 another, each with a 20 % ``val`` split) -> MAE pre-training
with the ``mae_vit_mu_digits`` recipe (``--set`` overrides below) through ``build_run`` /
``training.Trainer`` on the train split of 0-4, labels unused -> the exported encoder against the
same encoder before pre-training (the weights MAE started from):

* few-shot: ``orchestration.evaluation.fewshot.evaluate_fewshot`` (big_vision's closed-form
  ridge) on 5-9, support drawn from their train split, top-1 on their val split, averaged over
  ``SUPPORT_SEEDS`` support draws;
* fine-tune: ``finetune_experiment(protocol="mae")`` (MAE's protocol: mean pooling + fc_norm,
  AdamW with layer-wise lr decay, drop path, label smoothing), with ``FINETUNE_SET`` sizing it
  for 16 px digits, on the first 10 % of the 5-9 train split (``data.source.limit_samples``),
  the encoder staged as ``finetune.py`` stages it; scratch is the same experiment without
  initial weights. Top-1 on the 5-9 val split.

    .venv/bin/python bench/mae_learns.py --seeds 0,1,2,3,4   # ~70-130 s per seed on 2 shared cores

``tests/test_mae_learns.py`` runs :func:`measure` for one seed and asserts the margins.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the protocol shared with beit_learns.py

import torch  # noqa: E402
from heldout_digits import (  # noqa: E402, F401 - the protocol's names, as the test reads them here
    FINETUNE_SET,
    HELD,
    IMAGE,
    LABEL_FRACTION,
    SEEN,
    SHOTS,
    SUPPORT_SEEDS,
    fewshot,
    finetune_experiment_for,
    make_datasets,
    print_summary,
    run_finetune,
)
from torch import nn  # noqa: E402

#: The encoder (width 64, 2 blocks of 4 heads on 4 x 4 patches of 4 px) and MAE's pre-training, on
#: top of the mae_vit_mu_digits recipe (its decoder: 1 block of width 32; mask ratio 0.75,
#: norm_pix_loss, AdamW (0.9, 0.95), wd 0.05, crops (0.5, 1), no flips).
PRETRAIN_SET = ("image_size=16", "model.width=64", "model.heads=4", "model.mlp_dim=128",
                "train.global_batch=64", "train.micro_batch=64", "train.schedule.warmup_steps=40",
                "train.schedule.total_steps=1600", "train.eval_every=1600", "train.checkpoint.every=0",
                "train.log_every=200", "resources.workers=1", "data.io.num_workers=0")


def pretrain(seen: str, workdir: Path, seed: int, overrides: tuple[str, ...] = PRETRAIN_SET
             ) -> tuple[nn.Module, nn.Module, Any, dict[str, float]]:
    """MAE on the train split of ``seen`` (labels unused): (trained encoder, the same encoder at
    its initialisation, the experiment, the Trainer's final metrics)."""
    import copy

    from orchestration.experiment import apply_overrides, get_recipe
    from orchestration.launch.build import build_run

    exp = apply_overrides(get_recipe("mae_vit_mu_digits"),
                          [*overrides, f"data.source.url={seen}", f"train.seed={seed}", f"data.seed={seed}"])
    trainer, _ = build_run(exp, rank=0, world=1, checkpoint_url=str(workdir / "ckpt-mae"), checkpoint_key="mae")
    encoder = trainer.objective.exported(trainer.model)
    initial = copy.deepcopy(encoder)
    result = trainer.fit()
    return copy.deepcopy(encoder).eval(), initial.eval(), exp, result


def measure(workdir: Path, seed: int, *, datasets: tuple[str, str] | None = None,
            pretrain_set: tuple[str, ...] = PRETRAIN_SET, finetune_set: tuple[str, ...] = FINETUNE_SET,
            do_finetune: bool = True) -> dict[str, Any]:
    """One seed of the comparison: few-shot and (``do_finetune``) fine-tune accuracies of MAE vs random init."""
    t0 = time.perf_counter()
    seen, held = datasets or make_datasets(workdir / "data")
    mae, rand, exp, pre = pretrain(seen, workdir, seed, pretrain_set)
    t_pre = time.perf_counter() - t0
    row: dict[str, Any] = {"seed": seed, "mae_loss": pre["loss"], "mae_eval_loss": pre.get("eval_loss")}
    for name, enc in (("mae", mae), ("random", rand)):
        for k, v in fewshot(enc, held, exp).items():
            row[f"{k}shot_{name}"] = v
    t_few = time.perf_counter() - t0 - t_pre
    if do_finetune:
        for name, enc, pretrained in (("mae", mae, True), ("scratch", rand, False)):
            out = run_finetune(enc, held, workdir / f"ft-{name}", seed, pretrained=pretrained, overrides=finetune_set)
            row[f"ft_{name}"] = out["top1"]
            row["ft_images"] = int(out["images"])
    row["seconds"] = {"pretrain": t_pre, "fewshot": t_few, "total": time.perf_counter() - t0}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--pretrain-set", action="append", default=[], help="extra KEY=VALUE for pre-training")
    ap.add_argument("--finetune-set", action="append", default=[], help="extra KEY=VALUE for fine-tuning")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine 2 threads ran ~15x slower, spinning)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_datasets(Path(tmp) / "data")
        for s in (int(x) for x in a.seeds.split(",")):
            row = measure(Path(tmp) / f"seed{s}", s, datasets=data, pretrain_set=PRETRAIN_SET + tuple(a.pretrain_set),
                          finetune_set=FINETUNE_SET + tuple(a.finetune_set), do_finetune=not a.no_finetune)
            rows.append(row)
            print(row, flush=True)
    cols = [f"{k}shot" for k in SHOTS] + ([] if a.no_finetune else ["ft"])
    print_summary(rows, cols, "mae", "MAE", {"MAE loss (eval)": lambda r: f"{r['mae_eval_loss']:.3f}"})


if __name__ == "__main__":
    main()
