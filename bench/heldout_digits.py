"""The held-out-digits protocol that ``bench/mae_learns.py`` and ``bench/beit_learns.py`` share:
does a self-supervised pre-training on some classes give an encoder that transfers to others?

scikit-learn's digits at 16 px -> ``pipeline.write_dataset`` shards (digits 0-4 one dataset, 5-9
another, each with a 20 % ``val`` split); pre-training sees the train split of 0-4 (labels unused);
the encoder is judged on 5-9, which it never saw:

* few-shot: ``orchestration.evaluation.fewshot.evaluate_fewshot`` (big_vision's closed-form ridge),
  support from 5-9's train split, top-1 on their val split, the mean over ``SUPPORT_SEEDS`` draws;
* fine-tune: ``finetune_experiment(protocol=...)`` (the objective's protocol: MAE's or BEiT's) with
  ``FINETUNE_SET`` sizing it for 16 px digits, on the first ``LABEL_FRACTION`` of the 5-9 train
  split, the encoder staged as ``finetune.py`` stages it; scratch is the same experiment without
  initial weights. Top-1 on the 5-9 val split.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch import nn  # noqa: E402

IMAGE = 16
SEEN, HELD = range(0, 5), range(5, 10)
SHOTS = (5, 10)
SUPPORT_SEEDS = (0, 1, 2, 3, 4)
LABEL_FRACTION = 0.10
#: The fine-tuning protocols (finetune_protocols._mae / _beit with their CPU schedule: 300 steps, 30 of
#: warm-up, cosine; mean pooling + fc_norm, drop path 0.1, AdamW with layer decay 0.65, label smoothing
#: 0.1) sized for 72 images of 16 px digits: batch 32 at lr 1e-3 (MAE's blr x batch / 256 is 1.25e-4
#: at batch 64, BEiT's 4e-3 x batch / 1024 2.5e-4: too little for 300 steps from scratch), and mild
#: crops instead of mixup / cutmix / RandAugment / random erasing (docs/mae.md has what each gives).
FINETUNE_SET = ("train.global_batch=32", "train.micro_batch=32", "train.optim.lr=1e-3",
                "data.augment.crop_scale=0.5,1.0", "data.augment.randaugment=none", "data.augment.mixup_alpha=0",
                "data.augment.cutmix_alpha=0", "data.augment.random_erasing=0", "train.eval_every=300",
                "train.checkpoint.every=0", "train.log_every=100", "resources.workers=1", "data.io.num_workers=0")


def make_datasets(root: Path) -> tuple[str, str]:
    """(URL of digits 0-4, URL of digits 5-9): shards with a 20 % val split each."""
    from pipeline import write_dataset
    from pipeline.demo_data import make_digits_folder

    src = make_digits_folder(root / "src", image_size=IMAGE)
    urls = []
    for name, classes in (("seen", SEEN), ("held", HELD)):
        folder = root / f"{name}-folder"
        folder.mkdir()
        for c in classes:
            shutil.move(str(src / str(c)), str(folder / str(c)))
        url = str(root / name)
        write_dataset(folder, url, val_fraction=0.2, samples_per_shard=200, seed=0, progress=False)
        urls.append(url)
    return urls[0], urls[1]


def split_size(url: str, split: str) -> int:
    from orchestration.evaluation.support_sets import open_pool

    return len(open_pool(url, split).meta.labels)


def fewshot(encoder: nn.Module, held: str, exp: Any) -> dict[int, float]:
    """Mean top-1 over SUPPORT_SEEDS per shot count (``exp``: the pre-training, for its pixel normalisation)."""
    from orchestration.evaluation.fewshot import FewShotConfig, evaluate_fewshot, open_pools

    pre = exp.data.preprocess
    accs: dict[int, list[float]] = {k: [] for k in SHOTS}
    for s in SUPPORT_SEEDS:
        cfg = FewShotConfig(datasets=(held,), names=("held",), shots=SHOTS, seed=s, mean=pre.mean, std=pre.std,
                            crop_pct=pre.eval_crop_pct)
        res = evaluate_fewshot(encoder, cfg, device="cpu", pools=open_pools(cfg))
        for k in SHOTS:
            accs[k].append(res.metrics[f"fewshot/held/{k}shot"])
    return {k: statistics.mean(v) for k, v in accs.items()}


def finetune_experiment_for(encoder: nn.Module, held: str, seed: int, overrides: tuple[str, ...] = FINETUNE_SET, *,
                            source_recipe: str = "mae_vit_mu_digits", protocol: str = "mae") -> tuple[Any, int]:
    """(``protocol``'s fine-tuning experiment for ``encoder``'s architecture on the first LABEL_FRACTION
    of held's train split, those images' count)."""
    from orchestration.experiment import apply_overrides
    from orchestration.experiment.finetune_protocols import finetune_experiment

    n = max(1, round(LABEL_FRACTION * split_size(held, "train")))
    base = finetune_experiment(encoder.cfg, image_size=IMAGE, source_recipe=source_recipe, dataset_name="held",
                               source_model_name=f"{protocol}-bench", protocol=protocol, train_images=n)
    exp = apply_overrides(base, [*overrides, f"data.source.url={held}", f"data.source.limit_samples={n}",
                                 f"train.seed={seed}", f"data.seed={seed}"])
    return exp, n


def run_finetune(encoder: nn.Module, held: str, workdir: Path, seed: int, *, pretrained: bool,
                 overrides: tuple[str, ...] = FINETUNE_SET, source_recipe: str = "mae_vit_mu_digits",
                 protocol: str = "mae") -> dict[str, float]:
    """Fine-tune from ``encoder``'s weights (staged as ``finetune.py`` stages them) or, when not
    ``pretrained``, the same experiment from scratch; top-1 on held's val split."""
    from orchestration import finetune as finetune_cli
    from orchestration.launch.build import build_run

    exp, n = finetune_experiment_for(encoder, held, seed, overrides, source_recipe=source_recipe, protocol=protocol)
    init = None
    if pretrained:
        init = finetune_cli._stage_weights(encoder, str(workdir / "init" / "w.safetensors"), IMAGE,
                                           pool=getattr(exp.model, "pool", None), spec=exp.model)
    trainer, _ = build_run(exp, rank=0, world=1, checkpoint_url=str(workdir / "ckpt"), checkpoint_key="ft",
                           init_weights=init)
    out = trainer.fit()
    return {"top1": out["eval_top1"], "images": float(n), "samples": out["eval_samples"]}


def print_summary(rows: list[dict[str, Any]], cols: list[str], method: str, title: str,
                  lead: dict[str, Callable[[dict], str]]) -> None:
    """The per-seed markdown table and the margin lines: for each column ``c`` ("5shot", "10shot",
    "ft"), ``row[f"{c}_{method}"]`` against random init (few-shot) or scratch (fine-tune); ``lead``:
    the method's own leading columns (heading -> cell of a row); ``title``: the method as printed."""
    base = {c: (f"{c}_random" if c != "ft" else "ft_scratch") for c in cols}
    names = {c: (f"{c[:-4]}-shot" if c != "ft" else f"fine-tune {LABEL_FRACTION:.0%}") for c in cols}
    print("\n| seed | " + "".join(f"{t} | " for t in lead) + " | ".join(
        f"{names[c]} {title} | {'scratch' if c == 'ft' else 'random'} | margin" for c in cols) + " | seconds |")
    print("|---|" + "---|" * len(lead) + "---|---|---|" * len(cols) + "---|")
    for r in rows:
        cells = [f"{r[f'{c}_{method}']:.3f} | {r[base[c]]:.3f} | {r[f'{c}_{method}'] - r[base[c]]:+.3f}" for c in cols]
        print(f"| {r['seed']} | " + "".join(f"{cell(r)} | " for cell in lead.values()) + " | ".join(cells)
              + f" | {r['seconds']['total']:.0f} |")
    for c in cols:
        margins = [r[f"{c}_{method}"] - r[base[c]] for r in rows]
        print(f"{names[c]}: margin mean {statistics.mean(margins):+.3f}, min {min(margins):+.3f}, "
              f"max {max(margins):+.3f} over {len(rows)} seeds")
