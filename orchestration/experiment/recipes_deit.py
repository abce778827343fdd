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

from model import ViTSpec
from orchestration.experiment.config import EvalSpec, Experiment, Resources
from pipeline import AugmentConfig, DataConfig, IOConfig, PreprocessConfig, SourceConfig
from training import TrainConfig
from training.config import CheckpointConfig, EngineConfig, OptimConfig, ScheduleConfig
from training.objectives import ClassificationConfig, DistillConfig

DEIT_IMAGES = 1_281_167  # ImageNet-1k train images: DeiT's epochs are over it
DEIT_BATCH = 1024  # Table 9: batch size 1024 (main.py --batch-size 64 per GPU x 16 GPUs)
DEIT_MEAN = (0.485, 0.456, 0.406)  # datasets.py: timm's IMAGENET_DEFAULT_MEAN / _STD
DEIT_STD = (0.229, 0.224, 0.225)


def deit_lr(batch: int, base: float = 5e-4) -> float:
    """DeiT's scaling rule (main.py): ``lr = 5e-4 * batch / 512``."""
    return base * batch / 512


def _epochs(epochs: float, batch: int = DEIT_BATCH) -> int:
    return int(round(epochs * DEIT_IMAGES / batch))


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
            preprocess=PreprocessConfig(mean=DEIT_MEAN, std=DEIT_STD, eval_crop_pct=0.875),  # --eval-crop-ratio
            io=IOConfig(num_workers=10),  # --num_workers 10
        ),
        train=TrainConfig(
            global_batch=DEIT_BATCH,
            micro_batch=mb,
            optim=OptimConfig(name="adamw", lr=deit_lr(DEIT_BATCH),  # --opt adamw --lr 5e-4 (x 1024/512)
                              betas=(0.9, 0.999), eps=1e-8,  # --opt-eps 1e-8; timm's AdamW betas
                              weight_decay=0.05,  # --weight-decay 0.05
                              grad_clip=0.0),  # --clip-grad None
            schedule=ScheduleConfig(warmup_steps=_epochs(5),  # --warmup-epochs 5
                                    total_steps=_epochs(300),  # --epochs 300
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


def _digits_data(repeats: int) -> DataConfig:
    return DataConfig(source=SourceConfig(url="s3://vitscale/digits"),
                      augment=AugmentConfig(crop_scale=(0.5, 1.0), hflip=False, repeats=repeats),  # digits: no flips
                      io=IOConfig(num_workers=1, shuffle_buffer=256))


def deit_teacher_digits() -> Experiment:
    """The teacher of the digits pair, trained and registered by the pipeline (``deit-teacher-digits``):
    for now a ViT 4 blocks x 64 wide at 32 px, 600 steps (once the timm zoo is a model kind, a small
    convnet, as DeiT's teacher is). Launch::

        python orchestration/pretrain.py --recipe deit_teacher_digits --data s3://vitscale/digits
        # then: mlflow's registry alias, e.g. client.set_registered_model_alias("deit-teacher-digits", "champion", 1)
    """
    return Experiment(
        name="deit_teacher_digits",
        image_size=32,
        model=ViTSpec(variant="mu/4", width=64, depth=4, heads=4, mlp_dim=128),
        data=_digits_data(repeats=1),
        train=TrainConfig(global_batch=64, micro_batch=64, log_every=50, eval_every=0, profile="cpu",
                          optim=OptimConfig(lr=3e-3, weight_decay=0.05),
                          schedule=ScheduleConfig(warmup_steps=30, total_steps=600, decay="cosine"),
                          objective=ClassificationConfig(label_smoothing=0.1),
                          engine=EngineConfig(precision="fp32", zero_stage=1)),
        eval=EvalSpec(split="val"),
        resources=Resources(workers=1),
        dataset_name="digits",
        registered_model_name="deit-teacher-digits",
    )


def deit_mu_distilled_digits() -> Experiment:
    """The student of the digits pair: the mu ViT with DeiT's distillation token, distilled from
    ``models:/deit-teacher-digits@champion`` with DeiT's objective (hard, alpha 0.5, tau 1) and
    repeated augmentation x3, a short schedule. Launch::

        python orchestration/pretrain.py --recipe deit_mu_distilled_digits --data s3://vitscale/digits
    """
    return Experiment(
        name="deit_mu_distilled_digits",
        image_size=32,
        model=ViTSpec(variant="mu/4", distilled=True),
        data=_digits_data(repeats=3),
        train=TrainConfig(global_batch=64, micro_batch=64, log_every=50, eval_every=0, profile="cpu",
                          optim=OptimConfig(lr=3e-3, weight_decay=0.05),
                          schedule=ScheduleConfig(warmup_steps=15, total_steps=150, decay="cosine"),
                          objective=DistillConfig(type="hard", alpha=0.5, tau=1.0, label_smoothing=0.1,
                                                  teacher="models:/deit-teacher-digits@champion"),
                          engine=EngineConfig(precision="fp32", zero_stage=1)),
        eval=EvalSpec(split="val"),
        resources=Resources(workers=1),
        dataset_name="digits",
        registered_model_name="deit-mu-distilled-digits",
    )


DEIT_RECIPES = (deit_b16_distilled_i1k, deit_teacher_digits, deit_mu_distilled_digits)
