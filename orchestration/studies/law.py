"""Scaling laws: fit E = a·(C + d)^(−b) + c to the compute-efficient frontier of a sweep.

Zhai et al. 2021 ("Scaling Vision Transformers", eq. 1) model the error E of the best
model trainable with compute C as a saturating power law: ``a`` and ``b`` set the slope,
``c`` is the irreducible error the curve saturates to at large compute, and ``d`` is the
compute offset that bends the curve at small budgets. The law is fitted to the
*compute-efficient frontier*: over every point of every trial (images seen -> training
FLOPs, eval error), the lower envelope of error against compute. Points below the
envelope do not exist; points above it are wasted compute (wrong size for that budget).

Inputs are the study's points table (written by ``orchestration.sweep``; schema
``POINTS_SCHEMA``, one row per (trial, eval step)). Outputs:

- the frontier fit with bootstrap confidence intervals (trials resampled with replacement),
- the "leave-the-largest-budget-out" check: refit without the trial(s) of the largest
  budget and report how well the law predicts the frontier there (extrapolation error),
- per-size curves (one law per model size, on that size's own envelope) and, from them,
  the compute-optimal model size for any budget,
- two PNG plots and a ``fit.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from orchestration.studies.table import Points, check_compute

PARAM_NAMES = ("a", "b", "c", "d")


N_PARAMS = len(PARAM_NAMES)


def saturating_power_law(compute: np.ndarray | float, a: float, b: float, c: float, d: float) -> np.ndarray:
    """E(C) = a·(C + d)^(−b) + c (Zhai et al. 2021, eq. 1)."""
    return a * np.power(np.asarray(compute, dtype=float) + d, -b) + c


@dataclass(frozen=True)
class PowerLaw:
    """Fitted parameters in raw units (C in FLOPs)."""

    a: float
    b: float
    c: float
    d: float

    def __call__(self, compute: np.ndarray | float) -> np.ndarray:
        return saturating_power_law(compute, self.a, self.b, self.c, self.d)

    def as_dict(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in PARAM_NAMES}

    def __str__(self) -> str:
        return f"E = {self.a:.3g}·(C + {self.d:.3g})^(−{self.b:.3g}) + {self.c:.3g}"


@dataclass(frozen=True)
class _Scaled:
    """Parameters in the optimiser's units: x = C / scale, θ = (log a', b, c, d')."""

    scale: float

    def to_law(self, theta: np.ndarray) -> PowerLaw:
        log_a, b, c, d = (float(t) for t in theta)
        # a'·(C/s + d')^(−b) = a'·s^b·(C + d'·s)^(−b)
        return PowerLaw(a=math.exp(log_a + b * math.log(self.scale)), b=b, c=c, d=d * self.scale)

    def from_law(self, law: PowerLaw) -> np.ndarray:
        return np.array([math.log(law.a) - law.b * math.log(self.scale), law.b, law.c, law.d / self.scale])


def _validate_xy(compute: np.ndarray, error: np.ndarray, n_min: int = N_PARAMS + 1) -> None:
    if compute.shape != error.shape or compute.ndim != 1:
        raise ValueError(f"compute and error must be 1-D of equal length, got {compute.shape} and {error.shape}")
    if len(compute) < n_min:
        raise ValueError(
            f"need at least {n_min} points to fit the {N_PARAMS}-parameter law "
            f"E = a·(C + d)^(−b) + c, got {len(compute)}; add trials (sizes / lengths) or eval points"
        )
    check_compute(compute)
    if not np.all(np.isfinite(error)):
        raise ValueError(f"{int(np.sum(~np.isfinite(error)))} non-finite error value(s); the fit needs finite errors")
    if np.any(error <= 0):
        raise ValueError(
            "error must be > 0 for a log-space fit; "
            f"{int(np.sum(error <= 0))} point(s) are 0 (a saturated eval set?) — fit eval_loss instead"
        )


B_MAX = 4.0


def bound_warnings(law: PowerLaw, compute: np.ndarray, error: np.ndarray) -> list[str]:
    """Plain-language warnings when a fitted parameter sits on its bound (c = 0, d = 0 are fine)."""
    out = []
    if law.b >= B_MAX * 0.999:
        out.append(f"b hit its upper bound {B_MAX}: the frontier still bends downwards (not yet in the "
                   "power-law regime); extend the compute range (longer runs, bigger sizes) before trusting it")
    if law.b <= 1.001e-3:
        out.append("b hit its lower bound: error does not improve with compute on this frontier")
    if law.c >= 0.999 * float(np.max(error)):
        out.append("c reached the largest observed error: the law is flat; the frontier has no trend")
    if law.d >= 9.99 * float(np.max(compute)):
        out.append("d hit its upper bound (10x the largest compute): the data sit in the flat start of the curve")
    return out


def _residuals(theta: np.ndarray, x: np.ndarray, log_e: np.ndarray, sw: np.ndarray) -> np.ndarray:
    log_a, b, c, d = theta
    pred = np.exp(log_a - b * np.log(x + d)) + c
    return sw * (np.log(pred) - log_e)


def _starts(x: np.ndarray, e: np.ndarray) -> list[np.ndarray]:
    """A grid of initial points; log a' is set so the curve passes through the data's mean."""
    starts = []
    emin = float(e.min())
    for b in (0.1, 0.3, 0.6, 1.2):
        for c in (0.0, 0.5 * emin, 0.9 * emin):
            for d in (0.0, 1.0, float(np.sqrt(x.max())), float(x.max())):
                log_a = float(np.mean(np.log(np.maximum(e - c, 1e-12)) + b * np.log(x + d)))
                starts.append(np.array([log_a, b, c, d]))
    return starts


def _fit_scaled(
    x: np.ndarray, e: np.ndarray, w: np.ndarray, starts: Sequence[np.ndarray]
) -> tuple[np.ndarray, float]:
    lo = np.array([-60.0, 1e-3, 0.0, 0.0])
    hi = np.array([60.0, B_MAX, float(e.max()), 10.0 * float(x.max())])
    log_e, sw = np.log(e), np.sqrt(w)
    best, best_cost = None, np.inf
    for s in starts:
        s = np.clip(s, lo, hi - 1e-9 * (hi - lo))
        try:
            r = least_squares(_residuals, s, args=(x, log_e, sw), bounds=(lo, hi), x_scale="jac",
                              method="trf", max_nfev=2000)
        except (ValueError, FloatingPointError):  # a start that lands on log(<=0)
            continue
        if np.isfinite(r.cost) and r.cost < best_cost:
            best, best_cost = r.x, float(r.cost)
    if best is None:
        raise ValueError("the power-law fit did not converge from any start")
    return best, best_cost


def fit_power_law(
    compute: Sequence[float] | np.ndarray,
    error: Sequence[float] | np.ndarray,
    *,
    weights: Sequence[float] | np.ndarray | None = None,
    init: PowerLaw | None = None,
) -> PowerLaw:
    """Least-squares fit of E = a·(C + d)^(−b) + c to points, in log space.

    Residuals are log(pred) − log(E) (relative errors: a 1% miss at 0.9 error counts as
    much as one at 0.1). Compute is rescaled by its minimum for conditioning; the fit
    runs from a grid of 48 starts (or from ``init`` plus a few) within bounds
    a > 0, 0.001 ≤ b ≤ 4, 0 ≤ c ≤ max(E), 0 ≤ d ≤ 10·max(C), and keeps the best.
    ``weights`` multiply squared residuals (the bootstrap passes resample counts).
    """
    c_arr, e_arr = np.asarray(compute, dtype=float), np.asarray(error, dtype=float)
    _validate_xy(c_arr, e_arr)
    w = np.ones_like(c_arr) if weights is None else np.asarray(weights, dtype=float)
    sc = _Scaled(scale=float(c_arr.min()))
    x = c_arr / sc.scale
    if init is None:
        starts = _starts(x, e_arr)
    else:
        t0 = sc.from_law(init)
        starts = [t0] + [t0 * np.array([1.0, f, 1.0, 1.0]) for f in (0.7, 1.4)] + _starts(x, e_arr)[::12]
    theta, _ = _fit_scaled(x, e_arr, w, starts)
    return sc.to_law(theta)


def rmse_log(law: PowerLaw, compute: np.ndarray, error: np.ndarray) -> float:
    """Root-mean-square of log(pred / observed): ≈ the typical relative miss."""
    return float(np.sqrt(np.mean((np.log(law(compute)) - np.log(error)) ** 2)))


def frontier_indices(compute: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Indices of the compute-efficient frontier, sorted by compute.

    A point is on the frontier when no point with at most its compute has lower error:
    the lower envelope (running minimum) of error against compute.
    """
    compute, error = np.asarray(compute, dtype=float), np.asarray(error, dtype=float)
    order = np.lexsort((error, compute))  # by compute, ties: lowest error first
    keep, best = [], np.inf
    for i in order:
        if error[i] < best:
            keep.append(i)
            best = error[i]
    return np.asarray(keep, dtype=int)


@dataclass(frozen=True)
class Holdout:
    """Leave-the-largest-budget-out check: fit without the largest trial(s), predict there."""

    left_out_trials: list[str]
    fit_compute_max: float  # the largest compute the held-out fit saw
    law: PowerLaw | None  # fit without them (None: too few points left)
    n_points: int  # held-out frontier points predicted
    mean_abs_rel_error: float  # mean |pred − obs| / obs over them
    max_abs_rel_error: float
    reason: str = ""  # why law is None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["law"] = None if self.law is None else self.law.as_dict()
        return d


@dataclass(frozen=True)
class FrontierFit:
    """The study's law with bootstrap intervals and the extrapolation check."""

    law: PowerLaw
    metric: str
    frontier: Points  # the points fitted, sorted by compute
    rmse_log: float
    confidence: float
    ci: dict[str, tuple[float, float]]  # parameter -> (lo, hi)
    boot: np.ndarray  # (n_boot_ok, 4) bootstrap parameter samples (a, b, c, d)
    holdout: Holdout | None
    warnings: tuple[str, ...] = ()  # parameters on their bounds, in words

    def band(self, compute: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise bootstrap band (lo, hi) of the fitted curve at ``compute``."""
        compute = np.asarray(compute, dtype=float)
        if len(self.boot) == 0:
            y = self.law(compute)
            return y, y
        curves = np.stack([saturating_power_law(compute, *p) for p in self.boot])  # (B, M)
        alpha = (1.0 - self.confidence) / 2
        return np.quantile(curves, alpha, axis=0), np.quantile(curves, 1 - alpha, axis=0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "law": str(self.law),
            "params": self.law.as_dict(),
            "metric": self.metric,
            "n_frontier_points": len(self.frontier),
            "rmse_log": self.rmse_log,
            "confidence": self.confidence,
            "ci": {k: list(v) for k, v in self.ci.items()},
            "n_boot": len(self.boot),
            "holdout": None if self.holdout is None else self.holdout.as_dict(),
            "warnings": list(self.warnings),
        }


def frontier_of(points: Points) -> Points:
    return points.select(frontier_indices(points.compute, points.error))


def fit_frontier(
    points: Points,
    *,
    n_boot: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    holdout: bool = True,
) -> FrontierFit:
    """Fit the law to the frontier of all trials; bootstrap over trials; holdout check.

    Bootstrap: draw trials with replacement, recompute the frontier of the drawn trials
    and refit with each frontier point weighted by how often its trial was drawn; the
    percentile interval of each parameter is the CI. Replicates whose frontier has too
    few points are skipped.
    """
    if len(points) == 0:
        raise ValueError("no points to fit")
    variants = sorted(set(points.variant))
    if len(variants) < 2:
        raise ValueError(
            f"the compute-efficient frontier needs several model sizes, got only {variants}; "
            "sweep at least two variants (per-size curves: fit_per_size)"
        )
    front = frontier_of(points)
    law = fit_power_law(front.compute, front.error)

    rng = np.random.default_rng(seed)
    trials = np.array(sorted(set(points.trial)))
    boot: list[list[float]] = []
    for _ in range(n_boot):
        drawn, counts = np.unique(rng.choice(trials, size=len(trials), replace=True), return_counts=True)
        mult = dict(zip(drawn, counts, strict=True))
        sub = points.select(np.isin(points.trial, drawn))
        f = frontier_of(sub)
        if len(f) <= N_PARAMS:
            continue
        w = np.array([mult[t] for t in f.trial], dtype=float)
        try:
            bl = fit_power_law(f.compute, f.error, weights=w, init=law)
        except ValueError:
            continue
        boot.append([bl.a, bl.b, bl.c, bl.d])
    boot_arr = np.asarray(boot, dtype=float).reshape(-1, N_PARAMS)
    alpha = (1.0 - confidence) / 2
    ci = {
        name: (float(np.quantile(boot_arr[:, i], alpha)), float(np.quantile(boot_arr[:, i], 1 - alpha)))
        if len(boot_arr) else (math.nan, math.nan)
        for i, name in enumerate(PARAM_NAMES)
    }
    return FrontierFit(
        law=law,
        metric=points.metric,
        frontier=front,
        rmse_log=rmse_log(law, front.compute, front.error),
        confidence=confidence,
        ci=ci,
        boot=boot_arr,
        holdout=leave_largest_budget_out(points) if holdout else None,
        warnings=tuple(bound_warnings(law, front.compute, front.error)),
    )


def leave_largest_budget_out(points: Points, *, rtol: float = 1e-6) -> Holdout:
    """Refit without the largest-budget trial(s); predict the frontier they reach beyond.

    A trial's budget is its final (largest) compute. The trial(s) of the largest budget
    are removed entirely (as if never run), the law is refitted on the rest, and the
    full frontier's points at compute beyond anything left are predicted: the
    extrapolation a user relies on when sizing a bigger run. When the largest-budget
    trials reach no frontier point out there (they were dominated), the next budget is
    left out as well, until there is something to predict.
    """
    trials = np.array(sorted(set(points.trial)))
    budgets = np.array([points.compute[points.trial == t].max() for t in trials])
    full = frontier_of(points)
    nan = math.nan
    for cut in np.unique(budgets)[::-1]:
        out = trials[budgets >= cut * (1 - rtol)]
        rest = points.select(~np.isin(points.trial, out))
        if len(rest) == 0:
            break
        cmax = float(rest.compute.max())
        target = full.select(full.compute > cmax)
        if len(target) == 0:
            continue
        front_rest = frontier_of(rest)
        try:
            law = fit_power_law(front_rest.compute, front_rest.error)
        except ValueError as e:
            return Holdout(list(out), cmax, None, 0, nan, nan, str(e))
        rel = np.abs(law(target.compute) - target.error) / target.error
        return Holdout(list(out), cmax, law, len(target), float(rel.mean()), float(rel.max()))
    return Holdout([], nan, None, 0, nan, nan, "no trial extends the frontier beyond the others")
