"""Training objectives: what a run learns. Each module owns its config section, its loss, its
extra modules and the metrics it reports; the Trainer, checkpoints, ZeRO, resume, preemption,
the watchdog and the metrics sink are the same for every objective (``base.Objective``).

* ``classification`` - supervised softmax / sigmoid classification (the ViT paper)
* ``mae``            - masked autoencoder pre-training without labels (He et al. 2021)
"""

from training.objectives.base import Objective
from training.objectives.classification import ClassificationConfig, ClassificationObjective
from training.objectives.mae import MAEConfig, MAEObjective

#: Every objective config a TrainConfig may hold (told apart by ``kind``).
ObjectiveConfig = ClassificationConfig | MAEConfig

_OBJECTIVES: dict[str, type[Objective]] = {"classification": ClassificationObjective, "mae": MAEObjective}


def objective_for(cfg: ObjectiveConfig) -> Objective:
    """The :class:`Objective` of a config section."""
    return _OBJECTIVES[cfg.kind](cfg)


__all__ = ["ClassificationConfig", "ClassificationObjective", "MAEConfig", "MAEObjective", "Objective",
           "ObjectiveConfig", "objective_for"]
