"""Periodic evaluations the Trainer runs besides its own eval: a generic seam, no framework.

A :class:`PeriodicEval` is a callable that gets the full (unpartitioned) model and the step and
returns metrics. The Trainer calls it every ``every`` optimizer steps and at the last step, on
EVERY rank (so the callable may run collectives: gather features, sum counts), and logs what it
returns through its sink (rank 0). Under ZeRO-3 the parameters are gathered for the call
(:func:`full_module`), so the callable sees plain full tensors and may run any forward it
likes, the same number of times on every rank or not. Orchestration passes the few-shot
evaluator in this way; ``training/`` knows nothing about it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

#: ``fn(model, step) -> {metric: value}``; called on every rank with the same model and step.
EvalFn = Callable[[nn.Module, int], Mapping[str, float]]


@dataclass(frozen=True, kw_only=True)
class PeriodicEval:
    """``fn`` every ``every`` steps (0: only at the end) and at the last step of ``fit``."""

    name: str
    fn: EvalFn
    every: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 0:
            raise ValueError(f"PeriodicEval {self.name!r}: every={self.every!r} must be an int >= 0 "
                             "(0 = only at the end of training)")
        if not callable(self.fn):
            raise TypeError(f"PeriodicEval {self.name!r}: fn={self.fn!r} is not callable")


@contextmanager
def full_module(engine: Any) -> Iterator[nn.Module]:
    """The engine's module in eval mode with full parameters on every rank (gathered under
    ZeRO-3, collective: every rank must enter), back in train mode and partitioned afterwards."""
    module: nn.Module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        gathered: Any = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    else:
        from contextlib import nullcontext

        gathered = nullcontext()
    was_training = module.training
    with gathered:
        module.eval()
        try:
            yield module
        finally:
            module.train(was_training)
