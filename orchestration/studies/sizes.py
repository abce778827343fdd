"""Per-size curves: one saturating power law per model size (on that size's own envelope) and,
from them, the compute-optimal model size for any budget."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestration.studies.law import PowerLaw, fit_power_law, frontier_of
from orchestration.studies.table import Points


@dataclass(frozen=True)
class SizeCurve:
    """One model size's law, fitted on that size's own envelope (all its trials)."""

    variant: str
    params: int | None
    law: PowerLaw | None
    n_points: int
    compute_range: tuple[float, float]
    reason: str = ""  # why law is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant, "params": self.params, "n_points": self.n_points,
            "compute_range": list(self.compute_range), "reason": self.reason,
            "law": None if self.law is None else str(self.law),
            "fit": None if self.law is None else self.law.as_dict(),
        }


def fit_per_size(points: Points) -> dict[str, SizeCurve]:
    """variant -> its fitted curve. Sizes with too few points get ``law=None`` and a reason."""
    curves: dict[str, SizeCurve] = {}
    for v in sorted(set(points.variant), key=lambda v: (points.params.get(v, 0), v)):
        own = frontier_of(points.select(points.variant == v))
        rng = (float(own.compute.min()), float(own.compute.max()))
        try:
            law: PowerLaw | None = fit_power_law(own.compute, own.error)
            reason = ""
        except ValueError as e:
            law, reason = None, str(e)
        curves[v] = SizeCurve(v, points.params.get(v), law, len(own), rng, reason)
    return curves


def optimal_size(curves: Mapping[str, SizeCurve], compute: float) -> str:
    """The model size whose fitted curve is lowest at ``compute`` (the compute-optimal one)."""
    return optimal_sizes(curves, np.array([compute], dtype=float))[0]


def optimal_sizes(curves: Mapping[str, SizeCurve], compute: np.ndarray) -> list[str]:
    """Vectorised ``optimal_size`` over a grid of budgets.

    A size competes only inside its measured compute range: below its first point its curve is
    an extrapolation towards zero training, beyond its last one a guess at training it longer
    than anyone did. So a budget only one size reached names that size, never a smaller one
    whose extrapolated curve happens to lie lower. A budget no size reached (beyond or below
    every range) goes to the sizes measured nearest to it (log distance), lowest curve first:
    :func:`measured_budgets` tells those apart.
    """
    fitted = [c for c in curves.values() if c.law is not None]
    if not fitted:
        raise ValueError("no size has a fitted curve; each size needs more than 4 points on its envelope")
    compute = np.asarray(compute, dtype=float)
    if np.any(compute <= 0):
        raise ValueError("compute budgets must be > 0")
    errs = np.stack([c.law(compute) for c in fitted])  # (S, M)  # type: ignore[union-attr]
    dist = _log_distance(fitted, compute)  # (S, M): 0 inside a size's measured range
    nearest = dist <= dist.min(axis=0, keepdims=True) + 1e-12
    best = np.argmin(np.where(nearest, errs, np.inf), axis=0)
    return [fitted[i].variant for i in best]


def measured_budgets(curves: Mapping[str, SizeCurve], compute: np.ndarray) -> np.ndarray:
    """Which budgets lie inside some fitted size's measured compute range (bool per budget)."""
    fitted = [c for c in curves.values() if c.law is not None]
    return (_log_distance(fitted, np.asarray(compute, dtype=float)) == 0).any(axis=0)


def _log_distance(fitted: list[SizeCurve], compute: np.ndarray) -> np.ndarray:
    """(S, M) distance in log10 compute from each budget to each size's measured range (0 inside)."""
    lo = np.log10([c.compute_range[0] * (1 - 1e-9) for c in fitted])[:, None]
    hi = np.log10([c.compute_range[1] * (1 + 1e-9) for c in fitted])[:, None]
    x = np.log10(compute)[None, :]
    return np.maximum(lo - x, 0) + np.maximum(x - hi, 0)
