"""Recipes of the ViT family's other members, built from timm (``model.TimmSpec``; docs/architectures.md).

One ImageNet-1k recipe for a small size of each architecture, with the numbers of its paper or
its authors' training code, and one tiny version of each on the digits demo shards (2 CPU
workers, minutes) for laptops and tests. Almost all of them train with DeiT's procedure
(Touvron et al. 2021, "Training data-efficient image transformers", Table 9 and the defaults of
facebookresearch/deit ``main.py``): AdamW, lr 5e-4 x batch / 512, weight decay 0.05, 300 epochs
with 5 warm-up epochs and cosine decay to 1e-5, label smoothing 0.1, RandAugment
``rand-m9-mstd0.5-inc1`` (2 ops at magnitude 9), mixup 0.8, cutmix 1.0, random erasing 0.25, no
gradient clipping; each recipe says where it departs from it. DeiT's repeated augmentation and
the distillation token are in ``recipes_deit.py`` (``data.augment.repeats``, docs/distillation.md).

Launch any of them like the ViT recipes::

    ray job submit --working-dir . -- python orchestration/pretrain.py \\
        --recipe swin_t_in1k --data s3://BUCKET/imagenet1k --resume auto
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from model import TimmSpec
from orchestration.experiment.config import EvalSpec, Experiment, Resources
from orchestration.experiment.imagenet import IMAGENET_MEAN, IMAGENET_STD, epochs_to_steps
from pipeline import AugmentConfig, DataConfig, IOConfig, PreprocessConfig, SourceConfig
from training import TrainConfig
from training.config import CheckpointConfig, EngineConfig, OptimConfig, ScheduleConfig
from training.objectives import ClassificationConfig

DEIT_BATCH = 1024  # DeiT Table 9: batch size 1024 (8 GPUs x 128 here)
GPUS = 8


def deit_lr(batch: int, blr: float = 5e-4) -> float:
    """DeiT's linear scaling rule, ``lr = 5e-4 x batch / 512`` (Section 6 / main.py)."""
    return blr * batch / 512


def _in1k(name: str, spec: TimmSpec, *, epochs: int = 300, warmup_epochs: int = 5, batch: int = DEIT_BATCH,
          lr: float | None = None, weight_decay: float = 0.05, grad_clip: float = 0.0, min_lr: float = 1e-5,
          eval_crop_pct: float = 0.875) -> Experiment:
    """DeiT's ImageNet-1k procedure for ``spec`` at 224 px, with a recipe's departures from it."""
    micro = batch // GPUS
    steps_per_epoch = epochs_to_steps(1, batch)
    return Experiment(
        name=name,
        image_size=224,
        model=spec,
        data=DataConfig(
            source=SourceConfig(url="s3://vitscale/imagenet1k"),
            # DeiT main.py: timm's create_transform(is_training=True): RandomResizedCrop (0.08, 1), flip,
            # --aa rand-m9-mstd0.5-inc1, --reprob 0.25; --mixup 0.8 --cutmix 1.0.
            augment=AugmentConfig(crop_scale=(0.08, 1.0), hflip=True, randaugment=(2, 9), mixup_alpha=0.8,
                                  cutmix_alpha=1.0, random_erasing=0.25),
            preprocess=PreprocessConfig(mean=IMAGENET_MEAN, std=IMAGENET_STD, eval_crop_pct=eval_crop_pct),
            io=IOConfig(num_workers=8),
        ),
        train=TrainConfig(
            global_batch=batch,
            micro_batch=micro,
            optim=OptimConfig(name="adamw", lr=lr if lr is not None else deit_lr(batch), betas=(0.9, 0.999),
                              eps=1e-8, weight_decay=weight_decay, grad_clip=grad_clip),
            schedule=ScheduleConfig(warmup_steps=warmup_epochs * steps_per_epoch, total_steps=epochs * steps_per_epoch,
                                    decay="cosine", min_lr=min_lr),
            objective=ClassificationConfig(loss="softmax", label_smoothing=0.1),  # DeiT --smoothing 0.1
            engine=EngineConfig(precision="bf16", zero_stage=1),
            log_every=50,
            eval_every=steps_per_epoch,
            checkpoint=CheckpointConfig(every=steps_per_epoch),
        ),
        eval=EvalSpec(split="val"),
        resources=Resources(workers=GPUS, cpus_per_worker=8, gpus_per_worker=1),
        dataset_name="imagenet1k",
    )


def deit_tiny_in1k() -> Experiment:
    """DeiT-Ti/16 (timm ``deit_tiny_patch16_224``: width 192, 12 blocks, 3 heads; 5.7M params,
    1.3 GMACs) with DeiT's procedure as is: stochastic depth 0.1 (Table 9). DeiT reports 72.2
    top-1 (README_deit.md) without distillation."""
    return _in1k("deit_tiny_in1k", TimmSpec(name="deit_tiny_patch16_224", drop_path=0.1))


def swin_t_in1k() -> Experiment:
    """Swin-T (timm ``swin_tiny_patch4_window7_224``: C=96, depths 2-2-6-2, window 7; 28M params,
    4.5 GMACs), Liu et al. 2021, Section 4.1 "Regular ImageNet-1K training": AdamW for 300 epochs
    with cosine decay and 20 epochs of linear warm-up, batch 1024, initial lr 0.001, weight decay
    0.05, DeiT's augmentation and regularisation (without repeated augmentation and EMA),
    stochastic depth 0.2 for Swin-T; microsoft/Swin-Transformer config.py: gradient clipping at
    norm 5.0, minimum lr 5e-6 x batch / 512 = 1e-5. Reported: 81.3 top-1."""
    return _in1k("swin_t_in1k", TimmSpec(name="swin_tiny_patch4_window7_224", drop_path=0.2), warmup_epochs=20,
                 lr=1e-3, grad_clip=5.0)


def pvt_v2_b0_in1k() -> Experiment:
    """PVT-v2-B0 (timm ``pvt_v2_b0``: widths 32-64-160-256, depths 2-2-2-2; 3.7M params, 0.57 GMACs),
    Wang et al. 2022, Section 4.1: DeiT's procedure (AdamW, lr 5e-4 x batch / 512 = 1e-3 at 1024,
    weight decay 0.05, 300 epochs, cosine, 5 warm-up epochs, DeiT's augmentation); stochastic
    depth 0.1 (whai362/PVT classification config for b0). Reported: 70.5 top-1."""
    return _in1k("pvt_v2_b0_in1k", TimmSpec(name="pvt_v2_b0", drop_path=0.1))


def cait_xxs24_in1k() -> Experiment:
    """CaiT-XXS24 (timm ``cait_xxs24_224``: width 192, 24 self-attention + 2 class-attention layers,
    LayerScale initialised at 1e-5; 12M params, 2.5 GMACs), Touvron et al. 2021 ("Going deeper with
    Image Transformers"), Section 5: DeiT's procedure trained for 400 epochs; test crop ratio 1.0
    (README_cait.md). Stochastic depth 0.05: the small models' rate in the paper's per-model
    hyper-parameters (check it there before reproducing the paper's 77.6)."""
    return _in1k("cait_xxs24_in1k", TimmSpec(name="cait_xxs24_224", drop_path=0.05), epochs=400, eval_crop_pct=1.0)


def beit_b16_in1k() -> Experiment:
    """BEiT-B/16 (timm ``beit_base_patch16_224``: ViT-B with relative position bias in every block and
    LayerScale 0.1; 86.5M params, 17.6 GMACs) trained from scratch with DeiT's procedure, the
    supervised baseline of Bao et al. 2021 (Table 1, "training from scratch") on the BEiT
    architecture; stochastic depth 0.1 as BEiT's base-size fine-tuning (Appendix, "drop path 0.1")
    and its layer-wise lr decay left off (it is for fine-tuning a pre-trained encoder:
    ``--set train.optim.layer_decay=0.65`` with ``finetune.py``)."""
    return _in1k("beit_b16_in1k", TimmSpec(name="beit_base_patch16_224", drop_path=0.1))


def resnet50_in1k() -> Experiment:
    """ResNet-50 (timm ``resnet50``: 25.6M params, 4.1 GMACs), a convnet teacher for DeiT's
    distillation trained here. He et al. 2016, Section 3.4: SGD with momentum 0.9, batch 256, lr
    0.1, weight decay 1e-4; 90 epochs as in Goyal et al. 2017, with cosine decay instead of the
    paper's steps (the schedule types this project has) and DeiT's resolution / crop. No mixup,
    cutmix, RandAugment or label smoothing: the paper's plain recipe (76 top-1)."""
    base = _in1k("resnet50_in1k", TimmSpec(name="resnet50"), epochs=90, warmup_epochs=0, batch=256, lr=0.1,
                 weight_decay=1e-4, min_lr=0.0)
    return replace(base, data=base.data.replace(**{"augment.randaugment": None, "augment.mixup_alpha": 0.0,
                                                   "augment.cutmix_alpha": 0.0, "augment.random_erasing": 0.0}),
                   train=base.train.replace(**{"optim.name": "sgd", "optim.momentum": 0.9,
                                               "objective.label_smoothing": 0.0}))


# ----------------------------------------------------------------------------- digits (CPU)
#: A tiny shape of each architecture at 32 px (tens of thousands of parameters): what the tests, the
#: architecture study and a laptop train. Fields of ``model.TimmSpec``, built when a recipe is called
#: (a TimmSpec checks its name against timm, and importing the recipes must not import timm).
DIGITS_SHAPES: dict[str, dict[str, Any]] = {
    "deit": dict(name="deit_tiny_patch16_224", patch_size=4, embed_dim=(32,), depths=(2,), num_heads=(2,)),
    "swin": dict(name="swin_tiny_patch4_window7_224", patch_size=2, embed_dim=(16,), depths=(1, 1), num_heads=(1, 2),
                 window_size=4),
    "pvt_v2": dict(name="pvt_v2_b0", embed_dim=(16, 32), depths=(1, 1), num_heads=(1, 2), sr_ratios=(4, 1)),
    "cait": dict(name="cait_xxs24_224", patch_size=4, embed_dim=(32,), depths=(2,), num_heads=(2,), class_depth=1),
    "beit": dict(name="beit_base_patch16_224", patch_size=4, embed_dim=(32,), depths=(2,), num_heads=(2,)),
    "resnet": dict(name="resnet18", depths=(1, 1, 1, 1)),
}


def _digits(arch: str) -> Callable[[], Experiment]:
    def recipe() -> Experiment:
        return Experiment(
            name=f"{arch}_digits",
            image_size=32,
            model=TimmSpec(**DIGITS_SHAPES[arch]),
            data=DataConfig(source=SourceConfig(url="s3://vitscale/digits"),
                            io=IOConfig(num_workers=1, shuffle_buffer=256),
                            augment=AugmentConfig(crop_scale=(0.6, 1.0), hflip=False)),
            train=TrainConfig(
                global_batch=64,  # micro 32 x 2 workers
                micro_batch=32,
                optim=OptimConfig(name="adamw", lr=2e-3, betas=(0.9, 0.999), weight_decay=0.05, grad_clip=1.0),
                schedule=ScheduleConfig(warmup_steps=30, total_steps=300, decay="cosine"),
                engine=EngineConfig(precision="fp32", zero_stage=1),
                log_every=10,
                eval_every=100,
                checkpoint=CheckpointConfig(every=100),
            ),
            resources=Resources(workers=2, cpus_per_worker=1, gpus_per_worker=0),
            dataset_name="digits",
        )

    shape = DIGITS_SHAPES[arch]
    recipe.__name__ = recipe.__qualname__ = f"{arch}_digits"
    recipe.__doc__ = (f"A tiny {shape['name']} ({', '.join(f'{k}={v}' for k, v in shape.items() if k != 'name')}) on "
                      "the digits demo shards at 32 px: 2 CPU workers, ZeRO-1 on gloo, 300 steps. Launch::\n\n"
                      "        ray job submit --working-dir . -- python orchestration/pretrain.py \\\n"
                      f"            --recipe {arch}_digits --data s3://vitscale/digits\n")
    return recipe


_IN1K = (deit_tiny_in1k, swin_t_in1k, pvt_v2_b0_in1k, cait_xxs24_in1k, beit_b16_in1k, resnet50_in1k)
for _f in _IN1K:  # every recipe's docstring ends with its launch line (8 GPUs, one node or several)
    _f.__doc__ = (f"{_f.__doc__}\n\n    8 GPUs, bf16, ZeRO-1. Launch::\n\n        ray job submit --working-dir . -- "
                  f"python orchestration/pretrain.py \\\n            --recipe {_f.__name__} --data "
                  "s3://BUCKET/imagenet1k --resume auto\n")

ZOO_RECIPES: tuple[Callable[[], Experiment], ...] = (*_IN1K, *(_digits(a) for a in DIGITS_SHAPES))
