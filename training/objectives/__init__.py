"""Training objectives: what a run learns. Each module owns its config section, its loss, its
extra modules and the metrics it reports; the Trainer, checkpoints, ZeRO, resume, preemption,
the watchdog and the metrics sink are the same for every objective.
"""

from training.objectives.classification import ClassificationConfig

__all__ = ["ClassificationConfig"]
