"""What to change when a run does not fit: each change re-planned, the ones that fit, cheapest first.

Candidates, one axis at a time and then the combinations a person would try next: activation
checkpointing, a higher ZeRO stage, a smaller micro batch (accumulation keeps the global batch),
the optimizer states offloaded to the host, more GPUs (ZeRO shards the states over them). Each
is the ``--set`` overrides (and ``--gpus``) that make it, so applying a fix is copying it onto
the command line; its step time says what it costs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from orchestration.experiment import Experiment, apply_overrides
from orchestration.planning import devices as dv
from orchestration.planning.dataset import DataFacts
from orchestration.planning.estimate import estimate

#: How many fitting fixes a plan lists.
MAX_FIXES = 4


def _candidates(exp: Experiment, gpus: int) -> list[tuple[list[str], int]]:
    e, micro = exp.train.engine, exp.train.micro_batch
    ckpt = [] if e.activation_checkpointing else ["train.engine.activation_checkpointing=true"]
    out: list[tuple[list[str], int]] = []
    if ckpt:
        out.append((ckpt, gpus))
    for z in range(e.zero_stage + 1, 4):
        out.append(([f"train.engine.zero_stage={z}"], gpus))
        if ckpt:
            out.append(([f"train.engine.zero_stage={z}", *ckpt], gpus))
    smaller = [micro // 2**k for k in range(1, 5) if micro % 2**k == 0]  # down to a 16th
    for extra in ([], ckpt, ["train.engine.zero_stage=3", *ckpt] if e.zero_stage < 3 else []):
        for m in smaller:
            out.append(([*extra, f"train.micro_batch={m}"], gpus))
    stage = [] if e.zero_stage >= 1 else ["train.engine.zero_stage=1"]  # offload needs ZeRO >= 1
    for extra in ([], ckpt):
        out.append(([*stage, "train.engine.offload=cpu", *extra], gpus))
    for k in range(1, 7):
        if exp.train.global_batch % (gpus * 2**k) == 0:
            out.append((["train.engine.zero_stage=3"] if e.zero_stage < 3 else [], gpus * 2**k))
    return [(sets, g) for sets, g in out if sets or g != gpus]


def find_fixes(exp: Experiment, device: dv.Device, *, gpus: int, data: DataFacts,
               storage_gbs: float) -> list[dict[str, Any]]:
    """Up to MAX_FIXES changes that make ``exp`` fit on ``gpus`` x ``device``, fastest first: each
    ``{"set": [...], "gpus": N, "peak": bytes, "step_s": s, "gpu_hours": h, "command": "--set ..."}``."""
    found: list[dict[str, Any]] = []
    seen: set[tuple[str, ...]] = set()
    for sets, g in _candidates(exp, gpus):
        key = (*sorted(sets), str(g))
        if key in seen:
            continue
        seen.add(key)
        try:
            changed = apply_overrides(exp, sets) if sets else exp
            changed = dataclasses.replace(changed, resources=dataclasses.replace(changed.resources, workers=g))
            p = estimate(changed, device, gpus=g, data=data, storage_gbs=storage_gbs)
        except ValueError:
            continue  # e.g. a micro batch that no longer splits the global batch at this size
        if not p.memory.fits:
            continue
        offload = "train.engine.offload=cpu" in sets
        cost = p.step_s * g * (10.0 if offload else 1.0)  # offload's host Adam is not modelled: rank it last
        command = " ".join(f"--set {s}" for s in sets) + (f" --gpus {g}" if g != gpus else "")
        # One fix per kind of change (the same keys, or more GPUs): the fastest, then the larger micro batch
        # (the measured MFU is not modelled per micro batch, but small kernels are slower).
        kind = (*sorted(s.split("=")[0] for s in sets), g != gpus)
        found.append({"set": sets, "gpus": g, "peak": p.memory.peak, "step_s": p.step_s,
                      "gpu_hours": g * p.run_s / 3600, "command": command.strip(),
                      "_rank": (cost, -p.exp.train.micro_batch), "_kind": kind})
    found.sort(key=lambda f: f["_rank"])
    out, kinds = [], set()
    for f in found:
        if f["_kind"] in kinds or any(set(k["set"]) <= set(f["set"]) and k["gpus"] == f["gpus"] for k in out):
            continue  # the same kind of change, or a kept fix plus something that does not help
        kinds.add(f.pop("_kind"))
        f.pop("_rank")
        out.append(f)
    return out[:MAX_FIXES]


def find_speedups(exp: Experiment, device: dv.Device, *, gpus: int, data: DataFacts, step_s: float,
                  storage_gbs: float) -> list[dict[str, Any]]:
    """Changes that still fit and are >= 5 % faster (a recipe sized for smaller cards): activation
    checkpointing off (no recomputation), a lower ZeRO stage (fewer collectives), both."""
    e = exp.train.engine
    options: list[list[str]] = []
    lower = [f"train.engine.zero_stage={z}" for z in range(max(e.zero_stage - 1, 0), 0, -1)] if e.zero_stage > 1 else []
    off = ["train.engine.activation_checkpointing=false"] if e.activation_checkpointing else []
    options += [off] if off else []
    options += [[z] for z in lower] + [[z, *off] for z in lower if off]
    out = []
    for sets in options:
        try:
            p = estimate(apply_overrides(exp, sets), device, gpus=gpus, data=data, storage_gbs=storage_gbs)
        except ValueError:
            continue
        if p.memory.fits and p.step_s < 0.95 * step_s:
            out.append({"set": sets, "gpus": gpus, "peak": p.memory.peak, "step_s": p.step_s,
                        "gpu_hours": gpus * p.run_s / 3600, "command": " ".join(f"--set {s}" for s in sets)})
    return sorted(out, key=lambda f: f["step_s"])[:2]
