"""Few-shot evaluation inside training: the experiment's few-shot fields -> a Trainer hook.

``Experiment.fewshot_data`` (downstream datasets, ``NAME=URL`` or ``URL``) and ``fewshot_every``
become a :class:`training.PeriodicEval` that :func:`orchestration.launch.build.build_run` passes
to the Trainer: every rank calls :func:`~.fewshot.evaluate_fewshot` on its share with the full
(ZeRO-3-gathered) model, features are all-gathered, and rank 0's sink logs
``fewshot/<NAME>/<K>shot``. The datasets are checked on the driver by
:func:`fewshot_data_problems` before anything starts (fewer than 2 classes, or a class with
fewer train images than the largest shot count, is named there: the launch fails with exit 2).

When the features turn out NaN/Inf during training (:class:`~.checks.NonFiniteError`, decided
the same way on every rank), the evaluation is not a measurement: no accuracy is logged for that
step, a warning names the reason and ``fewshot/failed`` = 1 is logged instead, and training goes
on. The run is not stopped here on purpose: divergence is the Trainer's to judge (its
``max_bad_steps`` guard on the loss), and a side measurement must not end a long run, nor pass
off a meaningless number (before: ``LinAlgError`` from deep in the ridge solver, ending the run).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from orchestration.experiment.config import Experiment
from orchestration.experiment.validation import location_problems, one_line

from .checks import EvaluationError
from .fewshot import FewShotConfig, evaluate_fewshot, open_pools
from .support_sets import FewShotDataError, open_pool

if TYPE_CHECKING:
    from torch import nn

    from training import PeriodicEval

log = logging.getLogger(__name__)

#: The ``PeriodicEval`` name (its run time is logged as ``fewshot/seconds``).
HOOK_NAME = "fewshot"
#: Logged (= 1) instead of the accuracies when an evaluation during training was not a measurement.
FAILED_METRIC = f"{HOOK_NAME}/failed"


def split_datasets(items: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``["digits=s3://b/d", "/data/cifar"]`` -> (names, urls); a bare URL is named by its last
    path component."""
    names, urls = [], []
    for item in (s.strip() for s in items if s.strip()):
        name, _, url = item.partition("=") if "=" in item.split("://")[0] else ("", "", item)
        urls.append(url)
        names.append(name or url.rstrip("/").rsplit("/", 1)[-1])
    return tuple(names), tuple(urls)


def fewshot_config(exp: Experiment) -> FewShotConfig | None:
    """The few-shot config of ``exp`` (its eval preprocessing), None when it has no datasets."""
    if not exp.eval.fewshot_data:
        return None
    names, urls = split_datasets(exp.eval.fewshot_data)
    return FewShotConfig(datasets=urls, names=names, shots=tuple(exp.eval.fewshot_shots), seed=exp.eval.fewshot_seed,
                         batch_size=exp.train.micro_batch, crop_pct=exp.data.preprocess.eval_crop_pct,
                         mean=exp.data.preprocess.mean, std=exp.data.preprocess.std)


def fewshot_data_problems(exp: Experiment, key: str = "--fewshot-data") -> list[str]:
    """Every problem with ``exp``'s downstream datasets, one line each, before any image is read:
    a missing dataset, a missing train/val split, or classes with too few images for the largest shot."""
    if not exp.eval.fewshot_data:
        return []
    try:
        cfg = fewshot_config(exp)
    except ValueError as e:
        return [f"{key}: {ln.strip()}" for ln in str(e).splitlines()[1:]]
    assert cfg is not None
    problems: list[str] = []
    for url in cfg.datasets:
        where = location_problems(url, key)
        if where:
            problems += where
            continue
        try:
            open_pools(FewShotConfig(datasets=(url,), shots=cfg.shots))
            open_pool(url, cfg.test_split)  # the test split exists
        except FewShotDataError as e:
            problems.append(f"{key} {one_line(e)}")
        except Exception as e:  # noqa: BLE001 - missing split, damaged metadata: one line each
            problems.append(f"{key} {url}: {one_line(e)}")
    return problems


def fewshot_hooks(exp: Experiment, *, rank: int, world: int) -> list[PeriodicEval]:
    """``[PeriodicEval]`` running few-shot on this rank (empty without ``fewshot_data``).

    The datasets' metadata is read once here; every evaluation picks the same support images.
    """
    from training import PeriodicEval

    cfg = fewshot_config(exp)
    if cfg is None:
        return []
    pools = open_pools(cfg)

    def run(model: nn.Module, step: int) -> dict[str, float]:
        try:
            return evaluate_fewshot(model, cfg, rank=rank, world_size=world, pools=pools).metrics
        except EvaluationError as e:  # raised on every rank alike (gathered/summed checks): no rank left waiting
            if rank == 0:
                log.warning("few-shot evaluation at step %d is not a measurement, no accuracy logged: %s", step, e)
            return {FAILED_METRIC: 1.0}

    return [PeriodicEval(name=HOOK_NAME, fn=run, every=exp.eval.fewshot_every)]
