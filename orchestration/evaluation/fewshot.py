"""Few-shot linear evaluation of a frozen ViT (the ViT paper's Sec. 4 / big_vision ``fewshot_lsr``).

For each downstream dataset (written by ``pipeline.write_shards``): the pre-logit features
(``forward_head(forward_features(x), pre_logits=True)``; the head is never used, so its class
count does not matter) of ``K`` images per class of the train split, chosen by seed
(:mod:`.support`), fit a closed-form ridge map to {-1, 1}^C (:mod:`.ridge`, float64, on the
features' device, regulariser chosen by leave-one-out on the support set), and report top-1
on the ``val`` split as ``fewshot/<dataset>/<K>shot``.

Distributed: every rank calls :func:`evaluate_fewshot` with its ``rank`` / ``world_size``. Each
rank extracts the features of its share of the support set (an equal, padded share, so every
rank runs the same number of forwards: ZeRO-3's parameter gathers need that) and of its
loader share of ``val``; support features are all-gathered (``torch.distributed``, when
initialised), every rank fits the same classifier, and the correct/total counts are summed.
One process computes the same numbers on its own.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from pipeline import DataConfig, IOConfig, PreprocessConfig, SourceConfig, build_loader

from .checks import NonFiniteError, check_finite, nonfinite_message
from .results import EvalReport, ResultRow
from .ridge import L2_GRID, LinearClassifier, fit_fewshot
from .support_sets import SupportPool, check_shots, open_pool, read_images, select_support, support_digest

log = logging.getLogger(__name__)

DEFAULT_SHOTS = (1, 5, 10, 25)


@dataclass(frozen=True, kw_only=True)
class FewShotConfig:
    """What to evaluate. ``datasets``: URLs of datasets written by ``pipeline.write_shards``;
    ``names``: their report names (default: the URL's last path component).
    ``mean``/``std``/``crop_pct``: the eval preprocessing (``DataConfig``'s defaults)."""

    datasets: tuple[str, ...]
    names: tuple[str, ...] = ()
    shots: tuple[int, ...] = DEFAULT_SHOTS
    seed: int = 0
    l2_grid: tuple[float, ...] = L2_GRID
    support_split: str = "train"
    test_split: str = "val"
    batch_size: int = 128
    num_workers: int = 0
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        errors = []
        if not self.datasets:
            errors.append("datasets is empty: give at least one dataset URL")
        if not self.shots or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in self.shots):
            errors.append(f"shots={self.shots!r} must be one or more ints >= 1, e.g. 1,5,10,25")
        if self.names and len(self.names) != len(self.datasets):
            errors.append(f"names={self.names!r} must name each of the {len(self.datasets)} datasets")
        names = self.dataset_names()
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            errors.append(f"datasets {dup} share a report name; pass names=... (CLI: --data NAME=URL)")
        if any("/" in n or not n for n in names):
            errors.append(f"dataset names {names} must be non-empty and contain no '/'")
        if not self.l2_grid or any(not (math.isfinite(v) and v > 0) for v in self.l2_grid):
            errors.append(f"l2_grid={self.l2_grid!r} must be finite numbers > 0")
        for name in ("batch_size",):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)!r} must be >= 1")
        if errors:
            raise ValueError("invalid FewShotConfig:\n  " + "\n  ".join(errors))

    def dataset_names(self) -> list[str]:
        if self.names:
            return list(self.names)
        return [u.rstrip("/").rsplit("/", 1)[-1] for u in self.datasets]


@dataclass(frozen=True, kw_only=True)
class FewShotResult:
    """``metrics``: ``{"fewshot/<ds>/<K>shot": top-1}``; ``l2``: the chosen regulariser per key."""

    metrics: dict[str, float]
    l2: dict[str, float]
    report: EvalReport
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)  # test images per dataset


def open_pools(cfg: FewShotConfig) -> list[SupportPool]:
    """Every dataset's support pool, checked for ``max(shots)`` images per class: fails before any
    image is read, naming the classes (:class:`~.support.FewShotDataError`)."""
    pools = [open_pool(u, cfg.support_split) for u in cfg.datasets]
    for p in pools:
        check_shots(p, cfg.shots)
    return pools


def pre_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Frozen pre-logit features (B, D) of a ``model.VisionTransformer`` (or a wrapper's ``.module``)."""
    m = getattr(model, "module", model)
    dtype = next(m.parameters()).dtype  # bf16/fp16 weights inside mixed-precision training
    return m.forward_head(m.forward_features(x.to(dtype)), pre_logits=True)


def _gather(t: Tensor, world_size: int) -> Tensor:
    """All ranks' equally shaped ``t`` stacked on a new leading dim (W, ...); itself on one process."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return t[None]
    parts = [torch.empty_like(t) for _ in range(world_size)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def _sum(values: Tensor, world_size: int) -> Tensor:
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    return values


def ranked_accuracy(clf: LinearClassifier, x: Tensor, y: Tensor, world_size: int, where: str) -> tuple[float, int]:
    """(accuracy, images) of `clf` on every rank's test rows `x, y`, summed over the ranks; an
    empty test split or NaN/Inf test features (on any rank: every rank raises together, none is
    left waiting in a collective) raise, naming `where`."""
    correct = (clf.predict(x) == y.to(clf.w.device)).sum().to(torch.float64)
    bad = (~torch.isfinite(x)).sum().to(device=correct.device, dtype=torch.float64)
    counts = _sum(torch.stack([correct, torch.tensor(float(len(y)), dtype=torch.float64, device=correct.device),
                               bad, torch.tensor(float(x.numel()), dtype=torch.float64, device=correct.device)]),
                  world_size)
    total = int(counts[1].item())
    if counts[2].item():
        raise NonFiniteError(nonfinite_message(f"{where} (test features)", int(counts[2].item()), int(counts[3].item())))
    if total == 0:
        raise ValueError(f"{where} has no readable images to test on")
    return counts[0].item() / total, total


@torch.no_grad()
def support_features(model: nn.Module, pool: SupportPool, ids: np.ndarray, cfg: FewShotConfig, *,
                     rank: int, world_size: int, device: torch.device) -> Tensor:
    """Features (len(ids), D) of the support images, in ``ids`` order, on every rank.

    Rank r extracts ids[r::W] (padded to ceil(N / W) with copies of ids[0], so every rank runs
    the same forwards), then the shares are all-gathered and interleaved back.
    """
    n = len(ids)
    per = -(-n // world_size)
    mine = ids[rank::world_size]
    mine = np.concatenate([mine, np.full(per - len(mine), ids[0], np.int64)])
    size = model_image_size(model)
    feats = []
    for b in range(0, per, cfg.batch_size):
        x = read_images(pool.meta, mine[b: b + cfg.batch_size], image_size=size, crop_pct=cfg.crop_pct,
                        mean=cfg.mean, std=cfg.std).to(device)
        feats.append(pre_logits(model, x).float())
    mine_f = torch.cat(feats)  # (per, D)
    allf = _gather(mine_f, world_size)  # (W, per, D): allf[w, j] is ids[j * W + w]
    return allf.transpose(0, 1).reshape(per * world_size, -1)[:n]


def model_image_size(model: nn.Module) -> int:
    return int(getattr(model, "module", model).cfg.image_size)


@torch.no_grad()
def eval_features(model: nn.Module, url: str, cfg: FewShotConfig, *, rank: int, world_size: int,
                  device: torch.device, split: str | None = None,
                  features: Callable[[nn.Module, Tensor], Tensor] = pre_logits) -> tuple[Tensor, Tensor]:
    """This rank's share of ``split`` (default: the test split), read once over all ranks by the eval
    loader (no augmentation): ``features`` (n, D; default the pre-logits) and labels (n,) of the
    valid rows."""
    dc = DataConfig(source=SourceConfig(url=url, split=split or cfg.test_split), image_size=model_image_size(model),
                    batch_size=cfg.batch_size, train=False, io=IOConfig(num_workers=cfg.num_workers),
                    preprocess=PreprocessConfig(eval_crop_pct=cfg.crop_pct, mean=cfg.mean, std=cfg.std))
    loader = build_loader(dc, rank=rank, world_size=world_size)
    feats, labels = [], []
    for x, y, valid in loader:  # the same batch count on every rank (padded, masked)
        f = features(model, x.to(device)).float()
        feats.append(f[valid.to(device)])
        labels.append(y[valid].to(device))
    return torch.cat(feats), torch.cat(labels)


def _evaluate_one(model: nn.Module, pool: SupportPool, name: str, cfg: FewShotConfig, *, rank: int,
                  world_size: int, device: torch.device) -> list[ResultRow]:
    kmax = max(cfg.shots)
    ids = select_support(pool, kmax, cfg.seed)  # class-major: class c's shots at [c*kmax, (c+1)*kmax)
    feats = support_features(model, pool, ids, cfg, rank=rank, world_size=world_size, device=device)
    check_finite(feats, f"{pool.url}: split {cfg.support_split!r} (support features)")  # the same on every rank
    feats = feats.view(pool.num_classes, kmax, -1)
    test_x, test_y = eval_features(model, pool.url, cfg, rank=rank, world_size=world_size, device=device)
    rows = []
    for k in sorted(set(cfg.shots)):
        # The first k of each class's kmax: exactly select_support(pool, k, seed) (nested sets).
        x = feats[:, :k].reshape(pool.num_classes * k, -1)
        y = torch.arange(pool.num_classes, device=x.device).repeat_interleave(k)
        clf = fit_fewshot(x, y, pool.num_classes, cfg.l2_grid)
        acc, total = ranked_accuracy(clf, test_x, test_y, world_size, f"{pool.url}: split {cfg.test_split!r}")
        sub = ids.reshape(pool.num_classes, kmax)[:, :k].reshape(-1)
        rows.append(ResultRow(method="fewshot", dataset=name, setting=f"{k}shot", value=acc,
                              details={"l2": clf.l2, "seed": cfg.seed, "test_images": total,
                                       "classes": pool.num_classes, "support": support_digest(pool, sub),
                                       "dataset_version": pool.meta.version}))
    return rows


def evaluate_fewshot(model: nn.Module, cfg: FewShotConfig, *, rank: int = 0, world_size: int = 1,
                     device: torch.device | str | None = None, model_name: str = "",
                     pools: Sequence[SupportPool] | None = None) -> FewShotResult:
    """Few-shot top-1 of ``model`` on every dataset of ``cfg``; call it on every rank (see module doc).

    Raises :class:`~.support.FewShotDataError` (before any image is read) when a dataset has
    fewer than 2 classes or a class with fewer train images than ``max(cfg.shots)``, and
    :class:`~.checks.NonFiniteError` when the features hold NaN/Inf (both :class:`~.checks.EvaluationError`).
    ``pools``: from :func:`open_pools`,
    to check the datasets once at launch and reuse them at every evaluation.
    """
    t0 = time.monotonic()
    if device is None:
        device = next(getattr(model, "module", model).parameters()).device
    device = torch.device(device)
    pools = list(pools) if pools is not None else open_pools(cfg)
    was_training = model.training
    model.eval()
    try:
        rows = [r for pool, name in zip(pools, cfg.dataset_names(), strict=True)
                for r in _evaluate_one(model, pool, name, cfg, rank=rank, world_size=world_size, device=device)]
    finally:
        model.train(was_training)
    report = EvalReport(model=model_name, rows=tuple(rows),
                        info={"shots": list(cfg.shots), "seed": cfg.seed, "datasets": list(cfg.datasets)})
    metrics = report.metrics()
    return FewShotResult(metrics=metrics, l2={r.key: float(r.details["l2"]) for r in rows}, report=report,
                         seconds=time.monotonic() - t0,
                         counts={r.dataset: int(r.details["test_images"]) for r in rows})
