"""Fine-tuning protocols: the experiment that fine-tunes a pre-trained model, by how it was pre-trained.

* ``vit`` - the ViT paper's transfer recipe (Dosovitskiy et al. 2020, Section 3.2, Appendix B.1.1,
  Table 4): the class token's head replaced by one zero-initialised linear layer, SGD with
  momentum 0.9, no weight decay, warmup + cosine, clipping at norm 1, batch 512.
* ``mae`` - MAE's (He et al. 2021; facebookresearch/mae ``FINETUNE.md`` and ``main_finetune.py``):
  mean pooling of the patch tokens with a fresh ``fc_norm`` (``--global_pool``; the encoder's
  final norm is not used), drop path, AdamW with layer-wise lr decay, RandAugment, mixup,
  cutmix, label smoothing, batch 1024, epochs counted on the fine-tuning set.
* ``beit`` - BEiT's (Bao et al. 2021; microsoft/unilm ``beit/get_started_for_image_classification.md``
  and ``run_class_finetuning.py``) for a timm BEiT backbone pre-trained with BEiT's objective: the
  same shape as MAE's (mean pooling with a fresh ``fc_norm``: timm BEiT's ``global_pool='avg'``,
  layer-wise lr decay, RandAugment, mixup, cutmix, label smoothing) with BEiT's numbers.

The protocol follows the source's pre-training objective (:func:`source_objective`) unless the
user asks for one (``finetune.py --protocol``). Without GPUs either protocol is sized for the
machine (:data:`CPU_SCHEDULE`), and ``finetune.py`` says so before it starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from model import TimmConfig, TimmSpec, ViTConfig, ViTSpec
from orchestration.experiment.config import Experiment, Resources
from orchestration.experiment.imagenet import IMAGENET_MEAN, IMAGENET_STD, IN1K_IMAGES
from orchestration.experiment.recipes import RECIPES
from pipeline import AugmentConfig, DataConfig, PreprocessConfig, SourceConfig
from training import TrainConfig
from training.config import CheckpointConfig, EngineConfig, OptimConfig, ScheduleConfig
from training.objectives import ClassificationConfig

#: Fine-tuning without GPUs: a few minutes for the small (mu, Ti) models on a laptop's CPU.
CPU_SCHEDULE = {"global_batch": 64, "total_steps": 300, "warmup_steps": 30, "eval_every": 100, "checkpoint_every": 100}
PROTOCOLS = ("vit", "mae", "beit")


def source_objective(tags: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(the objective the source was pre-trained with, where that was read).

    In order: the registered version's / run's ``objective`` tag (set at registration), the
    safetensors file's ``vitscale.objective`` metadata (every export writes it), the objective
    of the recipe named by its ``recipe`` tag; else "classification" (models registered before
    objectives existed were all supervised)."""
    if tags.get("objective"):
        return str(tags["objective"]), "its objective tag"
    if metadata and metadata.get("vitscale.objective"):
        return metadata["vitscale.objective"], "its safetensors metadata (vitscale.objective)"
    recipe = tags.get("recipe")
    if recipe in RECIPES:
        return RECIPES[recipe]().train.objective.kind, f"its recipe {recipe}"
    return "classification", "no objective recorded"


def choose_protocol(asked: str, objective: str) -> str:
    """``asked`` ("vit", "mae", "beit" or "auto": MAE's / BEiT's for a source pre-trained with that
    objective, else the ViT paper's)."""
    if asked != "auto":
        return asked
    return objective if objective in ("mae", "beit") else "vit"


def finetune_experiment(
    src: ViTConfig | TimmConfig,
    *,
    image_size: int,
    source_recipe: str | None,
    dataset_name: str,
    source_model_name: str,
    workers: int = 1,
    gpus_per_worker: int = 0,
    protocol: str = "vit",
    train_images: int | None = None,
) -> Experiment:
    """The fine-tuning experiment of ``protocol`` for a source model ``src`` at ``image_size``.

    Without GPUs (``gpus_per_worker=0``) the run is sized for a CPU machine
    (:data:`CPU_SCHEDULE`: minutes for a small model, not hours); ``--set`` restores any of it.
    ``train_images`` (the fine-tuning set's train split) turns MAE's epochs into steps; None:
    ImageNet-1k's 1.28M, MAE's own fine-tuning set. A timm source (``TimmConfig``) is fine-tuned
    with the ``vit`` protocol at the new resolution (its position embeddings / relative position
    bias tables resized by ``finetune.py``'s staging).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)} (or auto)")
    if protocol == "mae" and isinstance(src, TimmConfig):
        raise ValueError(f"the mae fine-tuning protocol re-pools our ViT's MAE encoders; {src.name} is a timm "
                         "network: use --protocol vit")
    if protocol == "beit" and not (isinstance(src, TimmConfig) and src.family.key == "beit"):
        what = src.name if isinstance(src, TimmConfig) else "our ViT"
        raise ValueError(f"the beit fine-tuning protocol fine-tunes timm's BEiT backbone; the source is {what}: use "
                         "--protocol vit (or mae for an MAE encoder)")
    common = {"image_size": image_size, "dataset_name": dataset_name,
              "registered_model_name": f"{source_model_name}-ft{image_size}",
              "resources": Resources(workers=workers, cpus_per_worker=1, gpus_per_worker=gpus_per_worker)}
    if protocol == "mae":
        model, data, train = _mae(src, image_size, source_recipe, cpu=not gpus_per_worker, train_images=train_images)
    elif protocol == "beit":
        model, data, train = _beit(src, image_size, source_recipe, cpu=not gpus_per_worker,  # type: ignore[arg-type]
                                   train_images=train_images)
    else:
        model, data, train = _vit(src, image_size, source_recipe, cpu=not gpus_per_worker)
    return Experiment(name=f"finetune_{model.slug}_{image_size}", model=model, data=data, train=train, **common)


def _vit(src: ViTConfig | TimmConfig, image_size: int, source_recipe: str | None, *,
         cpu: bool) -> tuple[ViTSpec | TimmSpec, DataConfig, TrainConfig]:
    """The paper's recipe. Data augmentation is inherited from the source recipe when it is known
    (e.g. no flips for digits), with the resolution replaced."""
    mb = 32
    data = (
        replace(RECIPES[source_recipe]().data, image_size=image_size, batch_size=mb)
        if source_recipe in RECIPES
        else DataConfig(source=SourceConfig(url=""), image_size=image_size, batch_size=mb)
    )
    # A single linear head, no dropout (B.1.1: "we remove the whole head ... and attach a single
    # zero-initialized D x K feedforward layer").
    model = (TimmSpec.of(src, dropout=0.0, drop_path=0.0) if isinstance(src, TimmConfig)
             else ViTSpec.of(src, representation_size=None, dropout=0.0, drop_path=0.0))
    train = TrainConfig(
        global_batch=CPU_SCHEDULE["global_batch"] if cpu else 512,  # Table 4 caption: "a batch size of 512"
        micro_batch=mb,
        optim=OptimConfig(
            name="sgd",  # B.1.1: "SGD with a momentum of 0.9"
            momentum=0.9,
            lr=0.01,  # Table 4: grid {0.001, 0.003, 0.01, 0.03}; VTAB uses 0.01
            weight_decay=0.0,  # Table 4 caption: "no weight decay"
            grad_clip=1.0,  # Table 4 caption: "grad clipping at global norm 1"
        ),
        schedule=ScheduleConfig(
            warmup_steps=CPU_SCHEDULE["warmup_steps"] if cpu else 500,
            total_steps=CPU_SCHEDULE["total_steps"] if cpu else 10_000,  # Table 4: 10k (CIFAR) .. 20k (ImageNet)
            decay="cosine",  # Table 4 caption: "cosine learning rate decay"
        ),
        engine=EngineConfig(precision="fp32" if cpu else "bf16", zero_stage=1),
        log_every=10,
        eval_every=CPU_SCHEDULE["eval_every"] if cpu else 500,
        checkpoint=CheckpointConfig(every=CPU_SCHEDULE["checkpoint_every"] if cpu else 1000),
    )
    return model, data, train


# ----------------------------------------------------------------------------- MAE
@dataclass(frozen=True)
class MAESize:
    """FINETUNE.md's per-size flags."""

    drop_path: float  # --drop_path
    blr: float  # --blr: lr = blr * batch / 256
    layer_decay: float  # --layer_decay
    epochs: int  # --epochs
    micro_batch: int  # --batch_size (per GPU)


#: FINETUNE.md's scripts: ViT-Base "--epochs 100 --blr 5e-4 --layer_decay 0.65 ... --drop_path 0.1",
#: ViT-Large "--epochs 50 --blr 1e-3 --layer_decay 0.75 ... --drop_path 0.2", ViT-Huge "--epochs 50
#: --blr 1e-3 --layer_decay 0.75 ... --drop_path 0.3" (per-GPU batch 32, 32, 16).
MAE_SIZES = {
    "B": MAESize(drop_path=0.1, blr=5e-4, layer_decay=0.65, epochs=100, micro_batch=32),
    "L": MAESize(drop_path=0.2, blr=1e-3, layer_decay=0.75, epochs=50, micro_batch=32),
    "H": MAESize(drop_path=0.3, blr=1e-3, layer_decay=0.75, epochs=50, micro_batch=16),
}
#: FINETUNE.md: "the effective batch size is 32 (batch_size per gpu) * 4 (nodes) * 8 (gpus per node) = 1024".
MAE_FT_BATCH = 1024
MAE_WARMUP_EPOCHS = 5  # main_finetune.py: --warmup_epochs default 5
MAE_MIN_LR = 1e-6  # main_finetune.py: --min_lr default 1e-6
MAE_WEIGHT_DECAY = 0.05  # FINETUNE.md: --weight_decay 0.05


def mae_size(width: int) -> str:
    """The FINETUNE.md row for an encoder of ``width``: H from 1280, L from 1024, else B (MAE
    fine-tuned nothing smaller than B; its settings serve mu, Ti and S too)."""
    return "H" if width >= 1280 else "L" if width >= 1024 else "B"


def _finetune_data(source_recipe: str | None, image_size: int, micro_batch: int) -> DataConfig:
    """MAE's and BEiT's fine-tuning data (both timm's ``create_transform``, the same flags)."""
    recipe = RECIPES[source_recipe]() if source_recipe in RECIPES else None
    # MAE util/datasets.py, BEiT datasets.py: timm's create_transform(is_training=True,
    # auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25): RandomResizedCrop (timm's default scale
    # (0.08, 1.0), ratio (3/4, 4/3)), flip, RandAugment 2 ops at magnitude 9; mixup 0.8 / cutmix
    # 1.0 (MAE FINETUNE.md; BEiT's commands for self-supervised-only checkpoints). Flips and the
    # pixel normalisation stay the source recipe's (a dataset's property, and what the encoder
    # saw); an unknown source gets the ImageNet mean / std.
    augment = AugmentConfig(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
                            hflip=recipe.data.augment.hflip if recipe is not None else True,
                            randaugment=(2, 9), mixup_alpha=0.8, cutmix_alpha=1.0,
                            random_erasing=0.25)  # FINETUNE.md / run_class_finetuning.py: --reprob 0.25
    # eval: crop_pct 224/256 up to 224 px, else 1.0 (resize straight to the size).
    crop_pct = 0.875 if image_size <= 224 else 1.0
    preprocess = (replace(recipe.data.preprocess, eval_crop_pct=crop_pct) if recipe is not None
                  else PreprocessConfig(mean=IMAGENET_MEAN, std=IMAGENET_STD, eval_crop_pct=crop_pct))
    io = recipe.data.io if recipe is not None else DataConfig(source=SourceConfig(url="")).io
    return DataConfig(source=SourceConfig(url=""), image_size=image_size, batch_size=micro_batch,
                      augment=augment, preprocess=preprocess, io=io)


def _mae(src: ViTConfig, image_size: int, source_recipe: str | None, *, cpu: bool,
         train_images: int | None) -> tuple[ViTSpec, DataConfig, TrainConfig]:
    size = MAE_SIZES[mae_size(src.width)]
    # --global_pool (main_finetune.py's default): mean of the patch tokens, then a new fc_norm; the
    # encoder's final norm is dropped (models_vit.py deletes it). A model without a class token
    # ("gap") already pools globally and keeps its own pooling. The position embedding stays the
    # encoder's (a fixed sin-cos for an MAE encoder; MAE's PyTorch code loads it into timm's
    # learnable pos_embed and trains it: a small deviation, docs/mae.md).
    pool = "avg" if src.class_token else src.pool
    model = ViTSpec.of(src, pool=pool, representation_size=None, dropout=0.0, drop_path=size.drop_path)
    data = _finetune_data(source_recipe, image_size, size.micro_batch)
    batch = CPU_SCHEDULE["global_batch"] if cpu else MAE_FT_BATCH
    images = train_images or IN1K_IMAGES
    epoch = max(1, round(images / batch))  # optimizer steps per epoch of the fine-tuning set
    train = TrainConfig(
        global_batch=batch,
        micro_batch=size.micro_batch,
        optim=OptimConfig(
            name="adamw",  # main_finetune.py: torch.optim.AdamW(param_groups, lr=args.lr): default betas
            lr=size.blr * batch / 256,  # FINETUNE.md: "lr = blr * effective batch size / 256"
            betas=(0.9, 0.999),
            weight_decay=MAE_WEIGHT_DECAY,
            grad_clip=0.0,  # main_finetune.py: --clip_grad default None
            layer_decay=size.layer_decay,
        ),
        schedule=ScheduleConfig(
            warmup_steps=CPU_SCHEDULE["warmup_steps"] if cpu else MAE_WARMUP_EPOCHS * epoch,
            total_steps=CPU_SCHEDULE["total_steps"] if cpu else size.epochs * epoch,
            decay="cosine",  # util/lr_sched.py: half-cycle cosine after warmup
            min_lr=MAE_MIN_LR,
        ),
        # main_finetune.py: --smoothing 0.1, applied to the mixed targets (timm's Mixup label_smoothing).
        objective=ClassificationConfig(loss="softmax", label_smoothing=0.1),
        engine=EngineConfig(precision="fp32" if cpu else "bf16", zero_stage=1),
        log_every=10,
        eval_every=CPU_SCHEDULE["eval_every"] if cpu else epoch,  # engine_finetune: evaluate every epoch
        checkpoint=CheckpointConfig(every=CPU_SCHEDULE["checkpoint_every"] if cpu else epoch),
    )
    return model, data, train


# ----------------------------------------------------------------------------- BEiT
#: BEiT's fine-tuning commands for its self-supervised-only ImageNet-22k checkpoints
#: (get_started_for_image_classification.md): BEiT-base "--batch_size 128 --lr 4e-3 --update_freq 1
#: --warmup_epochs 20 --epochs 100 --layer_decay 0.65 --drop_path 0.1 --weight_decay 0.05 --mixup 0.8
#: --cutmix 1.0" on 8 GPUs, BEiT-large "--batch_size 64 --lr 1e-3 --update_freq 2 --warmup_epochs 5
#: --epochs 50 --layer_decay 0.75 --drop_path 0.2 --weight_decay 0.05" (both an effective batch of 1024).
BEIT_SIZES = {
    "B": {"lr": 4e-3, "warmup_epochs": 20, "epochs": 100, "layer_decay": 0.65, "drop_path": 0.1, "micro_batch": 128},
    "L": {"lr": 1e-3, "warmup_epochs": 5, "epochs": 50, "layer_decay": 0.75, "drop_path": 0.2, "micro_batch": 64},
}
BEIT_FT_BATCH = 1024
BEIT_MIN_LR = 1e-6  # run_class_finetuning.py: --min_lr default 1e-6


def _beit(src: TimmConfig, image_size: int, source_recipe: str | None, *, cpu: bool,
          train_images: int | None) -> tuple[TimmSpec, DataConfig, TrainConfig]:
    width = src.embed_dim[0] if src.embed_dim else probe_width(src)
    size = BEIT_SIZES["L" if width >= 1024 else "B"]
    # timm's Beit pools by the mean of the patch tokens into a fresh fc_norm (global_pool='avg',
    # BEiT's --use_mean_pooling default); the exported backbone has no pre-training norm.
    model = TimmSpec.of(src, dropout=0.0, drop_path=size["drop_path"])
    mb = int(size["micro_batch"])
    data = _finetune_data(source_recipe, image_size, mb)
    batch = CPU_SCHEDULE["global_batch"] if cpu else BEIT_FT_BATCH
    epoch = max(1, round((train_images or IN1K_IMAGES) / batch))
    train = TrainConfig(
        global_batch=batch,
        micro_batch=min(mb, batch),
        optim=OptimConfig(name="adamw", lr=size["lr"] * batch / BEIT_FT_BATCH,  # scaled if the batch is not 1024
                          betas=(0.9, 0.999), eps=1e-8,  # --opt_betas None (AdamW's), --opt_eps 1e-8
                          weight_decay=0.05, grad_clip=0.0,  # --clip_grad None
                          layer_decay=size["layer_decay"]),
        schedule=ScheduleConfig(
            warmup_steps=CPU_SCHEDULE["warmup_steps"] if cpu else int(size["warmup_epochs"]) * epoch,
            total_steps=CPU_SCHEDULE["total_steps"] if cpu else int(size["epochs"]) * epoch,
            decay="cosine", min_lr=BEIT_MIN_LR),
        objective=ClassificationConfig(loss="softmax", label_smoothing=0.1),  # --smoothing 0.1
        engine=EngineConfig(precision="fp32" if cpu else "bf16", zero_stage=1),
        log_every=10,
        eval_every=CPU_SCHEDULE["eval_every"] if cpu else epoch,
        checkpoint=CheckpointConfig(every=CPU_SCHEDULE["checkpoint_every"] if cpu else epoch),
    )
    return model, data, train


def probe_width(src: TimmConfig) -> int:
    """The width of a timm source whose spec keeps the named model's own (``embed_dim`` empty)."""
    import torch

    from model import create_timm_model

    with torch.device("meta"):
        return int(create_timm_model(src).embed_dim)


def source_shape_problems(exp: Experiment, src: ViTConfig | TimmConfig, source: str) -> list[str]:
    """The architecture a fine-tune cannot change (the pre-trained tensors are for it), one line each:
    ``--set model.patch_size=8`` on a /16 source names both sizes. A timm source keeps its name and
    shape; a Swin may change its ``window_size`` (its relative position bias tables are resized)."""
    if isinstance(src, TimmConfig) or isinstance(exp.model, TimmSpec):
        return _timm_shape_problems(exp, src, source)
    names = {"patch_size": "patch size", "width": "width", "depth": "depth", "heads": "heads",
             "mlp_dim": "MLP width", "in_chans": "input channels"}
    want = {**exp.model.shape, "in_chans": exp.model.in_chans}
    return [f"model.{k}={want[k]}: {source} was pre-trained with {what} {getattr(src, k)}; fine-tuning starts "
            f"from its weights, so the model keeps {what} {getattr(src, k)}: drop the override (or pre-train a "
            f"model with {k}={want[k]})"
            for k, what in names.items() if want[k] != getattr(src, k)]


def _timm_shape_problems(exp: Experiment, src: ViTConfig | TimmConfig, source: str) -> list[str]:
    if not (isinstance(src, TimmConfig) and isinstance(exp.model, TimmSpec)):
        return [f"model.kind={exp.model.kind!r}: {source} is a {'timm' if isinstance(src, TimmConfig) else 'vit'} "
                "model; fine-tuning starts from its weights, so the model keeps its kind"]
    want, have = exp.model.arch_fields(), src.arch_fields()
    keep = [k for k in want if k not in ("window_size", "dropout", "drop_path")]
    return [f"model.{k}={want[k]!r}: {source} was pre-trained with {k}={have[k]!r}; fine-tuning starts from its "
            f"weights, so the model keeps it: drop the override" for k in keep if want[k] != have[k]]
