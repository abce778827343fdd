"""Linear probe of a frozen ViT: the same ridge as few-shot, on the whole train split.

The ViT paper reports "linear" transfer as few-shot linear regression; a full linear probe
(every train image, frozen pre-logits) is the usual companion number. Features of the train
split are extracted by every rank on its loader share and all-gathered, so every rank fits the
same closed-form ridge (:mod:`.ridge`, float64, regulariser by exact leave-one-out on the train
split); top-1 on the ``val`` split is summed over ranks. The result is a
``linear_probe/<dataset>/full`` row of the shared report format.

``protocol="mae"`` follows MAE's linear probe (He et al. 2021; facebookresearch/mae
``main_linprobe.py``) where a closed form can: the features are the class token after the final
norm (``--cls_token``, its default), standardised per dimension by a
``BatchNorm1d(affine=False, eps=1e-6)`` in eval mode whose statistics are the train split's
(:class:`FeatureStandardiser`), then the same ridge. MAE instead trains that BatchNorm and a
linear head for 90 epochs with LARS (batch 16384, blr 0.1, no weight decay) on randomly cropped
and flipped images, and its BatchNorm's running statistics are a moving average over those
batches; here the head is solved in closed form on centre crops and the statistics are exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .checks import check_finite
from .fewshot import FewShotConfig, eval_features, pre_logits, ranked_accuracy
from .results import EvalReport, ResultRow
from .ridge import fit_fewshot
from .support_sets import check_classes, open_pool

#: The report's method name and setting for a probe on the whole train split.
METHOD, SETTING = "linear_probe", "full"
PROTOCOLS = ("vit", "mae")
#: main_linprobe.py: torch.nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6).
MAE_BN_EPS = 1.0e-6


@dataclass(frozen=True)
class FeatureStandardiser:
    """MAE's probe BatchNorm in eval mode: ``(x - mean) / sqrt(var + eps)`` per dimension, with
    the mean and the unbiased variance (what BatchNorm's running_var accumulates) of the probe's
    training features."""

    mean: Tensor  # (D,) float64
    var: Tensor  # (D,) float64
    eps: float = MAE_BN_EPS

    @classmethod
    def fit(cls, x: Tensor, eps: float = MAE_BN_EPS) -> FeatureStandardiser:
        x = x.to(torch.float64)
        return cls(mean=x.mean(0), var=x.var(0, unbiased=True), eps=eps)

    def __call__(self, x: Tensor) -> Tensor:
        """(N, D) features -> (N, D) float64 standardised features."""
        return (x.to(torch.float64) - self.mean.to(x.device)) / (self.var.to(x.device) + self.eps).sqrt()


def class_token(model: nn.Module, x: Tensor) -> Tensor:
    """The class token after the encoder (its final norm included): MAE's ``--cls_token`` probe
    feature. A model without a class token (``pool="gap"``) gives its pre-logits."""
    m = getattr(model, "module", model)
    if not m.cfg.class_token:
        return pre_logits(model, x)
    dtype = next(m.parameters()).dtype
    return m.forward_features(x.to(dtype))[:, 0]  # (B, D)


def _gather_rows(t: Tensor, world_size: int) -> Tensor:
    """Concatenate every rank's (n_r, ...) rows (n_r may differ) on every rank."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return t
    n = torch.tensor([len(t)], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size)]
    torch.distributed.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


@torch.no_grad()
def evaluate_linear(model: nn.Module, cfg: FewShotConfig, *, rank: int = 0, world_size: int = 1,
                    device: torch.device | str | None = None, model_name: str = "",
                    protocol: str = "vit") -> EvalReport:
    """Linear-probe top-1 of ``model`` on every dataset of ``cfg`` (``cfg.shots`` is not used);
    call it on every rank. Rows: ``linear_probe/<name>/full`` with the chosen l2, counts and the
    ``protocol`` ("vit": the pre-logits; "mae": see the module docstring).

    Raises :class:`~.checks.EvaluationError` (every dataset checked before any image is read)
    for fewer than 2 classes or a class without train images, and when features hold NaN/Inf."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    features = class_token if protocol == "mae" else pre_logits
    t0 = time.monotonic()
    device = torch.device(device) if device is not None else next(getattr(model, "module", model).parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    pools = [open_pool(url, cfg.support_split) for url in cfg.datasets]
    for pool in pools:
        check_classes(pool)
    try:
        for pool, url, name in zip(pools, cfg.datasets, cfg.dataset_names(), strict=True):
            classes = pool.num_classes
            x, y = eval_features(model, url, cfg, rank=rank, world_size=world_size, device=device,
                                 split=cfg.support_split, features=features)
            x, y = _gather_rows(x, world_size), _gather_rows(y, world_size)
            check_finite(x, f"{url}: split {cfg.support_split!r} (probe training features)")  # gathered: every rank
            standardise = FeatureStandardiser.fit(x) if protocol == "mae" else None
            if standardise is not None:
                x = standardise(x)
            clf = fit_fewshot(x, y, classes, cfg.l2_grid)
            tx, ty = eval_features(model, url, cfg, rank=rank, world_size=world_size, device=device,
                                   features=features)
            if standardise is not None:
                tx = standardise(tx)
            acc, total = ranked_accuracy(clf, tx, ty, world_size, f"{url}: split {cfg.test_split!r}")
            rows.append(ResultRow(method=METHOD, dataset=name, setting=SETTING, value=acc,
                                  details={"l2": clf.l2, "train_images": len(y), "test_images": total,
                                           "classes": classes, "protocol": protocol}))
    finally:
        model.train(was_training)
    return EvalReport(model=model_name, rows=tuple(rows),
                      info={"datasets": list(cfg.datasets), "seconds": time.monotonic() - t0, "protocol": protocol})
