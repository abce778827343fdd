"""Supervised classification: softmax cross-entropy (hard or soft targets) or sigmoid multi-label."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from confkit import Checker
from training.objectives.base import Objective, as_sums, valid_rows


@dataclass(frozen=True, kw_only=True)
class ClassificationConfig:
    """``loss="softmax"``: cross-entropy over classes (``label_smoothing`` applies);
    ``"sigmoid"``: multi-label binary cross-entropy summed over classes (big_vision's I21k/JFT
    pre-training loss)."""

    kind: Literal["classification"] = "classification"
    loss: Literal["softmax", "sigmoid"] = "softmax"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        c = Checker(self)
        c.choice("kind", ("classification",))
        if c.choice("loss", ("softmax", "sigmoid")) and c.number("label_smoothing", ge=0, lt=1):
            c.require(self.label_smoothing == 0 or self.loss == "softmax",
                      "label_smoothing only applies to loss='softmax'; set it to 0 for 'sigmoid'")
        c.done()


def softmax_xent(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy. `targets`: int64 (B,) labels, or float (B, C) soft targets (mixup/cutmix)."""
    logits = logits.float()
    if targets.dtype.is_floating_point:
        targets = targets.float()
        if label_smoothing:
            targets = targets * (1 - label_smoothing) + label_smoothing / logits.shape[-1]
        return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def sigmoid_xent(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-label sigmoid cross-entropy, summed over classes and averaged over the batch.

    As big_vision does for I21k/JFT pre-training. Int (B,) targets are one-hot encoded.
    """
    logits = logits.float()
    if not targets.dtype.is_floating_point:
        targets = F.one_hot(targets, logits.shape[-1])
    bce = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none")  # (B, C)
    return bce.sum(-1).mean()


def loss_fn(cfg: ClassificationConfig, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss `cfg.loss` selects, as a scalar fp32 tensor."""
    if cfg.loss == "sigmoid":
        return sigmoid_xent(logits, targets)
    return softmax_xent(logits, targets, cfg.label_smoothing)


class ClassificationObjective(Objective):
    """Supervised classification: the model's logits against the batch's labels (hard, soft after
    mixup/cutmix, or multi-hot); evaluation reports top-1/top-5 (softmax) or precision@1
    (sigmoid) and the loss over every valid row."""

    eval_keys = ("top1", "top5", "loss", "samples")

    def loss(self, module: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        return loss_fn(self.cfg, module(batch[0]), batch[1])

    def eval_sums(self, module: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        images, targets, valid = batch[0], batch[1], valid_rows(batch)
        logits = module(images).float()  # (B, C)
        if valid.sum() == 0:
            return as_sums([0, 0, 0, 0])
        logits, targets = logits[valid], targets[valid]
        if targets.dtype.is_floating_point:  # multi-hot / soft targets: precision@1
            top1 = targets.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1) > 0
            top5 = top1
            label = targets.argmax(-1)
        else:
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, 5)
            top1 = top[:, 0] == targets
            top5 = (top == targets[:, None]).any(-1)
            label = targets
        if self.cfg.loss == "softmax":
            loss = F.cross_entropy(logits, label, reduction="sum")
        else:
            loss = loss_fn(self.cfg, logits, targets) * len(targets)
        return as_sums([top1.sum(), top5.sum(), loss, len(targets)])

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        n = max(sums[3].item(), 1.0)
        key = "eval_prec1" if self.cfg.loss == "sigmoid" else "eval_top1"
        out = {key: sums[0].item() / n, "eval_loss": sums[2].item() / n, "eval_samples": sums[3].item()}
        if self.cfg.loss == "softmax":
            out["eval_top5"] = sums[1].item() / n
        return out
