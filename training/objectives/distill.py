"""DeiT distillation (Touvron et al. 2020, "Training data-efficient image transformers &
distillation through attention"; facebookresearch/deit ``losses.py``).

The student is a distilled ViT (``ViTConfig(distilled=True)``: a class token read by ``head``
and a distillation token read by ``head_dist``). Its class head learns the labels (the base
criterion: cross-entropy with label smoothing, or soft targets after mixup/cutmix), its
distillation head learns the teacher's prediction on the very same augmented images:

* ``type="hard"``: cross-entropy against the teacher's argmax (DeiT's best, and the default);
* ``type="soft"``: ``KL(softmax(teacher / tau) || softmax(student_dist / tau)) * tau^2``,
  summed and divided by ``B * C`` as DeiT's ``losses.py`` does (``reduction='sum'`` over
  ``numel``: a per-element mean, not per-sample).

``loss = (1 - alpha) * base + alpha * distillation``. At inference the model's ``forward``
averages both heads (DeiT's prediction); evaluation reports that top-1 as ``eval_top1`` and each
head's alone (``eval_top1_cls``, ``eval_top1_dist``), plus the teacher's (``eval_top1_teacher``).

The teacher is any ``nn.Module`` mapping the student's input images to ``num_classes`` logits;
orchestration builds it (``orchestration.launch.teacher``) and hands it to the Trainer
(``Trainer(..., teacher=module)``). It is frozen, kept in eval mode, run under ``no_grad`` in its
own dtype on every rank, and is not part of the module DeepSpeed trains: not in the optimizer,
not in checkpoints, not exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from confkit import Checker
from training.objectives.base import Objective, as_sums, valid_rows
from training.objectives.classification import loss_fn


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """DeiT's distillation objective; see the module docstring. DeiT's defaults (``main.py``):
    ``type="hard"`` (its ``--distillation-type``; "none" is the classification objective),
    ``alpha=0.5``, ``tau=1.0``. ``loss`` / ``label_smoothing``: the base criterion on the class
    head, as ``ClassificationConfig``'s (DeiT: softmax, smoothing 0.1). ``teacher``: where
    orchestration loads the teacher from: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, a
    run's export or a model folder / ``.safetensors`` file of ours, or
    ``timm:ARCH=WEIGHTS.safetensors`` (never a pickle)."""

    kind: Literal["distill"] = "distill"
    type: Literal["hard", "soft"] = "hard"
    alpha: float = 0.5
    tau: float = 1.0
    loss: Literal["softmax", "sigmoid"] = "softmax"
    label_smoothing: float = 0.0
    teacher: str = ""

    def __post_init__(self) -> None:
        c = Checker(self)
        c.choice("kind", ("distill",))
        c.choice("type", ("hard", "soft"))
        c.number("alpha", ge=0, le=1, why=" (the distillation term's weight; the labels' is 1 - alpha)")
        c.number("tau", gt=0, why=" (the soft distillation's temperature)")
        if c.choice("loss", ("softmax", "sigmoid")) and c.number("label_smoothing", ge=0, lt=1):
            c.require(self.label_smoothing == 0 or self.loss == "softmax",
                      "label_smoothing only applies to loss='softmax'; set it to 0 for 'sigmoid'")
        c.text("teacher", why=": the teacher to distil from (models:/NAME@ALIAS, models:/NAME/VERSION, a "
                              "model folder or .safetensors file, or timm:ARCH=WEIGHTS.safetensors)")
        c.done()


def distillation_loss(cfg: DistillConfig, dist_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """DeiT's distillation term (``losses.py`` ``DistillationLoss``) of the distillation head's
    logits against the teacher's, both (B, C); a scalar fp32 tensor."""
    dist_logits, teacher_logits = dist_logits.float(), teacher_logits.float()
    if cfg.type == "hard":
        return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
    t = cfg.tau
    kl = F.kl_div(F.log_softmax(dist_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="sum", log_target=True)
    return kl * (t * t) / dist_logits.numel()


def class_count(module: nn.Module) -> int | None:
    """The class count a model says it predicts (ours: ``cfg.num_classes``; timm: ``num_classes``)."""
    n = getattr(getattr(module, "cfg", None), "num_classes", None)
    n = getattr(module, "num_classes", None) if n is None else n
    return int(n) if isinstance(n, int) else None


def _hits(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row top-1 hits (bool): the label, or for soft / multi-hot targets a positive one."""
    top = logits.argmax(-1)
    if targets.dtype.is_floating_point:
        return targets.gather(1, top[:, None]).squeeze(1) > 0
    return top == targets


class DistillationObjective(Objective):
    """DeiT's distillation of ``teacher`` into a distilled ViT student; see the module docstring."""

    eval_keys = ("top1", "top1_cls", "top1_dist", "top1_teacher", "top5", "loss", "samples")

    def __init__(self, cfg: DistillConfig, teacher: nn.Module | None = None) -> None:
        super().__init__(cfg)
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)  # frozen: no gradient is ever computed or stored for it

    def wrap(self, model: nn.Module) -> nn.Module:
        """The student itself (the teacher stays outside: DeepSpeed never sees its parameters)."""
        if not getattr(getattr(model, "cfg", None), "distilled", False):
            raise ValueError("the distillation objective needs a student with DeiT's distillation token and head: "
                             "build it with distilled=True (ViTConfig / ViTSpec, --set model.distilled=true)")
        if self.teacher is None:
            raise ValueError("the distillation objective needs its teacher: Trainer(..., teacher=module) "
                             "(orchestration loads it from train.objective.teacher)")
        student, teacher = class_count(model), class_count(self.teacher)
        if teacher is not None and student is not None and teacher != student:
            raise ValueError(f"the teacher ({self.cfg.teacher}) predicts {teacher} classes, the student {student}: "
                             "distil from a teacher trained on the same classes")
        return model

    def _teacher_logits(self, images: Tensor) -> Tensor:
        """The teacher's logits (fp32) on the student's images, in the teacher's own dtype and
        on their device (moved there once)."""
        assert self.teacher is not None
        p = next(self.teacher.parameters(), None)
        if p is not None and p.device != images.device:
            self.teacher.to(images.device)
            p = next(self.teacher.parameters())
        with torch.no_grad():
            return self.teacher(images.to(p.dtype) if p is not None else images).float()

    def loss(self, module: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        images, targets = batch[0], batch[1]
        teacher_logits = self._teacher_logits(images)  # the same augmented (mixed) images as the student's
        cls_logits, dist_logits = module(images, both_heads=True)  # the model's forward_heads
        base = loss_fn(self.cfg, cls_logits, targets)  # type: ignore[arg-type] - the same fields
        a = self.cfg.alpha
        return base * (1 - a) + distillation_loss(self.cfg, dist_logits, teacher_logits) * a

    def eval_sums(self, module: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        images, targets, valid = batch[0], batch[1], valid_rows(batch)
        if valid.sum() == 0:
            return as_sums([0] * len(self.eval_keys))
        cls_logits, dist_logits = (t.float()[valid] for t in module(images, both_heads=True))
        teacher_logits = self._teacher_logits(images)[valid]
        targets = targets[valid]
        logits = (cls_logits + dist_logits) / 2  # DeiT's prediction
        label = targets.argmax(-1) if targets.dtype.is_floating_point else targets
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, 5)
        top5 = (top == label[:, None]).any(-1) if not targets.dtype.is_floating_point else _hits(logits, targets)
        loss = F.cross_entropy(logits, label, reduction="sum")
        return as_sums([_hits(logits, targets).sum(), _hits(cls_logits, targets).sum(),
                        _hits(dist_logits, targets).sum(), _hits(teacher_logits, targets).sum(), top5.sum(), loss,
                        len(targets)])

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        n = max(sums[6].item(), 1.0)
        out = {f"eval_{k}": sums[i].item() / n for i, k in enumerate(self.eval_keys[:5])}
        return {**out, "eval_loss": sums[5].item() / n, "eval_samples": sums[6].item()}

