"""One way to build a training run from an :class:`Experiment`: loaders, model, Trainer, resume.

Pre-training and fine-tuning workers (:mod:`orchestration.launch.ray_train`) and every Tune trial
(:mod:`orchestration.studies.trial`) call :func:`build_run` and :func:`resume`; they differ only
in the sink they pass (MLflow on rank 0, or the study's points sink) and where the checkpoints go.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestration.experiment.config import Experiment
from orchestration.launch.checkpoint_store import checkpoint_location, fetch

if TYPE_CHECKING:
    from torch import nn

    from training import Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaders:
    """The loaders of one rank: ``eval`` is None when the experiment has no eval split."""

    train: Any
    eval: Any | None

    @property
    def num_classes(self) -> int:
        return int(self.train.num_classes)


def build_loaders(exp: Experiment, *, rank: int, world: int) -> Loaders:
    """Train (and eval) loaders of ``exp.data`` for this rank; uint8 batches (the Trainer normalizes
    them on its device: a quarter of the host bytes). The eval split is read whole: a limit on
    training samples (a study's training-set size) never shrinks the evaluation."""
    from pipeline import build_loader

    data = exp.data.replace(output="uint8")
    train = build_loader(data, rank=rank, world_size=world)
    evl = None
    if exp.eval.split:
        evl = build_loader(data.for_eval(exp.eval.split), rank=rank, world_size=world)
    return Loaders(train, evl)


def build_model(exp: Experiment, num_classes: int, init_weights: str | None = None) -> nn.Module:
    """The experiment's network (our ViT or a timm architecture: ``model.build_network``), seeded
    with ``train.seed``; ``init_weights`` (a path or URL of safetensors at the experiment's
    resolution: ``finetune.py`` stages them so) initialises the backbone for fine-tuning, with the
    network's fresh head."""
    import torch

    from model import build_network, load_network_weights

    torch.manual_seed(exp.train.seed)
    model = build_network(exp.model_config(num_classes))
    if init_weights:
        with tempfile.TemporaryDirectory() as tmp:
            load_network_weights(model, fetch(init_weights, Path(tmp) / "init.safetensors"), ignore_head=True)
    return model


def build_run(
    exp: Experiment,
    *,
    rank: int,
    world: int,
    checkpoint_url: str,
    checkpoint_key: str,
    make_sink: Callable[[nn.Module], Any] | None = None,
    init_weights: str | None = None,
    tracking_uri: str | None = None,
) -> tuple[Trainer, Loaders]:
    """Loaders, model and ``training.Trainer`` of ``exp`` on this rank (not yet restored).

    ``exp.data.source.url`` is the dataset and ``exp.eval.split`` the eval split (None: no evaluation);
    checkpoints go to ``checkpoint_url`` (path or ``s3://``, staged locally under
    ``checkpoint_key``). ``make_sink(model)`` gives this rank's ``MetricsSink`` (None: no-op).
    ``exp.eval.fewshot_data`` adds the few-shot evaluator as a periodic Trainer evaluation. A
    distilling experiment loads its teacher on this rank, a BEiT experiment its tokenizer
    (``orchestration.launch.teacher``; a registered one from ``tracking_uri``).
    """
    from orchestration.evaluation.in_training import fewshot_hooks
    from orchestration.launch.teacher import frozen_for
    from training import Trainer

    loaders = build_loaders(exp, rank=rank, world=world)
    model = build_model(exp, loaders.num_classes, init_weights)
    sink = make_sink(model) if make_sink is not None else None
    checkpoint_dir, store = checkpoint_location(checkpoint_url, checkpoint_key)
    trainer = Trainer(model, exp.train, loaders.train, eval_loader=loaders.eval, sink=sink,
                      checkpoint_dir=checkpoint_dir, checkpoint_store=store,
                      periodic=fewshot_hooks(exp, rank=rank, world=world),
                      teacher=frozen_for(exp, loaders.num_classes, tracking_uri))
    return trainer, loaders


def resume(trainer: Trainer, log_metrics: Callable[[dict[str, float], int], None] | None,
           *, prefix: str = "") -> int:
    """Continue from the newest complete checkpoint (if any); returns the step it resumed from.

    One ``<prefix>resumed_from_step`` point per attempt goes to ``log_metrics``: a restarted worker
    group or a resumed trial shows up as a value > 0.
    """
    resumed = trainer.restore("auto")
    step = trainer.step
    if log_metrics is not None:
        log_metrics({f"{prefix}resumed_from_step": float(step), f"{prefix}resumed": float(resumed)}, step)
    return step


def timed_fit(trainer: Trainer) -> tuple[dict[str, Any], float]:
    """``trainer.fit()`` and its wall time in seconds."""
    t0 = time.perf_counter()
    result = trainer.fit()
    return result, time.perf_counter() - t0


def probe_batch(exp: Experiment, n: int) -> Any:
    """A few normalised eval images for attention maps (rank 0), or None."""
    if not n or not exp.eval.split:
        return None
    from pipeline import build_loader

    cfg = exp.data.for_eval(exp.eval.split, batch_size=n, output="float", **{"io.num_workers": 0})
    try:
        for batch in build_loader(cfg, rank=0, world_size=1):
            return batch[0][:n].clone()
    except Exception as e:  # noqa: BLE001 - attention maps are optional
        log.warning("no probe images for attention maps: %s", e)
    return None
