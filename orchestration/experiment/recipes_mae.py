"""MAE recipes (docs/mae.md): self-supervised pre-training of our ViT without labels.

He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners" (arXiv:2111.06377) and
facebookresearch/mae (PRETRAIN.md, main_pretrain.py, models_mae.py); every number below names
its line there. Registered models are named ``mae-vit-...``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from model import ViTSpec
from orchestration.experiment.config import Experiment, Resources
from orchestration.experiment.imagenet import IMAGENET_MEAN, IMAGENET_STD, epochs_to_steps
from pipeline import AugmentConfig, DataConfig, IOConfig, PreprocessConfig, SourceConfig
from training import TrainConfig
from training.config import CheckpointConfig, EngineConfig, OptimConfig, ScheduleConfig
from training.objectives import MAEConfig

# ----------------------------------------------------------------------------- MAE
# He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners" (arXiv:2111.06377) and
# facebookresearch/mae (PRETRAIN.md, main_pretrain.py, models_mae.py). MAE's schedule is counted
# in ImageNet-1k epochs; the recipes keep its number of images seen (800 epochs of 1.28M images
# = 250k steps of 4096), which on ImageNet-21k is ~73 of its epochs: the same compute.
MAE_BATCH = 4096  # PRETRAIN.md: "the effective batch size is 64 (batch_size per gpu) * 8 (nodes) * 8 (gpus per node) = 4096"
# IN1K_IMAGES, IMAGENET_MEAN / _STD (main_pretrain.py: transforms.Normalize(mean=[0.485, ...], std=[0.229, ...])):
# orchestration.experiment.imagenet, imported above.


def mae_lr(batch: int, blr: float = 1.5e-4) -> float:
    """MAE's linear scaling rule: ``lr = blr * batch / 256`` (PRETRAIN.md; ``--blr 1.5e-4``)."""
    return blr * batch / 256


def _mae_train(*, micro_batch: int, engine: EngineConfig) -> TrainConfig:
    steps = epochs_to_steps(800, MAE_BATCH)  # PRETRAIN.md: "--epochs 800"
    return TrainConfig(
        global_batch=MAE_BATCH,
        micro_batch=micro_batch,
        optim=OptimConfig(
            name="adamw",
            lr=mae_lr(MAE_BATCH),  # 2.4e-3
            betas=(0.9, 0.95),  # main_pretrain.py: AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95))
            weight_decay=0.05,  # PRETRAIN.md: "--weight_decay 0.05"
            grad_clip=0.0,  # engine_pretrain.py: the loss scaler is called without clip_grad
        ),
        schedule=ScheduleConfig(
            warmup_steps=epochs_to_steps(40, MAE_BATCH),  # "--warmup_epochs 40"
            total_steps=steps,
            decay="cosine",  # util/lr_sched.py: half-cycle cosine after warmup
        ),
        objective=MAEConfig(
            mask_ratio=0.75,  # "--mask_ratio 0.75"
            norm_pix_loss=True,  # "--norm_pix_loss" (the released models)
            decoder_width=512, decoder_depth=8, decoder_heads=16, decoder_mlp_dim=2048,  # mae_vit_*_dec512d8b
        ),
        engine=engine,
        log_every=50,
        eval_every=5000,
        checkpoint=CheckpointConfig(every=2000),
    )


def _mae_data(url: str) -> DataConfig:
    return DataConfig(
        source=SourceConfig(url=url),
        # main_pretrain.py: RandomResizedCrop(input_size, scale=(0.2, 1.0)) + RandomHorizontalFlip, nothing else
        augment=AugmentConfig(crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=True),
        preprocess=PreprocessConfig(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        io=IOConfig(num_workers=8),
    )


def mae_vit_b16_i21k() -> Experiment:
    """MAE pre-training of ViT-B/16 on ImageNet-21k images, labels unused (MAE PRETRAIN.md settings).

    32 GPUs x micro 128 = 4096; bf16, ZeRO-1. The encoder (no head) is registered as
    ``mae-vit-b16-i21k``; fine-tune it with ``finetune.py --from models:/mae-vit-b16-i21k/latest``
    (MAE's protocol: layer decay 0.65, mean pooling). Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe mae_vit_b16_i21k --data s3://BUCKET/imagenet21k --resume auto
    """
    return Experiment(
        name="mae_vit_b16_i21k",
        image_size=224,  # "--input_size 224"
        # models_mae.py: a class token, a fixed 2-D sin-cos position embedding, no head.
        model=ViTSpec(variant="B/16", posemb="sincos2d"),
        data=_mae_data("s3://datasets/imagenet21k"),
        train=_mae_train(micro_batch=128, engine=EngineConfig(precision="bf16", zero_stage=1)),
        resources=Resources(workers=32, cpus_per_worker=8, gpus_per_worker=1),
        dataset_name="i21k",
    )


def mae_vit_l16_i21k() -> Experiment:
    """MAE pre-training of ViT-L/16 (PRETRAIN.md's "recommended default": 64 GPUs x 64 = 4096).

    bf16, ZeRO-1. Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe mae_vit_l16_i21k --data s3://BUCKET/imagenet21k --resume auto
    """
    base = mae_vit_b16_i21k()
    return replace(base, name="mae_vit_l16_i21k", model=ViTSpec(variant="L/16", posemb="sincos2d"),
                   train=base.train.replace(micro_batch=64), resources=replace(base.resources, workers=64))


def mae_vit_h14_i21k() -> Experiment:
    """MAE pre-training of ViT-H/14: 64 GPUs x micro 32 x accumulation 2 = 4096; ZeRO-2 with
    activation checkpointing (the encoder sees 64 of 256 patches; the decoder all of them). Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe mae_vit_h14_i21k --data s3://BUCKET/imagenet21k --resume auto
    """
    base = mae_vit_b16_i21k()
    return replace(base, name="mae_vit_h14_i21k", model=ViTSpec(variant="H/14", posemb="sincos2d"),
                   train=base.train.replace(micro_batch=32, **{"engine.zero_stage": 2,
                                                               "engine.activation_checkpointing": True}),
                   resources=replace(base.resources, workers=64))


def mae_vit_mu_digits() -> Experiment:
    """MAE on the digits demo shards without their labels: the mu ViT at 32 px (8 x 8 patches of
    4 px), a 1-block decoder of width 32, MAE's mask ratio, optimizer and loss; 2 CPU workers.
    What the tests and the laptop examples run. Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe mae_vit_mu_digits --data s3://vitscale/digits
    """
    base = mae_vit_b16_i21k()
    return Experiment(
        name="mae_vit_mu_digits",
        image_size=32,
        model=ViTSpec(variant="mu/4", posemb="sincos2d"),
        data=DataConfig(source=SourceConfig(url="s3://vitscale/digits"),
                        augment=AugmentConfig(crop_scale=(0.5, 1.0), hflip=False),  # 8x8-pixel digits: mild crops, no flips
                        io=IOConfig(num_workers=1, shuffle_buffer=256)),
        train=base.train.replace(global_batch=64, micro_batch=32, log_every=10, eval_every=100, **{
            "optim.lr": mae_lr(64, blr=6e-3),  # a higher base lr for a 60k-parameter model
            "schedule.warmup_steps": 20, "schedule.total_steps": 300,
            "objective.decoder_width": 32, "objective.decoder_depth": 1, "objective.decoder_heads": 2,
            "objective.decoder_mlp_dim": 64, "engine.precision": "fp32", "checkpoint.every": 100}),
        resources=Resources(workers=2),
        dataset_name="digits",
    )


MAE_RECIPES: tuple[Callable[[], Experiment], ...] = (mae_vit_b16_i21k, mae_vit_l16_i21k, mae_vit_h14_i21k,
                                                     mae_vit_mu_digits)
