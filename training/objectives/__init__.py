"""Training objectives: what a run learns. Each module owns its config section, its loss, its
extra modules and the metrics it reports; the Trainer, checkpoints, ZeRO, resume, preemption,
the watchdog and the metrics sink are the same for every objective (``base.Objective``).

* ``classification`` - supervised softmax / sigmoid classification (the ViT paper)
* ``mae``            - masked autoencoder pre-training without labels (He et al. 2021)
* ``distill``        - DeiT's distillation of a teacher into a distilled ViT (Touvron et al. 2020)
* ``dvae``           - BEiT's tokenizer stage: DALL-E's discrete VAE (Ramesh et al. 2021), no labels
* ``beit``           - BEiT's masked image modelling of a frozen tokenizer's visual tokens (Bao et al. 2021)
"""

from torch import nn

from training.objectives.base import Objective
from training.objectives.beit import BEiTConfig, BEiTObjective
from training.objectives.classification import ClassificationConfig, ClassificationObjective
from training.objectives.distill import DistillationObjective, DistillConfig
from training.objectives.dvae import DVAEObjective, DVAEObjectiveConfig
from training.objectives.mae import MAEConfig, MAEObjective

#: Every objective config a TrainConfig may hold (told apart by ``kind``).
ObjectiveConfig = ClassificationConfig | MAEConfig | DistillConfig | DVAEObjectiveConfig | BEiTConfig

_OBJECTIVES: dict[str, type[Objective]] = {"classification": ClassificationObjective, "mae": MAEObjective,
                                         "dvae": DVAEObjective}


def objective_for(cfg: ObjectiveConfig, *, teacher: nn.Module | None = None) -> Objective:
    """The :class:`Objective` of a config section; ``teacher``: the objective's frozen model (the
    distillation objective's teacher, BEiT's tokenizer), refused by the objectives that use none."""
    if cfg.kind == "distill":
        return DistillationObjective(cfg, teacher)  # type: ignore[arg-type]
    if cfg.kind == "beit":
        return BEiTObjective(cfg, teacher)  # type: ignore[arg-type]
    if teacher is not None:
        raise ValueError(f"a teacher was given but train.objective.kind={cfg.kind!r} uses none; "
                         "distil with a DistillConfig objective (kind='distill')")
    return _OBJECTIVES[cfg.kind](cfg)


__all__ = ["BEiTConfig", "BEiTObjective", "ClassificationConfig", "ClassificationObjective", "DVAEObjective",
           "DVAEObjectiveConfig", "DistillConfig", "DistillationObjective", "MAEConfig",
           "MAEObjective", "Objective", "ObjectiveConfig", "objective_for"]
