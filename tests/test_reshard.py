"""Issue #14: ZeRO 1/2/3 state written at world size N resumes at M != N (2 -> 1 and 1 -> 2, gloo).

Each saving run trains 2 steps and records, per parameter, the consolidated fp32 weight and
both Adam moments (DeepSpeed's `safe_get_full_*`, which gathers the partitions); each loading
run at the other world size resumes through `Trainer.restore("auto")` (CheckpointManager
reshards with DeepSpeed's universal checkpoint), records the same, and trains one more step.
ZeRO-3 runs with `stage3_param_persistence_threshold=0`, so that at 2 ranks every parameter is
really partitioned (checked), unlike mu/8 under the default 1e5 threshold.

The worker side is this file's `main()`: `python <this file> save|load WORLD_FROM OUT`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STAGES = (1, 2, 3)


# ---------------------------------------------------------------------------- worker side
def _partition_everything() -> None:
    """ZeRO-3 below DeepSpeed's persistence threshold keeps small tensors whole: lower it to 0."""
    import training.trainer

    real = training.trainer.deepspeed_config

    def config(cfg: Any, world: int) -> dict[str, Any]:
        ds = real(cfg, world)
        if cfg.engine.zero_stage == 3:
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return ds

    training.trainer.deepspeed_config = config


def _trainer(out: Path, stage: int, saved_by: int, rank: int, world: int, total: int) -> Any:
    from test_training_dist import MemLoader, make_cfg, make_model

    from training import Trainer

    cfg = make_cfg(stage, log_every=1, **{"schedule.total_steps": total, "checkpoint.every": 2, "schedule.warmup_steps": 1})
    return Trainer(make_model(), cfg, MemLoader(rank, world), checkpoint_dir=str(out / f"ck_z{stage}_w{saved_by}"))


def _full_state(trainer: Any) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights and Adam moments, by parameter name (collective under ZeRO-3)."""
    from deepspeed.utils import (
        lazy_init_hp_params_optimizer_state,
        safe_get_full_fp32_param,
        safe_get_full_optimizer_state,
    )

    opt = trainer.optimizer
    if hasattr(opt, "bit16_groups"):  # ZeRO-1/2: DeepSpeed links moments to params after the first
        # group's first step only, when the no-weight-decay group has none yet; link every group now.
        for i, params in enumerate(opt.bit16_groups):
            lazy_init_hp_params_optimizer_state(params, opt.single_partition_of_fp32_groups[i], opt.optimizer.state)
    out = {}
    for name, p in trainer.engine.module.named_parameters():
        out[f"{name}/fp32"] = safe_get_full_fp32_param(p).detach().cpu().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}/{key}"] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
    return out


def worker(mode: str, saved_by: int, out: Path) -> None:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    _partition_everything()
    record: dict[str, Any] = {}
    for stage in STAGES:
        if mode == "save":
            trainer = _trainer(out, stage, world, rank, world, total=2)
            trainer.fit()
            state = _full_state(trainer)
            partitioned = [n for n, p in trainer.engine.module.named_parameters()
                           if stage == 3 and p.ds_tensor.numel() < p.ds_numel]
            record[str(stage)] = {"partitioned": len(partitioned), "params": len(list(trainer.model.parameters()))}
            if rank == 0:
                torch.save(state, out / f"ref_z{stage}_w{world}.pt")
        else:
            trainer = _trainer(out, stage, saved_by, rank, world, total=3)
            t0 = time.monotonic()
            assert trainer.restore("auto")
            seconds = time.monotonic() - t0
            state, step = _full_state(trainer), trainer.step
            result = trainer.fit()
            ref = torch.load(out / f"ref_z{stage}_w{saved_by}.pt")
            diffs = {k: (state[k] - v).abs().max().item() for k, v in ref.items()}
            record[str(stage)] = {"step": step, "final_step": result["step"], "loss": result["loss"],
                                  "max_diff": max(diffs.values()), "keys": len(diffs), "missing": sorted(set(ref) - set(state)),
                                  "nonzero_moments": sum(v.abs().sum().item() > 0 for k, v in ref.items() if "exp_avg" in k),
                                  "world_size_changes": trainer.faults.world_size_changes, "restore_s": seconds}
        del trainer
    if rank == 0:
        (out / f"{mode}_from{saved_by}_w{world}.json").write_text(json.dumps(record))


# ---------------------------------------------------------------------------- test side
def _spawn(mode: str, saved_by: int, world: int, out: Path) -> list[subprocess.Popen]:
    from conftest import spawn_ranks

    return spawn_ranks([__file__, mode, str(saved_by), str(out)], world,
                       lambda rank: out / f"{mode}_from{saved_by}_w{world}_r{rank}.log")


def _wait(groups: dict[str, list[subprocess.Popen]], out: Path, timeout: float = 300) -> None:
    from conftest import wait_ranks

    deadline = time.monotonic() + timeout
    for name, procs in groups.items():
        wait_ranks(procs, lambda rank, name=name: out / f"{name}_r{rank}.log", deadline, name)


@pytest.fixture(scope="module")
def resharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("reshard")
    _wait({"save_from1_w1": _spawn("save", 1, 1, out), "save_from2_w2": _spawn("save", 2, 2, out)}, out)
    _wait({"load_from2_w1": _spawn("load", 2, 1, out), "load_from1_w2": _spawn("load", 1, 2, out)}, out)
    return {name: json.loads((out / f"{name}.json").read_text())
            for name in ("save_from1_w1", "save_from2_w2", "load_from2_w1", "load_from1_w2")}


@pytest.mark.integration
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("direction", ["load_from2_w1", "load_from1_w2"])
def test_zero_state_resumes_at_another_world_size(resharded: dict[str, Any], stage: int, direction: str) -> None:
    r = resharded[direction][str(stage)]
    assert r["step"] == 2 and r["final_step"] == 3 and r["loss"] == r["loss"], r  # resumed, then trained on
    assert r["missing"] == [] and r["keys"] > 0 and r["nonzero_moments"] > 0, r
    assert r["max_diff"] <= 1e-6, r  # fp32 weights, exp_avg and exp_avg_sq as saved
    assert r["world_size_changes"] == 1, r


@pytest.mark.integration
def test_zero3_test_model_is_really_partitioned(resharded: dict[str, Any]) -> None:
    saved = resharded["save_from2_w2"]["3"]
    assert saved["partitioned"] == saved["params"] > 0, saved


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    worker(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
