"""DeiT recipes: distilling a teacher into a ViT (Touvron et al. 2020, "Training data-efficient image
transformers & distillation through attention", arXiv:2012.12877; facebookresearch/deit).

Numbers cite DeiT's ``main.py`` defaults (the command its README gives for DeiT-B distilled adds
``--distillation-type hard --teacher-model regnety_160``) and the paper's Table 9 ("Ingredients
and hyper-parameters": batch 1024, AdamW lr 0.0005 x bs/512, cosine, wd 0.05, warm-up 5 epochs,
label smoothing 0.1, stochastic depth 0.1, repeated augmentation, RandAugment 9/0.5, mixup 0.8,
cutmix 1.0, random erasing 0.25, 300 epochs). DeiT-B distilled from a RegNetY-16GF (82.9%) reaches
83.4% top-1 on ImageNet-1k at 224 (Table 5), DeiT-B alone 81.8%.

The digits pair (``deit_teacher_digits`` -> ``deit_mu_distilled_digits``) is what the tests and a
laptop run: a teacher trained and registered by the pipeline, then a small student distilled
from it (``docs/distillation.md``).
"""

from __future__ import annotations

from collections.abc import Callable

from model import TimmSpec, ViTSpec
from orchestration.experiment.config import EvalSpec, Experiment, Resources
from orchestration.experiment.imagenet import IMAGENET_MEAN, IMAGENET_STD, epochs_to_steps
from orchestration.experiment.recipes_zoo import DEIT_BATCH, deit_lr
from pipeline import AugmentConfig, DataConfig, IOConfig, PreprocessConfig, SourceConfig
from training import TrainConfig
from training.config import CheckpointConfig, EngineConfig, OptimConfig, ScheduleConfig
from training.objectives import ClassificationConfig, DistillConfig


def deit_b16_distilled_i1k() -> Experiment:
    """DeiT-B/16 distilled (the alembic model, 83.4%) on ImageNet-1k from a RegNetY-16GF teacher,
    hard distillation. 16 GPUs x micro 64 = 1024, bf16 (DeiT: AMP), ZeRO-1. The teacher's weights
    must be safetensors (convert DeiT's ``regnety_160-a5fe301d.pth`` once, where you trust it);
    every rank loads it. Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe deit_b16_distilled_i1k --data s3://BUCKET/imagenet1k --resume auto \\
            --set train.objective.teacher=timm:regnety_160=s3://BUCKET/teachers/regnety_160.safetensors
    """
    mb = 64
    return Experiment(
        name="deit_b16_distilled_i1k",
        image_size=224,  # main.py --input-size 224
        # --model deit_base_distilled_patch16_224: B/16 + distillation token; --drop 0.0, --drop-path 0.1
        model=ViTSpec(variant="B/16", drop_path=0.1, distilled=True),
        data=DataConfig(
            source=SourceConfig(url="s3://datasets/imagenet1k"),
            augment=AugmentConfig(
                crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),  # timm create_transform: RandomResizedCrop
                hflip=True,  # --hflip 0.5 (timm's default)
                randaugment=(2, 9),  # --aa rand-m9-mstd0.5-inc1: 2 ops (timm's default), magnitude 9
                mixup_alpha=0.8, cutmix_alpha=1.0,  # --mixup 0.8 --cutmix 1.0, switched with prob 0.5
                random_erasing=0.25,  # --reprob 0.25
                repeats=3,  # --repeated-aug (RASampler, num_repeats=3)
            ),
            preprocess=PreprocessConfig(mean=IMAGENET_MEAN, std=IMAGENET_STD, eval_crop_pct=0.875),  # --eval-crop-ratio
            io=IOConfig(num_workers=10),  # --num_workers 10
        ),
        train=TrainConfig(
            global_batch=DEIT_BATCH,
            micro_batch=mb,
            optim=OptimConfig(name="adamw", lr=deit_lr(DEIT_BATCH),  # --opt adamw --lr 5e-4 (x 1024/512)
                              betas=(0.9, 0.999), eps=1e-8,  # --opt-eps 1e-8; timm's AdamW betas
                              weight_decay=0.05,  # --weight-decay 0.05
                              grad_clip=0.0),  # --clip-grad None
            schedule=ScheduleConfig(warmup_steps=epochs_to_steps(5, DEIT_BATCH),  # --warmup-epochs 5
                                    total_steps=epochs_to_steps(300, DEIT_BATCH),  # --epochs 300
                                    decay="cosine", min_lr=1e-5),  # --sched cosine --min-lr 1e-5
            objective=DistillConfig(
                type="hard", alpha=0.5, tau=1.0,  # --distillation-type hard --distillation-alpha 0.5 --distillation-tau 1.0
                loss="softmax", label_smoothing=0.1,  # --smoothing 0.1 (inside the mixup targets)
                teacher="timm:regnety_160=s3://models/deit/regnety_160.safetensors",  # --teacher-model regnety_160
            ),
            engine=EngineConfig(precision="bf16", zero_stage=1),
            log_every=50,
            eval_every=5000,
            checkpoint=CheckpointConfig(every=2000),
        ),
        resources=Resources(workers=16, cpus_per_worker=10, gpus_per_worker=1),
        dataset_name="i1k",
        registered_model_name="deit-b16-distilled-i1k",
    )


# ----------------------------------------------------------------------------- digits (CPU)
#: The data-starved set-up of the digits pair (docs/distillation.md, tests/test_distill_digits.py):
#: 16 px digits; the convnet teacher learns from the whole train split, the ViT student from its
#: first 90 images (``data.source.limit_samples``), with crops down to a quarter of the image.
DIGITS_SIZE = 16
DIGITS_FEW = 90
DIGITS_CROP = (0.25, 1.0)
DIGITS_STEPS = 600


def _digits(name: str, model: ViTSpec | TimmSpec, objective: ClassificationConfig | DistillConfig, *,
            crop: tuple[float, float], steps: int, limit: int | None, registered: str) -> Experiment:
    return Experiment(
        name=name,
        image_size=DIGITS_SIZE,
        model=model,
        data=DataConfig(source=SourceConfig(url="s3://vitscale/digits-16", limit_samples=limit),
                        augment=AugmentConfig(crop_scale=crop, hflip=False),  # digits: no flips
                        # 90 images are one batch an epoch: a loader process started for every epoch
                        # would cost more than the decoding it takes off the training process
                        io=IOConfig(num_workers=0 if limit else 1, shuffle_buffer=256)),
        train=TrainConfig(global_batch=64, micro_batch=64, log_every=50, eval_every=0, profile="cpu",
                          optim=OptimConfig(lr=3e-3, weight_decay=0.05),
                          schedule=ScheduleConfig(warmup_steps=steps // 10, total_steps=steps, decay="cosine"),
                          objective=objective, engine=EngineConfig(precision="fp32", zero_stage=1),
                          checkpoint=CheckpointConfig(every=steps)),
        eval=EvalSpec(split="val"),
        resources=Resources(workers=1),
        dataset_name="digits",
        registered_model_name=registered,
    )


def deit_teacher_digits() -> Experiment:
    """The convnet teacher of the digits pair, as DeiT's is a convnet: timm's ``test_resnet`` (a
    ResNet of the zoo's ResNet family: one block per stage, widths 32-48-48-96, 0.37M parameters,
    so that a 2-core machine runs it inside every student step) at 16 px on the whole train
    split, 300 steps, milder crops (0.6, 1). Registered as ``deit-teacher-digits``. Launch::

        python orchestration/pretrain.py --recipe deit_teacher_digits --data s3://vitscale/digits-16
        # then alias the version the student distils from (docs/distillation.md):
        # MlflowClient().set_registered_model_alias("deit-teacher-digits", "champion", VERSION)
    """
    return _digits("deit_teacher_digits", TimmSpec(name="test_resnet"),
                   ClassificationConfig(label_smoothing=0.1), crop=(0.6, 1.0), steps=300, limit=None,
                   registered="deit-teacher-digits")


def deit_mu_distilled_digits() -> Experiment:
    """The student of the digits pair: the mu ViT (``mu/4``) with DeiT's distillation token, on the
    first 90 images of the train split, distilled from ``models:/deit-teacher-digits@champion``
    with DeiT's objective (hard, alpha 0.5, tau 1, label smoothing 0.1), 600 steps of 64 with
    crops down to a quarter of the image. Launch::

        python orchestration/pretrain.py --recipe deit_mu_distilled_digits --data s3://vitscale/digits-16
    """
    return _digits("deit_mu_distilled_digits", ViTSpec(variant="mu/4", distilled=True),
                   DistillConfig(type="hard", alpha=0.5, tau=1.0, label_smoothing=0.1,
                                 teacher="models:/deit-teacher-digits@champion"),
                   crop=DIGITS_CROP, steps=DIGITS_STEPS, limit=DIGITS_FEW, registered="deit-mu-distilled-digits")


def vit_mu_digits_few() -> Experiment:
    """The digits pair's control: the same student without a teacher (no distillation token,
    classification with the same smoothing), same data, steps and seed. Launch::

        python orchestration/pretrain.py --recipe vit_mu_digits_few --data s3://vitscale/digits-16
    """
    return _digits("vit_mu_digits_few", ViTSpec(variant="mu/4"), ClassificationConfig(label_smoothing=0.1),
                   crop=DIGITS_CROP, steps=DIGITS_STEPS, limit=DIGITS_FEW, registered="vit-mu-digits-few")


DEIT_RECIPES: tuple[Callable[[], Experiment], ...] = (deit_b16_distilled_i1k, deit_teacher_digits,
                                                      deit_mu_distilled_digits, vit_mu_digits_few)
