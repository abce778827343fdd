"""Linear probe of a frozen ViT: the same ridge as few-shot, on the whole train split.

The ViT paper reports "linear" transfer as few-shot linear regression; a full linear probe
(every train image, frozen pre-logits) is the usual companion number. Features of the train
split are extracted by every rank on its loader share and all-gathered, so every rank fits the
same closed-form ridge (:mod:`.ridge`, float64, regulariser by exact leave-one-out on the train
split); top-1 on the ``val`` split is summed over ranks. The result is a
``linear_probe/<dataset>/full`` row of the shared report format.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from .checks import check_finite
from .fewshot import FewShotConfig, eval_features, ranked_accuracy
from .results import EvalReport, ResultRow
from .ridge import fit_fewshot
from .support_sets import check_classes, open_pool

#: The report's method name and setting for a probe on the whole train split.
METHOD, SETTING = "linear_probe", "full"


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
                    device: torch.device | str | None = None, model_name: str = "") -> EvalReport:
    """Linear-probe top-1 of ``model`` on every dataset of ``cfg`` (``cfg.shots`` is not used);
    call it on every rank. Rows: ``linear_probe/<name>/full`` with the chosen l2 and counts.

    Raises :class:`~.checks.EvaluationError` (every dataset checked before any image is read)
    for fewer than 2 classes or a class without train images, and when features hold NaN/Inf."""
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
                                 split=cfg.support_split)
            x, y = _gather_rows(x, world_size), _gather_rows(y, world_size)
            check_finite(x, f"{url}: split {cfg.support_split!r} (probe training features)")  # gathered: every rank
            clf = fit_fewshot(x, y, classes, cfg.l2_grid)
            tx, ty = eval_features(model, url, cfg, rank=rank, world_size=world_size, device=device)
            acc, total = ranked_accuracy(clf, tx, ty, world_size, f"{url}: split {cfg.test_split!r}")
            rows.append(ResultRow(method=METHOD, dataset=name, setting=SETTING, value=acc,
                                  details={"l2": clf.l2, "train_images": len(y), "test_images": total,
                                           "classes": classes}))
    finally:
        model.train(was_training)
    return EvalReport(model=model_name, rows=tuple(rows),
                      info={"datasets": list(cfg.datasets), "seconds": time.monotonic() - t0})
