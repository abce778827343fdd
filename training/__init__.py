"""DeepSpeed ZeRO training of ViTs: config, profiles, optimizer/schedule, losses, checkpoints, metrics.

Imports only `model` and `confkit` from the project (never ray, mlflow, boto3); see docs/design.md.
DeepSpeed itself is imported lazily, when a Trainer is built.
"""

from training.checkpoint import CheckpointStore, LocalDirStore, export_weights
from training.config import TrainConfig, config_diff
from training.deepspeed_config import deepspeed_config
from training.metrics import PEAK_TFLOPS, JsonlSink, MetricsSink, NullSink, mfu
from training.optim import lr_at, param_groups
from training.periodic import PeriodicEval
from training.profiles import PROFILES, Profile, from_profile, get_profile, with_profile
from training.trainer import NonFiniteLossError, Trainer

__all__ = [
    "PEAK_TFLOPS",
    "PROFILES",
    "CheckpointStore",
    "JsonlSink",
    "LocalDirStore",
    "MetricsSink",
    "NonFiniteLossError",
    "NullSink",
    "PeriodicEval",
    "Profile",
    "TrainConfig",
    "Trainer",
    "config_diff",
    "deepspeed_config",
    "export_weights",
    "from_profile",
    "get_profile",
    "lr_at",
    "mfu",
    "param_groups",
    "with_profile",
]
