"""Launch-level checks of a whole :class:`Experiment`, one line per problem (no I/O).

The component configs check their own fields when they are built; this module adds what only
the whole experiment knows (Ray resources, names that become paths, the model at this image
size, the accumulation that makes the global batch) and the error types every CLI reports.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from model import parse_variant
from orchestration.experiment.config import Experiment


class OverrideError(ValueError):
    """A ``--set`` override names an unknown key or carries a value of the wrong type."""


class ConfigError(OverrideError):
    """Everything wrong with one configuration; ``problems`` has one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = [" ".join(p.split("\n")) for p in problems]  # one line each, whatever the source
        super().__init__("\n".join(self.problems))


def build_component(section: str, make: Callable[[], Any], problems: list[str]) -> Any:
    """``make()`` a component config; on ValueError add its lines to ``problems`` and return None."""
    try:
        return make()
    except (ValueError, TypeError) as e:
        problems.extend(component_problems(section, e))
        return None


def component_problems(section: str, error: Exception) -> list[str]:
    """Lines of a component config's ValueError (``invalid TrainConfig:`` then ``lr=inf ...``), each
    prefixed with ``section.`` so it names the key the user sets (``train.lr=inf ...``)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("invalid ") and lines[0].endswith(":"):
        lines = lines[1:]
    return [f"{section}.{ln}" if _SAFE_NAME.match(ln.split("=", 1)[0].split(" ", 1)[0]) else f"{section}: {ln}"
            for ln in lines]


#: A name that is safe as one path component, an MLflow name and a Ray Train run name.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def name_problems(key: str, value: Any) -> list[str]:
    """``[]`` if ``value`` is safe as a path component (run folders, registry names), else one line."""
    if isinstance(value, str) and _SAFE_NAME.match(value) and ".." not in value:
        return []
    return [f"{key}={value!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "and without '..' (it names folders and registry entries)"]


def experiment_problems(exp: Experiment, *, consistency: bool = True) -> list[str]:
    """Launch-level problems of ``exp``, one line each (empty: it can be launched).

    Ray resources, retries and names here; the component configs checked their own fields when
    they were built. ``consistency=False`` skips the checks that read ``data``/``train`` (used
    when one of them could not be built, so those lines would only repeat its errors).
    """
    p: list[str] = []
    for key, low, why in (("workers", 1, ""), ("cpus_per_worker", 1, " (Ray packs workers without CPUs "
                          "onto one node without limit)"), ("gpus_per_worker", 0, ""),
                          ("max_failures", 0, " (-1, Ray's 'retry forever', would repeat a deterministic "
                           "failure without end)"), ("image_size", 1, "")):
        v = getattr(exp, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            p.append(f"{key}={v!r} must be an int >= {low}{why}")
    p += name_problems("name", exp.name) + name_problems("dataset_name", exp.dataset_name)
    if exp.registered_model_name:
        p += name_problems("registered_model_name", exp.registered_model_name)
    p += _fewshot_problems(exp)
    if exp.eval_split is not None and not exp.eval_split:
        p.append("eval_split='' must be a split name or none")
    try:
        parse_variant(exp.variant)
    except ValueError as e:
        p.append(f"variant={exp.variant!r}: {e}")
    else:
        if not any(x.startswith("image_size=") for x in p):  # a bad image_size is reported once
            build_component("model", lambda: exp.model_config(num_classes=2), p)  # e.g. image_size % patch_size
    if consistency:
        p += _consistency_problems(exp)
    return p


def _fewshot_problems(exp: Experiment) -> list[str]:
    """Ranges of the few-shot fields (the datasets themselves are read by the CLIs' data checks)."""
    p: list[str] = []
    if not isinstance(exp.fewshot_every, int) or isinstance(exp.fewshot_every, bool) or exp.fewshot_every < 0:
        p.append(f"fewshot_every={exp.fewshot_every!r} must be an int >= 0 (0: few-shot only at the end)")
    if not exp.fewshot_shots or any(not isinstance(k, int) or isinstance(k, bool) or k < 1
                                    for k in exp.fewshot_shots):
        p.append(f"fewshot_shots={exp.fewshot_shots!r} must be one or more ints >= 1, e.g. 1,5,10,25")
    if exp.fewshot_every and not exp.fewshot_data:
        p.append(f"fewshot_every={exp.fewshot_every} needs downstream datasets: --fewshot-data URL[,URL] "
                 "(or --set fewshot_data=URL)")
    return p


def _consistency_problems(exp: Experiment) -> list[str]:
    p: list[str] = []
    if isinstance(exp.workers, int) and exp.workers >= 1:
        low = exp.min_workers if isinstance(exp.min_workers, int) and 1 <= exp.min_workers <= exp.workers else exp.workers
        for world in range(low, exp.workers + 1):  # elastic: the global batch must fit every size
            try:
                exp.train.accum_for(world)
            except ValueError as e:
                p.append(f"{e} (workers={world}{' of the elastic range' if low < exp.workers else ''})")
                break
    if not _seconds(exp.elastic_resize_s):
        p.append(f"elastic_resize_s={exp.elastic_resize_s!r} must be a finite number of seconds > 0")
    if exp.group_start_timeout_s is not None and not _seconds(exp.group_start_timeout_s):
        p.append(f"group_start_timeout_s={exp.group_start_timeout_s!r} must be a finite number of seconds > 0 "
                 "(or none for Ray's default)")
    m = exp.min_workers
    if m is not None and (not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= max(exp.workers, 1)):
        p.append(f"min_workers={m!r} must be an int in [1, workers={exp.workers}] (or none for a fixed size)")
    return p


def _seconds(v: Any) -> bool:
    """A finite number of seconds > 0 (not a bool)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < float("inf")


def validate(exp: Experiment) -> None:
    """Raise :class:`ConfigError` listing every launch-level problem of ``exp``; cheap, no I/O."""
    problems = experiment_problems(exp)
    if problems:
        raise ConfigError(problems)


def with_workers(exp: Experiment, workers: int) -> Experiment:
    """``exp`` on ``workers`` ranks, keeping the global batch (accumulation is re-derived)."""
    out = replace(exp, workers=workers)
    validate(out)
    return out
