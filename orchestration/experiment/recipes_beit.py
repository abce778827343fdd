"""BEiT recipes (docs/beit.md): masked image modelling of a frozen tokenizer's visual tokens.

Bao et al. 2021, "BEiT: BERT Pre-Training of Image Transformers" (arXiv:2106.08254) and
microsoft/unilm ``beit/``: ``README.md`` (the pre-training commands), ``run_beit_pretraining.py``
(argument defaults), ``datasets.py`` (``DataAugmentationForBEiT``), ``masking_generator.py`` and
``modeling_pretrain.py``. Every number below names its line there. The tokenizer is the second
stage's input: a dVAE trained and registered by a tokenizer run of this pipeline (BEiT v1 took
DALL-E's, which cannot be downloaded here). Registered models are named ``beit-...``.
"""

from __future__ import annotations

from collections.abc import Callable

from model import TimmSpec
from orchestration.experiment.config import Experiment, Resources
from orchestration.experiment.imagenet import epochs_to_steps
from pipeline import AugmentConfig, DataConfig, IOConfig, PreprocessConfig, SourceConfig
from pipeline.masking import MaskConfig
from training import TrainConfig
from training.config import CheckpointConfig, EngineConfig, OptimConfig, ScheduleConfig
from training.objectives import BEiTConfig
from training.objectives.beit import BEIT_MASK_RATIO

#: README.md: "Effective batch size = number of GPUs * --batch_size ... 128*16 = 2048".
BEIT_BATCH = 2048
#: ImageNet-22k's train images (BEiT's "ImageNet-22k ... 14M images"); its schedule is in these epochs.
I22K_IMAGES = 14_197_122
#: datasets.py: IMAGENET_INCEPTION_MEAN / _STD (0.5, 0.5, 0.5) unless --imagenet_default_mean_and_std,
#: which the ImageNet-22k command does not pass (README.md: "We use (0.5, 0.5, 0.5) ... by default on
#: other pre-training data").
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


def _beit_train(*, micro_batch: int, warmup_steps: int, total_steps: int, tokenizer: str) -> TrainConfig:
    return TrainConfig(
        global_batch=BEIT_BATCH,
        micro_batch=micro_batch,
        optim=OptimConfig(
            name="adamw",  # run_beit_pretraining.py: --opt adamw
            lr=1.5e-3,  # README.md: "--lr 1.5e-3" at batch 2048
            betas=(0.9, 0.999),  # --opt_betas default [0.9, 0.999]
            eps=1e-8,  # --opt_eps 1e-8
            weight_decay=0.05,  # --weight_decay 0.05
            grad_clip=3.0,  # README.md: "--clip_grad 3.0"
        ),
        schedule=ScheduleConfig(warmup_steps=warmup_steps, total_steps=total_steps,
                                decay="cosine", min_lr=1e-5),  # utils.cosine_scheduler, --min_lr 1e-5
        objective=BEiTConfig(
            mask_ratio=BEIT_MASK_RATIO,  # README.md: "--num_mask_patches 75" of 196
            vocab_size=8192,  # beit_base_patch16_224_8k_vocab: vocab_size=8192 (DALL-E's codebook)
            tokenizer=tokenizer,
        ),
        engine=EngineConfig(precision="bf16", zero_stage=1),
        log_every=50,
        eval_every=5000,
        checkpoint=CheckpointConfig(every=2000),
    )


def _beit_data(url: str, mean: tuple[float, float, float], std: tuple[float, float, float]) -> DataConfig:
    return DataConfig(
        source=SourceConfig(url=url),
        # datasets.py DataAugmentationForBEiT: ColorJitter(0.4, 0.4, 0.4), RandomHorizontalFlip(0.5),
        # RandomResizedCropAndInterpolationWithTwoPic (transforms.py: scale (0.08, 1.0), ratio (3/4, 4/3)).
        augment=AugmentConfig(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=True, color_jitter=0.4),
        preprocess=PreprocessConfig(mean=mean, std=std),
        # masking_generator.py: blocks of at least --min_mask_patches_per_block 16 patches, aspect
        # min_aspect=0.3 .. 1/0.3 (kind and ratio come from the objective).
        mask=MaskConfig(min_block=16, min_aspect=0.3),
        io=IOConfig(num_workers=10),  # --num_workers 10
    )


def beit_b16_i21k() -> Experiment:
    """BEiT-B/16 pre-training on ImageNet-21k images, labels unused (README.md's "Pre-training
    BEiT-base on ImageNet-22k": 16 GPUs x 128 = 2048, 150 epochs, 10k warm-up steps), bf16, ZeRO-1.

    The backbone is timm's ``beit_base_patch16_224`` (relative position bias per block, LayerScale
    init 0.1: ``--layer_scale_init_value 0.1``, no absolute position embedding; ``--drop_path 0.1``).
    The tokenizer is a registered dVAE of this pipeline (8192 tokens, one per 16x16 patch, trained
    at 224 px: docs/beit.md, stage 1). The backbone is registered as ``beit-b16-i21k``; fine-tune
    it with ``finetune.py --from models:/beit-b16-i21k/latest`` (BEiT's protocol). Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe beit_b16_i21k --data s3://BUCKET/imagenet21k --resume auto \\
            --set train.objective.tokenizer=models:/dvae-v8192p16-i21k/1
    """
    return Experiment(
        name="beit_b16_i21k",
        image_size=224,  # --input_size 224
        model=TimmSpec(name="beit_base_patch16_224", drop_path=0.1),
        data=_beit_data("s3://datasets/imagenet21k", INCEPTION_MEAN, INCEPTION_STD),
        train=_beit_train(micro_batch=128, warmup_steps=10_000,  # README.md (22k): "--warmup_steps 10000"
                          total_steps=epochs_to_steps(150, BEIT_BATCH, I22K_IMAGES),  # "--epochs 150"
                          tokenizer="models:/dvae-v8192p16-i21k/latest"),
        resources=Resources(workers=16, cpus_per_worker=10, gpus_per_worker=1),
        dataset_name="i21k",
        registered_model_name="beit-b16-i21k",
    )


def beit_mu_digits() -> Experiment:
    """BEiT on the digits demo shards without their labels: a 2-block, 32-wide timm BEiT at 16 px
    (4 x 4 patches of 4 px), blocks of at least 4 patches (a 4 x 4 grid has no room for 16), a
    32-token tokenizer (dvae_tokenizer_digits); BEiT's optimizer, loss and schedule shape; 2 CPU workers. What the tests
    and a laptop run. Launch::

        ray job submit --working-dir . -- python orchestration/pretrain.py \\
            --recipe beit_mu_digits --data s3://vitscale/digits \\
            --set train.objective.tokenizer=models:/dvae-v32p4-digits/latest
    """
    base = beit_b16_i21k()
    return Experiment(
        name="beit_mu_digits",
        image_size=16,
        model=TimmSpec(name="beit_base_patch16_224", patch_size=4, embed_dim=(32,), depths=(2,), num_heads=(2,)),
        data=DataConfig(source=SourceConfig(url="s3://vitscale/digits"),
                        augment=AugmentConfig(crop_scale=(0.5, 1.0), hflip=False, color_jitter=0.4),  # no flips of digits
                        mask=MaskConfig(min_block=4, min_aspect=0.3),
                        io=IOConfig(num_workers=1, shuffle_buffer=256)),
        train=base.train.replace(global_batch=64, micro_batch=32, log_every=10, eval_every=100, **{
            "optim.lr": 3e-3, "schedule.warmup_steps": 20, "schedule.total_steps": 300,
            "objective.mask_ratio": 0.4, "objective.vocab_size": 32,
            "objective.tokenizer": "models:/dvae-v32p4-digits/latest",
            "engine.precision": "fp32", "checkpoint.every": 100}),
        resources=Resources(workers=2),
        dataset_name="digits",
        registered_model_name="beit-mu-digits",
    )


BEIT_RECIPES: tuple[Callable[[], Experiment], ...] = (beit_b16_i21k, beit_mu_digits)
