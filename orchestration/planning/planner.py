"""``plan()``: the estimate of a run plus, when it does not fit, the changes that make it fit, and
when it fits with room, the changes that make it faster (``planning.fixes``)."""

from __future__ import annotations

import dataclasses

from orchestration.experiment import Experiment
from orchestration.planning.dataset import DataFacts
from orchestration.planning.devices import Device
from orchestration.planning.estimate import Plan, estimate
from orchestration.planning.fixes import find_fixes, find_speedups


def plan(exp: Experiment, device: Device, *, gpus: int, data: DataFacts, storage_gbs: float = 1.0,
         price: float | None = None, fixes: bool = True) -> Plan:
    """The plan of ``exp`` on ``gpus`` x ``device`` (``planning.estimate``); ``fixes``: also search the
    changes that make it fit (or faster), each re-planned."""
    p = estimate(exp, device, gpus=gpus, data=data, storage_gbs=storage_gbs, price=price)
    if not fixes:
        return p
    if p.memory.fits:
        return dataclasses.replace(p, speedups=tuple(find_speedups(p.exp, device, gpus=gpus, data=data,
                                                                   step_s=p.step_s, storage_gbs=storage_gbs)))
    return dataclasses.replace(p, fixes=tuple(find_fixes(p.exp, device, gpus=gpus, data=data,
                                                         storage_gbs=storage_gbs)))
