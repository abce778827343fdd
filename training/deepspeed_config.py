"""The one place DeepSpeed's JSON config is made."""

from __future__ import annotations

from typing import Any

from training.config import TrainConfig


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed config for `cfg` on `world_size` ranks.

    The optimizer and the lr schedule are *not* in here: the Trainer passes a torch optimizer
    (AdamW/SGD; CPUs have no fused Adam) and sets the lr itself every step from
    `training.optim.lr_at`, so a resumed run follows the exact same schedule.
    """
    accum = cfg.accum_for(world_size)
    zero: dict[str, Any] = {"stage": cfg.engine.zero_stage}
    if cfg.engine.zero_stage >= 1:
        zero.update(
            contiguous_gradients=True,
            overlap_comm=cfg.engine.zero_stage >= 2,
            reduce_scatter=True,
            reduce_bucket_size=int(5e7),
            allgather_bucket_size=int(5e7),
        )
    if cfg.engine.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=int(5e7),
            stage3_param_persistence_threshold=int(1e5),
            # export_weights gathers 16-bit weights on demand; no need to write them on every save.
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if cfg.engine.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    ds: dict[str, Any] = {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        # Our torch AdamW/SGD is a "client" optimizer: allow it under ZeRO and with offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "fp16": {
            "enabled": cfg.engine.precision == "fp16",
            "loss_scale": 0,  # 0 = dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": cfg.engine.precision == "bf16"},
        "steps_per_print": 10**9,  # the Trainer logs through its MetricsSink
        "wall_clock_breakdown": False,
    }
    return ds
