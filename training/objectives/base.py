"""The objective seam: what a run learns, separate from how it is trained.

An :class:`Objective` turns the experiment's model into the module DeepSpeed trains (the model
itself, or the model plus the objective's own modules: MAE's decoder), computes the loss of a
training batch and the sums an evaluation reduces over ranks, and names the part of the
trained module that leaves the run (the encoder of an MAE). The Trainer, checkpoints, ZeRO,
resume, preemption, the watchdog, MFU and the metrics sink are the same for every objective.

Batches are the loader's tuples: training ``(images, targets[, mask])``, evaluation
``(images, targets, valid[, mask])`` (``mask`` (B, N) bool when the data config draws patch
masks, ``pipeline.masking``); every tensor already on the device, images in the model's dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn


class Objective(ABC):
    """One training objective; see the module docstring. ``cfg`` is its config section."""

    #: Names of the eval sums (the order of :meth:`eval_sums`' vector).
    eval_keys: tuple[str, ...] = ()
    #: Where the part that leaves the run sits in the trained module ("": all of it; MAE: "encoder.").
    exported_prefix: str = ""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def num_classes(self, dataset_classes: int) -> int:
        """The head size of the model for a dataset with ``dataset_classes`` classes (0: no head)."""
        return dataset_classes

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module DeepSpeed trains: ``model`` plus this objective's own modules, if any."""
        return model

    def exported(self, module: nn.Module) -> nn.Module:
        """The part of the trained module that leaves the run (registry, fine-tuning, few-shot):
        the submodule at :attr:`exported_prefix`."""
        name = self.exported_prefix.rstrip(".")
        return module.get_submodule(name) if name and hasattr(module, name) else module

    def begin_micro_batch(self, *, step: int, slot: int, seed: int) -> None:
        """Called by the Trainer before each training micro-batch: ``step`` is the optimizer step
        being taken (0-based; the same for every micro-batch of an accumulation), ``slot`` the
        micro-batch's place in the global batch (``micro_index * world + rank``: the same samples
        have the same slot on any number of ranks), ``seed`` the run's ``train.seed``. For
        objectives with schedules or noise of their own (the dVAE's temperature and Gumbel noise);
        nothing by default."""
        return None

    def flops_per_image(self, module: nn.Module) -> float | None:
        """Training FLOPs per image (forward + backward, no recomputation), None when unknown."""
        cfg = getattr(self.exported(module), "cfg", None)
        if cfg is None:
            return None
        try:
            from model.flops import train_flops_per_image

            return float(train_flops_per_image(cfg))
        except Exception:  # a stand-in module without a ViTConfig: no MFU
            return None

    @abstractmethod
    def loss(self, module: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        """The scalar fp32 loss of one training micro-batch (this rank's mean)."""

    def train_sums(self) -> Tensor | None:
        """Float64 sums this rank accumulated over its training micro-batches since the last call
        (on the device: no host sync), reset by the call; the Trainer all-reduces them with the
        loss at each log line and logs :meth:`train_metrics` of the total. None: nothing to log."""
        return None

    def train_metrics(self, sums: Tensor) -> dict[str, float]:
        """The logged training metrics of a log window's summed :meth:`train_sums` (on the CPU)."""
        return {}

    @abstractmethod
    def eval_sums(self, module: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        """Float64 sums over the batch's valid rows, one per :attr:`eval_keys` entry (summed over
        batches and ranks by the Trainer)."""

    @abstractmethod
    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        """The logged metrics of a whole evaluation from its summed :meth:`eval_sums`."""


def valid_rows(batch: tuple[Tensor, ...]) -> Tensor:
    """The eval batch's ``valid`` mask (padding rows are False)."""
    return batch[2].bool()


def as_sums(values: list[Tensor | float]) -> Tensor:
    """A float64 vector on the CPU (what the Trainer all-reduces)."""
    return torch.tensor([float(v) for v in values], dtype=torch.float64)
