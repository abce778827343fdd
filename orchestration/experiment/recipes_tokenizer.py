"""Tokenizer recipes (docs/tokenizer.md): the first stage of BEiT, a discrete VAE trained on the
user's own images (no labels) and registered as ``dvae-v<vocab>p<patch>-<dataset>``; BEiT
pre-training then predicts its tokens.

The objective and its schedules are DALL-E's dVAE (Ramesh et al. 2021, "Zero-Shot Text-to-Image
Generation", arXiv:2102.12092, Appendix A.2 "Training the dVAE"); BEiT v1 (Bao et al. 2021,
arXiv:2106.08254, Section 2.1) used that tokenizer, with a vocabulary of 8192 and one token per
16 x 16 patch of a 224 px image (14 x 14 tokens). Every number below names its source.
"""

from __future__ import annotations

from collections.abc import Callable

from model.tokenizer import DVAESpec
from orchestration.experiment.config import Experiment, Resources
from orchestration.experiment.imagenet import IMAGENET_MEAN, IMAGENET_STD
from pipeline import AugmentConfig, DataConfig, IOConfig, PreprocessConfig, SourceConfig
from training import TrainConfig
from training.config import CheckpointConfig, EngineConfig, OptimConfig, ScheduleConfig
from training.objectives import DVAEObjectiveConfig

DALLE_BATCH = 512  # A.2: "64 ... V100 GPUs, with a per-GPU batch size of 8, resulting in a total batch size of 512"


def dvae_tokenizer_i21k() -> Experiment:
    """A dVAE tokenizer for BEiT on ImageNet-21k images, labels unused: vocabulary 8192, one token
    per 16 x 16 patch at 224 px (BEiT v1's tokenizer shape), DALL-E's optimizer and schedules.

    8 GPUs x micro 64 = DALL-E's batch 512; bf16, ZeRO-1. Registered as ``dvae-v8192p16-i21k``
    with tags vocab_size / patch_size / image_size; a final codebook usage under
    ``train.objective.min_usage`` (0.5) fails the run instead. Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe dvae_tokenizer_i21k --data s3://BUCKET/imagenet21k --resume auto
    """
    return Experiment(
        name="dvae_tokenizer_i21k",
        image_size=224,  # BEiT: 224 px images, 14 x 14 patches of 16 px
        model=DVAESpec(vocab_size=8192, patch_size=16),  # BEiT 2.1 / DALL-E: "a vocabulary of 8192"
        data=DataConfig(
            source=SourceConfig(url="s3://datasets/imagenet21k"),
            # Our choice (A.2 names no augmentation for the dVAE): mild crops and flips, the tokens
            # must describe whole images as BEiT's crops show them.
            augment=AugmentConfig(crop_scale=(0.35, 1.0), hflip=True),
            preprocess=PreprocessConfig(mean=IMAGENET_MEAN, std=IMAGENET_STD),
            io=IOConfig(num_workers=8),
        ),
        train=TrainConfig(
            global_batch=DALLE_BATCH,
            micro_batch=64,
            optim=OptimConfig(
                name="adamw",
                lr=1e-4,  # A.2: "the step size is annealed from 1e-4 to 1.25e-6 ... using a cosine schedule"
                betas=(0.9, 0.999),  # A.2: "AdamW ... beta1 = 0.9, beta2 = 0.999, epsilon = 1e-8"
                weight_decay=1e-4,  # A.2: "weight decay multiplier 1e-4"
                grad_clip=0.0,
            ),
            # A.2 anneals the step size over 1,200,000 updates (and trains on at its floor to 3M
            # updates: extend with --set train.schedule.total_steps=3000000); no warm-up.
            schedule=ScheduleConfig(warmup_steps=0, total_steps=1_200_000, decay="cosine", min_lr=1.25e-6),
            objective=DVAEObjectiveConfig(
                tau_start=1.0, tau_end=1 / 16, tau_steps=150_000,  # A.2: tau "from 1 to 1/16 over the first 150,000 updates"
                kl_weight=6.6, kl_warmup_steps=5_000,  # A.2: beta "from 0 to 6.6 over the first 5000 updates"
                min_usage=0.5,
            ),
            engine=EngineConfig(precision="bf16", zero_stage=1),
            log_every=100,
            eval_every=10_000,
            checkpoint=CheckpointConfig(every=5_000),
        ),
        resources=Resources(workers=8, cpus_per_worker=8, gpus_per_worker=1),
        dataset_name="i21k",
    )


def dvae_tokenizer_digits() -> Experiment:
    """A tiny dVAE tokenizer of the digits demo shards (labels unused): 16 px images, 4 x 4 tokens
    of 4 px patches, a vocabulary of 32, DALL-E's loss and schedules compressed to 60 steps; 2 CPU
    workers, about ten seconds. What the tests and the laptop examples run (docs/tokenizer.md).
    Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe dvae_tokenizer_digits --data s3://vitscale/digits
    """
    base = dvae_tokenizer_i21k()
    return Experiment(
        name="dvae_tokenizer_digits",
        image_size=16,
        model=DVAESpec(vocab_size=32, patch_size=4, hidden=16, embed_dim=32),
        data=DataConfig(source=SourceConfig(url="s3://vitscale/digits"),
                        augment=AugmentConfig(crop_scale=(0.8, 1.0), hflip=False),  # digits are not mirror images
                        io=IOConfig(num_workers=1, shuffle_buffer=256)),
        train=base.train.replace(global_batch=64, micro_batch=32, log_every=10, eval_every=30, **{
            "optim.lr": 3e-3,  # a 60k-parameter model, 60 steps
            "schedule.warmup_steps": 6, "schedule.total_steps": 60, "schedule.min_lr": 0.0,
            # DALL-E anneals tau over 1/8 of its lr schedule; 60 steps need 4/5 of the run to get there
            # (measured: usage and reconstruction on the eval split), the KL ramp over the first 1/10.
            "objective.tau_steps": 48, "objective.kl_warmup_steps": 6,
            "engine.precision": "fp32", "checkpoint.every": 30}),
        resources=Resources(workers=2),
        dataset_name="digits",
    )


TOKENIZER_RECIPES: tuple[Callable[[], Experiment], ...] = (dvae_tokenizer_i21k, dvae_tokenizer_digits)
