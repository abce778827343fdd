"""Launch-level checks of a whole :class:`Experiment`, one line per problem (no I/O).

The component configs check their own fields when they are built; this module adds what only
the whole experiment knows (Ray resources, names that become paths, the model at this image
size, the accumulation that makes the global batch) and the error types every CLI reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from orchestration.experiment.config import Experiment


class OverrideError(ValueError):
    """A ``--set`` override names an unknown key or carries a value of the wrong type."""


class ConfigError(OverrideError):
    """Everything wrong with one configuration; ``problems`` has one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = [" ".join(p.split("\n")) for p in problems]  # one line each, whatever the source
        super().__init__("\n".join(self.problems))


def experiment_problems(exp: Experiment) -> list[str]:
    """Launch-level problems of ``exp``, one line each (empty: it can be launched).

    The model at this image size, and the global batch at every world size the run may have;
    each section (and the experiment's names) checked its own fields when it was built.
    """
    p: list[str] = []
    try:
        exp.model_config(num_classes=2)  # e.g. image_size % patch_size
    except ValueError as e:
        p.append(f"model: {' '.join(str(e).split())}")
    r = exp.resources
    low = r.min_workers if r.min_workers is not None else r.workers
    for world in range(low, r.workers + 1):  # elastic: the global batch must fit every size
        try:
            exp.train.accum_for(world)
        except ValueError as e:
            p.append(f"{e} (workers={world}{' of the elastic range' if low < r.workers else ''})")
            break
    return p


def validate(exp: Experiment) -> None:
    """Raise :class:`ConfigError` listing every launch-level problem of ``exp``; cheap, no I/O."""
    problems = experiment_problems(exp)
    if problems:
        raise ConfigError(problems)


def with_workers(exp: Experiment, workers: int) -> Experiment:
    """``exp`` on ``workers`` ranks, keeping the global batch (accumulation is re-derived)."""
    try:
        out = replace(exp, resources=replace(exp.resources, workers=workers))
    except ValueError as e:
        raise ConfigError([f"resources.{ln.strip()}" for ln in str(e).splitlines()[1:]] or [str(e)]) from None
    validate(out)
    return out
