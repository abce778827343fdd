"""Experiment recipes: one Python function per thing we train, plus typed ``--set`` overrides.

A recipe returns a frozen :class:`Experiment` that bundles the component configs
(``pipeline.DataConfig``, ``training.TrainConfig``) with the model variant and the Ray
resources. Variants of a recipe are made with :func:`dataclasses.replace`, never by copying
a recipe body. Command-line overrides go through :func:`apply_overrides`, which checks every
key and value against the dataclass field types *before* any Ray worker starts.

Paper numbers cite Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words"
(arXiv:2010.11929), Appendix B.1, Table 3 ("Hyperparameters for training. All models are
trained with a batch size of 4096 and learning rate warmup of 10k steps. For ImageNet we found
it beneficial to additionally apply gradient clipping at global norm 1. Training resolution is
224.") and Section 4.1 ("We train all models, including ResNets, using Adam with β1 = 0.9,
β2 = 0.999, a batch size of 4096 and apply a high weight decay of 0.1"; "linear learning rate
warmup and decay"; the pre-training head is "a MLP with one hidden layer", Section 3.1).

Weight decay mapping. The paper's weight decay is *decoupled* and scaled by the learning rate:
the original vit_jax code used ``flax.optim.Adam(weight_decay=wd)``, whose update is
``p <- p - lr_t * (adam_update + wd * p)``, i.e. a per-step decay of ``lr_t * wd``. PyTorch
``torch.optim.AdamW(weight_decay=wd)`` (and DeepSpeed's AdamW) applies ``p <- p * (1 - lr_t * wd)``,
the same per-step decay. So ``TrainConfig.weight_decay`` takes the paper's value unchanged
(0.1 for JFT, 0.03 for ImageNet-21k); it is NOT divided by the learning rate (that would be
the mapping for optax/big_vision-style ``wd`` that multiplies only the schedule, not lr).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from model import ViTSpec
from orchestration.experiment.config import EvalSpec, Experiment, Resources
from orchestration.experiment.recipes_beit import BEIT_RECIPES
from orchestration.experiment.recipes_deit import DEIT_RECIPES
from orchestration.experiment.recipes_mae import MAE_RECIPES
from orchestration.experiment.recipes_tokenizer import TOKENIZER_RECIPES
from orchestration.experiment.recipes_zoo import ZOO_RECIPES
from pipeline import AugmentConfig, DataConfig, IOConfig, SourceConfig
from training import TrainConfig
from training.config import CheckpointConfig, EngineConfig, OptimConfig, ScheduleConfig

# Paper dataset sizes, used only to turn Table 3's epochs into optimizer steps.
I21K_IMAGES = 14_000_000  # "ImageNet-21k ... 21k classes and 14M images" (Section 4.1)


JFT_IMAGES = 303_000_000  # "JFT ... 18k classes and 303M high-resolution images" (Section 4.1)


PAPER_BATCH = 4096  # Table 3 caption


PAPER_WARMUP = 10_000  # Table 3 caption


def _epochs_to_steps(epochs: float, images: int, batch: int = PAPER_BATCH) -> int:
    return int(round(epochs * images / batch))


def _paper_train(*, lr: float, weight_decay: float, total_steps: int, micro_batch: int,
                 engine: EngineConfig) -> TrainConfig:
    return TrainConfig(
        global_batch=PAPER_BATCH,  # Table 3 caption: "batch size of 4096"
        micro_batch=micro_batch,
        optim=OptimConfig(
            name="adamw",  # Section 4.1: Adam (decoupled weight decay, see module docstring)
            lr=lr,
            betas=(0.9, 0.999),  # Section 4.1: "β1 = 0.9, β2 = 0.999"
            weight_decay=weight_decay,
            grad_clip=1.0,  # Table 3 caption: "gradient clipping at global norm 1"
        ),
        schedule=ScheduleConfig(
            warmup_steps=PAPER_WARMUP,  # Table 3 caption: "warmup of 10k steps"
            total_steps=total_steps,
            decay="linear",  # Table 3 "LR decay" column: linear
        ),
        engine=engine,
        log_every=50,
        eval_every=5000,
        checkpoint=CheckpointConfig(every=2000),
    )


def _with(train: TrainConfig, **paths: Any) -> TrainConfig:
    """``train`` with leaves replaced by path (``**{"optim.lr": 4e-4}``): a recipe variant."""
    return train.replace(**paths)


def _paper_data(url: str) -> DataConfig:
    # JFT pre-processing is "inception crop + random horizontal flip"; the DataConfig defaults
    # (crop_scale (0.05, 1.0), hflip) are exactly that. Paper normalises to [-1, 1].
    return DataConfig(source=SourceConfig(url=url), io=IOConfig(num_workers=8))  # image_size / batch_size: from the Experiment


def vit_b16_i21k() -> Experiment:
    """ViT-B/16 on ImageNet-21k, paper Table 3 row "ViT-B/{16,32} | ImageNet-21k | 90 | 10^-3 | linear | 0.03 | 0.1".

    8 GPUs x micro 128 x accum 4 = 4096. Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe vit_b16_i21k --data s3://BUCKET/imagenet21k --resume auto
    """
    mb = 128
    return Experiment(
        name="vit_b16_i21k",
        image_size=224,  # Table 3 caption: "Training resolution is 224"
        # Table 3 dropout column 0.1 for ImageNet-21k; pre-training head = MLP with one hidden
        # layer of the model width (Section 3.1 / released i21k checkpoints: 768 for B).
        model=ViTSpec(variant="B/16", dropout=0.1, representation_size=768),
        data=_paper_data("s3://datasets/imagenet21k"),
        train=_paper_train(
            lr=1e-3,  # Table 3: base LR 10^-3 (ImageNet-21k)
            weight_decay=0.03,  # Table 3: weight decay 0.03 (ImageNet-21k)
            total_steps=_epochs_to_steps(90, I21K_IMAGES),  # Table 3: 90 epochs
            micro_batch=mb,
            engine=EngineConfig(precision="bf16", zero_stage=1),
        ),
        resources=Resources(workers=8, cpus_per_worker=8, gpus_per_worker=1),
        dataset_name="i21k",
    )


def vit_l16_i21k() -> Experiment:
    """ViT-L/16 on ImageNet-21k, paper Table 3 row "ViT-L/{16,32} | ImageNet-21k | 30/90 | 10^-3 | linear | 0.03 | 0.1".

    16 GPUs x micro 64 x accum 4 = 4096; ZeRO-2 with activation checkpointing. Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe vit_l16_i21k --data s3://BUCKET/imagenet21k --resume auto
    """
    base = vit_b16_i21k()
    return replace(
        base,
        name="vit_l16_i21k",
        model=ViTSpec(variant="L/16", dropout=0.1, representation_size=1024),  # Table 3 dropout 0.1
        train=_with(
            base.train,
            micro_batch=64,
            **{
                "optim.lr": 1e-3,  # Table 3: base LR 10^-3
                "optim.weight_decay": 0.03,  # Table 3: weight decay 0.03
                "schedule.total_steps": _epochs_to_steps(90, I21K_IMAGES),  # Table 3: "30/90" epochs; we use 90
                "engine.zero_stage": 2,
                "engine.activation_checkpointing": True,
            },
        ),
        resources=replace(base.resources, workers=16),
    )


def vit_b16_jft() -> Experiment:
    """ViT-B/16 on JFT-300M, paper Table 3 row "ViT-B/{16,32} | JFT-300M | 7 | 8·10^-4 | linear | 0.1 | 0.0".

    Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe vit_b16_jft --data s3://BUCKET/jft300m --resume auto
    """
    base = vit_b16_i21k()
    return replace(
        base,
        name="vit_b16_jft",
        model=replace(base.model, dropout=0.0, representation_size=768),  # Table 3 dropout 0.0 (JFT)
        data=base.data.replace(**{"source.url": "s3://datasets/jft300m"}),
        train=_with(
            base.train,
            **{
                "optim.lr": 8e-4,  # Table 3: base LR 8·10^-4
                "optim.weight_decay": 0.1,  # Table 3: weight decay 0.1 (JFT)
                "schedule.total_steps": _epochs_to_steps(7, JFT_IMAGES),  # Table 3: 7 epochs
                "objective.loss": "sigmoid",  # JFT is multi-label
            },
        ),
        dataset_name="jft",
    )


def vit_h14_jft() -> Experiment:
    """ViT-H/14 on JFT-300M, paper Table 3 row "ViT-H/14 | JFT-300M | 14 | 3·10^-4 | linear | 0.1 | 0.0".

    32 GPUs x micro 32 x accum 4 = 4096; ZeRO-3 + activation checkpointing. Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe vit_h14_jft --data s3://BUCKET/jft300m --resume auto
    """
    base = vit_b16_jft()
    return replace(
        base,
        name="vit_h14_jft",
        model=ViTSpec(variant="H/14", dropout=0.0, representation_size=1280),  # Table 3 dropout 0.0
        train=_with(
            base.train,
            micro_batch=32,
            **{
                "optim.lr": 3e-4,  # Table 3: base LR 3·10^-4
                "optim.weight_decay": 0.1,  # Table 3: weight decay 0.1
                "schedule.total_steps": _epochs_to_steps(14, JFT_IMAGES),  # Table 3: 14 epochs
                "engine.zero_stage": 3,
                "engine.activation_checkpointing": True,
            },
        ),
        resources=replace(base.resources, workers=32),
    )


def vit_l16_jft() -> Experiment:
    """ViT-L/16 on JFT-300M, paper Table 3 row "ViT-L/16 | JFT-300M | 7/14 | 4·10^-4 | linear | 0.1 | 0.0".

    Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe vit_l16_jft --data s3://BUCKET/jft300m --resume auto
    """
    base = vit_l16_i21k()
    return replace(
        base,
        name="vit_l16_jft",
        model=replace(base.model, dropout=0.0, representation_size=1024),  # Table 3 dropout 0.0
        data=base.data.replace(**{"source.url": "s3://datasets/jft300m"}),
        train=_with(
            base.train,
            **{
                "optim.lr": 4e-4,  # Table 3: base LR 4·10^-4
                "optim.weight_decay": 0.1,  # Table 3: weight decay 0.1
                "schedule.total_steps": _epochs_to_steps(7, JFT_IMAGES),  # Table 3: "7/14" epochs; we use 7
                "objective.loss": "sigmoid",
            },
        ),
        dataset_name="jft",
    )


def vit_s16_t4() -> Experiment:
    """ViT-S/16 on a single T4 (16 GB, fp16): width 384, 6 heads, 12 layers, MLP 1536, 224 px.

    Micro batch 32 x accumulation 4 = 128 images per optimizer step; AdamW lr 1e-3,
    weight decay 0.1, 1000 warmup steps, 50000 steps, fp16. ``make smoke`` uses it when a CUDA
    GPU is present (with ``--set train.schedule.total_steps=...`` to keep it short). Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe vit_s16_t4 --data s3://BUCKET/demo --resume auto
    """
    mb = 32
    return Experiment(
        name="vit_s16_t4",
        image_size=224,
        # Spelled out (not just "S/16") so the T4 shape is pinned here even if the table changes.
        model=ViTSpec(variant="S/16", width=384, heads=6, depth=12, mlp_dim=1536, patch_size=16),
        data=DataConfig(source=SourceConfig(url="s3://vitscale/demo"), io=IOConfig(num_workers=4)),
        train=TrainConfig(
            global_batch=mb * 4,  # micro 32 x accumulation 4 x 1 GPU
            grad_accum=None,  # derived: 128 / (32 x 1 worker) = 4 (more GPUs -> less accumulation)
            micro_batch=mb,
            optim=OptimConfig(name="adamw", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1, grad_clip=1.0),
            schedule=ScheduleConfig(warmup_steps=1000, total_steps=50_000, decay="linear"),
            engine=EngineConfig(precision="fp16", zero_stage=0),  # T4 has no bf16
            log_every=20,
            eval_every=2000,
            checkpoint=CheckpointConfig(every=1000),
        ),
        resources=Resources(workers=1, cpus_per_worker=4, gpus_per_worker=1),
        dataset_name="demo",
    )


def vit_mu_smoke() -> Experiment:
    """Tiny ViT ("mu/4") on the digits demo shards at 32 px: 2 CPU workers, DeepSpeed ZeRO-1 on gloo.

    A few hundred steps; what ``make smoke`` and the integration tests run on a laptop. Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe vit_mu_smoke --data s3://vitscale/digits --resume auto
    """
    mb = 32
    return Experiment(
        name="vit_mu_smoke",
        image_size=32,
        model=ViTSpec(variant="mu/4"),
        data=DataConfig(source=SourceConfig(url="s3://vitscale/digits"), io=IOConfig(num_workers=1, shuffle_buffer=256), augment=AugmentConfig(crop_scale=(0.6, 1.0), hflip=False)),
        train=TrainConfig(
            global_batch=mb * 2,  # micro 32 x 2 workers, no accumulation
            micro_batch=mb,
            optim=OptimConfig(name="adamw", lr=3e-3, betas=(0.9, 0.999), weight_decay=0.05, grad_clip=1.0),
            schedule=ScheduleConfig(warmup_steps=30, total_steps=300, decay="linear"),
            engine=EngineConfig(precision="fp32", zero_stage=1),
            log_every=10,
            eval_every=100,
            checkpoint=CheckpointConfig(every=100),
        ),
        resources=Resources(workers=2, cpus_per_worker=1, gpus_per_worker=0),
        dataset_name="digits",
    )


def vit_study() -> Experiment:
    """The base of every scaling-law / hyper-parameter study: each Tune trial is this recipe with the
    trial's size, length, training-set size and seed as overrides (``orchestration.studies``).

    One process per trial (no accumulation), cosine decay, 5% warmup at every trial length (the
    ``warmup_steps / total_steps`` ratio is kept when a trial sets its own length), inception
    crop from 35% and horizontal flips. Launch a study, or one run of it::

        python orchestration/sweep.py --variants mu,Ti,S --steps 500,1000 --data s3://vitscale/digits
        python orchestration/pretrain.py --recipe vit_study --data s3://vitscale/digits
    """
    return Experiment(
        name="vit_study",
        image_size=32,
        model=ViTSpec(variant="mu/4"),  # each trial sets its own size
        data=DataConfig(source=SourceConfig(url="s3://vitscale/digits", split="train"), io=IOConfig(num_workers=1), augment=AugmentConfig(crop_scale=(0.35, 1.0), hflip=True)),
        train=TrainConfig(global_batch=64, micro_batch=64,
                          optim=OptimConfig(lr=1e-3, weight_decay=0.05),
                          schedule=ScheduleConfig(warmup_steps=50, total_steps=1000, decay="cosine"),
                          checkpoint=CheckpointConfig(keep=1)),
        eval=EvalSpec(split="val"),
        resources=Resources(max_failures=1),
        dataset_name="study",
    )


RECIPES: dict[str, Callable[[], Experiment]] = {
    f.__name__: f
    for f in (vit_b16_i21k, vit_l16_i21k, vit_b16_jft, vit_l16_jft, vit_h14_jft, vit_s16_t4, vit_mu_smoke, vit_study,
              *MAE_RECIPES, *ZOO_RECIPES, *DEIT_RECIPES, *BEIT_RECIPES, *TOKENIZER_RECIPES)
}


def get_recipe(name: str) -> Experiment:
    """The experiment of recipe ``name``; unknown names list the valid ones."""
    try:
        return RECIPES[name]()
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(sorted(RECIPES))}") from None
