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

Pure numpy/scipy/matplotlib/pyarrow: runs on a laptop on a table copied off the cluster::

    python -m orchestration.scaling study/points.parquet --out study/analysis
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.optimize import least_squares

# One row per evaluation point of one trial. `flops` is cumulative training compute
# (model.flops.train_flops_per_image × images); `eval_error` = 1 − eval top-1.
POINTS_SCHEMA = pa.schema(
    [
        pa.field("study", pa.string()),
        pa.field("trial", pa.string()),
        pa.field("variant", pa.string()),
        pa.field("params", pa.int64()),
        pa.field("steps", pa.int64()),  # planned total steps of the trial
        pa.field("samples", pa.int64()),  # training-set size limit; null = the whole split
        pa.field("seed", pa.int64()),
        pa.field("lr", pa.float64()),
        pa.field("weight_decay", pa.float64()),
        pa.field("step", pa.int64()),
        pa.field("images", pa.int64()),
        pa.field("flops", pa.float64()),
        pa.field("eval_loss", pa.float64()),
        pa.field("eval_error", pa.float64()),
    ]
)
METRICS = ("eval_error", "eval_loss")
PARAM_NAMES = ("a", "b", "c", "d")
N_PARAMS = len(PARAM_NAMES)


# --------------------------------------------------------------------------- the table


def points_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts keyed by ``POINTS_SCHEMA`` names) -> a typed Arrow table.

    Missing optional fields (``samples``, ``lr``, ...) become nulls; an unknown key is an
    error so that a typo in the sweep does not silently drop a column.
    """
    rows = list(rows)
    names = set(POINTS_SCHEMA.names)
    for row in rows:
        unknown = set(row) - names
        if unknown:
            raise ValueError(f"unknown point field(s) {sorted(unknown)}; known: {POINTS_SCHEMA.names}")
    columns = {n: [row.get(n) for row in rows] for n in POINTS_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=POINTS_SCHEMA)


def write_points(table: pa.Table, path: str | Path) -> Path:
    """Write the points table as Parquet (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.cast(POINTS_SCHEMA), path)
    return path


def read_points(path: str | Path) -> pa.Table:
    """Read a points table, checking it has the columns the analysis needs."""
    table = pq.read_table(path)
    missing = {"trial", "variant", "flops", *METRICS} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: not a points table, missing column(s) {sorted(missing)}")
    return table


@dataclass(frozen=True)
class Points:
    """The columns the fit needs, as numpy arrays (one entry per point)."""

    trial: np.ndarray  # (N,) str
    variant: np.ndarray  # (N,) str
    compute: np.ndarray  # (N,) float, training FLOPs
    error: np.ndarray  # (N,) float, the fitted metric
    params: dict[str, int] = field(default_factory=dict)  # variant -> parameter count
    metric: str = "eval_error"

    def __len__(self) -> int:
        return len(self.compute)

    def select(self, mask: np.ndarray) -> Points:
        return Points(self.trial[mask], self.variant[mask], self.compute[mask], self.error[mask],
                      self.params, self.metric)


def points_from_table(table: pa.Table, metric: str = "eval_error", *, drop_nonfinite: bool = False) -> Points:
    """Extract ``Points`` for ``metric`` from a points table.

    Raises ``ValueError`` on non-positive compute and (unless ``drop_nonfinite``) on
    non-finite metric values, naming the offending trials: a diverged run must be looked
    at, not averaged into a law.
    """
    if metric not in table.column_names:
        raise ValueError(f"metric {metric!r} is not a column of the table; choose one of {list(METRICS)}")
    trial = np.asarray(table.column("trial").to_pylist(), dtype=object).astype(str)
    variant = np.asarray(table.column("variant").to_pylist(), dtype=object).astype(str)
    compute = np.asarray(table.column("flops").to_numpy(zero_copy_only=False), dtype=float)
    error = np.asarray(
        [np.nan if v is None else v for v in table.column(metric).to_pylist()], dtype=float
    )
    bad = ~np.isfinite(error)
    if bad.any():
        trials = sorted(str(t) for t in set(trial[bad]))
        if not drop_nonfinite:
            raise ValueError(
                f"{int(bad.sum())} non-finite {metric} value(s) in trial(s) {trials[:5]}"
                f"{' ...' if len(trials) > 5 else ''}; fix or drop those trials "
                "(drop_nonfinite=True / --drop-nonfinite)"
            )
        warnings.warn(f"dropping {int(bad.sum())} non-finite {metric} point(s) from {trials}", stacklevel=2)
    params: dict[str, int] = {}
    if "params" in table.column_names:
        for v, p in zip(variant, table.column("params").to_pylist(), strict=True):
            if p is not None:
                params[str(v)] = int(p)
    pts = Points(trial, variant, compute, error, params, metric).select(~bad)
    _check_compute(pts.compute)
    return pts


def _check_compute(compute: np.ndarray) -> None:
    if not np.all(np.isfinite(compute)) or np.any(compute <= 0):
        n = int(np.sum(~np.isfinite(compute) | (compute <= 0)))
        raise ValueError(f"compute must be finite and > 0 (training FLOPs); {n} point(s) are not")


# --------------------------------------------------------------------------- the law


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
    _check_compute(compute)
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


# --------------------------------------------------------------------------- frontier


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


def _frontier_of(points: Points) -> Points:
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
    front = _frontier_of(points)
    law = fit_power_law(front.compute, front.error)

    rng = np.random.default_rng(seed)
    trials = np.array(sorted(set(points.trial)))
    boot: list[list[float]] = []
    for _ in range(n_boot):
        drawn, counts = np.unique(rng.choice(trials, size=len(trials), replace=True), return_counts=True)
        mult = dict(zip(drawn, counts, strict=True))
        sub = points.select(np.isin(points.trial, drawn))
        f = _frontier_of(sub)
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
    full = _frontier_of(points)
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
        front_rest = _frontier_of(rest)
        try:
            law = fit_power_law(front_rest.compute, front_rest.error)
        except ValueError as e:
            return Holdout(list(out), cmax, None, 0, nan, nan, str(e))
        rel = np.abs(law(target.compute) - target.error) / target.error
        return Holdout(list(out), cmax, law, len(target), float(rel.mean()), float(rel.max()))
    return Holdout([], nan, None, 0, nan, nan, "no trial extends the frontier beyond the others")


# --------------------------------------------------------------------------- per size


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
        own = _frontier_of(points.select(points.variant == v))
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

    A size competes from the compute of its first measured point on: below that its curve
    is an extrapolation towards zero training, not a measurement. (Budgets below every
    size's first point fall back to the plain lowest curve.)
    """
    fitted = [c for c in curves.values() if c.law is not None]
    if not fitted:
        raise ValueError("no size has a fitted curve; each size needs more than 4 points on its envelope")
    compute = np.asarray(compute, dtype=float)
    if np.any(compute <= 0):
        raise ValueError("compute budgets must be > 0")
    errs = np.stack([c.law(compute) for c in fitted])  # (S, M)  # type: ignore[union-attr]
    starts = np.array([c.compute_range[0] for c in fitted])[:, None]  # (S, 1)
    masked = np.where(compute[None, :] >= starts * (1 - 1e-9), errs, np.inf)
    best = np.where(np.isfinite(masked.min(axis=0)), np.argmin(masked, axis=0), np.argmin(errs, axis=0))
    return [fitted[i].variant for i in best]


# --------------------------------------------------------------------------- plots


def _compute_grid(points: Points, extend: float = 4.0, n: int = 200) -> np.ndarray:
    lo, hi = float(points.compute.min()), float(points.compute.max())
    return np.geomspace(lo / extend, hi * extend, n)


def _fmt_params(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def plot_error_vs_compute(
    points: Points, fit: FrontierFit | None, path: str | Path, *, title: str = ""
) -> Path:
    """Log-log error vs compute: each trial (colour = size), the frontier, the fit and band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    variants = sorted(set(points.variant), key=lambda v: (points.params.get(v, 0), v))
    cmap = plt.get_cmap("viridis")
    colors = {v: cmap(i / max(1, len(variants) - 1)) for i, v in enumerate(variants)}
    fig, ax = plt.subplots(figsize=(12, 5.5))
    seen: set[str] = set()
    for t in sorted(set(points.trial)):
        m = points.trial == t
        order = np.argsort(points.compute[m])
        v = str(points.variant[m][0])
        label = f"{v} ({_fmt_params(points.params[v])})" if v in points.params else v
        ax.plot(points.compute[m][order], points.error[m][order], "-o", ms=2.5, lw=1, alpha=0.55,
                color=colors[v], label=None if v in seen else label)
        seen.add(v)
    if fit is not None:
        grid = _compute_grid(points)
        lo, hi = fit.band(grid)
        ax.fill_between(grid, lo, hi, color="tab:red", alpha=0.18,
                        label=f"{fit.confidence:.0%} bootstrap band")
        ax.plot(grid, fit.law(grid), color="tab:red", lw=2, label=f"fit: {fit.law}")
        ax.plot(fit.frontier.compute, fit.frontier.error, "s", color="black", ms=4, mfc="none",
                label="compute-efficient frontier")
        ax.axhline(fit.law.c, color="tab:red", ls=":", lw=1, label=f"saturation c = {fit.law.c:.3g}")
        h = fit.holdout
        if h is not None and h.law is not None:
            ax.plot(grid, h.law(grid), "--", color="gray", lw=1.2,
                    label=f"fit without largest budget: {h.mean_abs_rel_error:.1%} mean error beyond")
            ax.axvline(h.fit_compute_max, color="gray", ls=":", lw=0.8)
    else:
        front = _frontier_of(points)
        ax.plot(front.compute, front.error, "s", color="black", ms=4, mfc="none",
                label="compute-efficient frontier")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Frame the measurements; a wild extrapolation of the band must not squash them.
    lo_e, hi_e = float(points.error.min()), float(points.error.max())
    ax.set_ylim(lo_e / 2.5, hi_e * 1.6)
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(points.metric.replace("_", " "))
    ax.set_title(title or f"{points.metric} vs compute: every trial, the compute-efficient frontier and the fit")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_optimal_size(
    curves: Mapping[str, SizeCurve], compute: np.ndarray, path: str | Path, *, title: str = ""
) -> Path:
    """Compute-optimal model size (by parameter count where known) against budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    best = optimal_sizes(curves, compute)
    ordered = [v for v in sorted(curves, key=lambda v: (curves[v].params or 0, v)) if curves[v].law is not None]
    use_params = all(curves[v].params for v in ordered)
    ypos = {v: float(curves[v].params) if use_params else float(i) for i, v in enumerate(ordered)}  # type: ignore[arg-type]
    y = np.array([ypos[v] for v in best])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for v in ordered:  # where each size was measured
        ax.plot(curves[v].compute_range, [ypos[v], ypos[v]], color="gray", alpha=0.35, lw=7, solid_capstyle="butt")
    ax.step(compute, y, where="post", color="tab:blue", lw=2, label="compute-optimal size")
    ax.plot([], [], color="gray", alpha=0.35, lw=7, label="measured compute range of the size")
    ax.set_xscale("log")
    if use_params:
        ax.set_yscale("log")
        ax.minorticks_off()
    labels = [f"{v} ({_fmt_params(curves[v].params)})" if use_params else v for v in ordered]  # type: ignore[arg-type]
    ax.set_yticks([ypos[v] for v in ordered], labels, fontsize=8)
    ax.set_ylabel("model size")
    ax.set_xlabel("training compute budget C (FLOPs)")
    ax.set_title(title or "compute-optimal model size (lowest per-size fitted curve)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class Report:
    """What ``analyze`` wrote and found."""

    fit: FrontierFit | None
    curves: dict[str, SizeCurve]
    files: dict[str, Path]
    summary: dict[str, Any]


def analyze(
    table: pa.Table,
    out_dir: str | Path,
    *,
    metric: str = "eval_error",
    n_boot: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    drop_nonfinite: bool = False,
    strict: bool = True,
    fit_law: bool = True,
) -> Report:
    """Fit frontier + per-size curves, write ``fit.json`` and the two plots to ``out_dir``.

    With ``strict=False`` a frontier fit that cannot be made (e.g. one size, too few
    points) is recorded in the summary's ``"error"`` and the plots are still drawn
    without it; the sweep uses this so an analysis problem never loses a finished study.
    ``fit_law=False`` only draws the points (e.g. a learning-rate search, whose frontier
    mixes settings and is no scaling law).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pts = points_from_table(table, metric, drop_nonfinite=drop_nonfinite)
    if len(pts) == 0:
        raise ValueError("the points table is empty")
    summary: dict[str, Any] = {"metric": metric, "n_points": len(pts), "n_trials": len(set(pts.trial)),
                               "variants": sorted(set(pts.variant))}
    fit: FrontierFit | None = None
    if not fit_law:
        files = {"error_vs_compute": plot_error_vs_compute(pts, None, out / f"scaling_{metric}.png")}
        files["fit"] = out / f"fit_{metric}.json"
        files["fit"].write_text(json.dumps(summary, indent=2, default=_json_default))
        return Report(None, {}, files, summary)
    try:
        fit = fit_frontier(pts, n_boot=n_boot, confidence=confidence, seed=seed)
        summary["frontier_fit"] = fit.as_dict()
    except ValueError as e:
        if strict:
            raise
        summary["error"] = str(e)
    curves = fit_per_size(pts)
    summary["per_size"] = {v: c.as_dict() for v, c in curves.items()}
    files = {"error_vs_compute": plot_error_vs_compute(pts, fit, out / f"scaling_{metric}.png")}
    if any(c.law is not None for c in curves.values()):
        grid = np.geomspace(float(pts.compute.min()), float(pts.compute.max()) * 10, 400)
        files["optimal_size"] = plot_optimal_size(curves, grid, out / f"optimal_size_{metric}.png")
        budgets = np.geomspace(grid[0], grid[-1], 9)
        summary["optimal_size"] = [
            {"compute": float(b), "variant": v} for b, v in zip(budgets, optimal_sizes(curves, budgets), strict=True)
        ]
    files["fit"] = out / f"fit_{metric}.json"
    files["fit"].write_text(json.dumps(summary, indent=2, default=_json_default))
    return Report(fit, curves, files, summary)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def format_report(report: Report) -> str:
    """Human-readable summary for the CLI / logs."""
    s = report.summary
    lines = [f"{s['n_trials']} trials, {s['n_points']} points, sizes {', '.join(s['variants'])}; metric {s['metric']}"]
    fit = report.fit
    if fit is None:
        lines.append(f"frontier fit: {'not possible (' + s['error'] + ')' if 'error' in s else 'not requested'}")
    else:
        lines.append(f"frontier fit ({len(fit.frontier)} points, rmse(log) {fit.rmse_log:.3f}): {fit.law}")
        for k in PARAM_NAMES:
            lo, hi = fit.ci[k]
            lines.append(f"  {k} = {getattr(fit.law, k):.4g}   {fit.confidence:.0%} CI [{lo:.4g}, {hi:.4g}]")
        lines += [f"  warning: {w}" for w in fit.warnings]
        h = fit.holdout
        if h is not None:
            if h.law is None:
                lines.append(f"leave-largest-budget-out: not possible ({h.reason})")
            else:
                lines.append(
                    f"leave-largest-budget-out ({', '.join(h.left_out_trials)}): fit on C <= {h.fit_compute_max:.3g} "
                    f"predicts {h.n_points} point(s) beyond with mean |rel. error| {h.mean_abs_rel_error:.1%} "
                    f"(max {h.max_abs_rel_error:.1%})"
                )
    for v, c in report.curves.items():
        lines.append(f"  size {v}: {c.law if c.law is not None else 'no fit: ' + c.reason}")
    for row in s.get("optimal_size", []):
        lines.append(f"  budget {row['compute']:.3g} FLOPs -> optimal size {row['variant']}")
    lines += [f"wrote {p}" for p in report.files.values()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestration.scaling", description=__doc__.split("\n")[0])
    p.add_argument("table", help="points table (Parquet) written by orchestration.sweep")
    p.add_argument("--out", required=True, help="directory for fit_<metric>.json and the PNG plots")
    p.add_argument("--metric", default="eval_error", choices=METRICS)
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples of trials")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drop-nonfinite", action="store_true", help="drop NaN/inf points (diverged trials)")
    args = p.parse_args(argv)
    try:
        report = analyze(read_points(args.table), args.out, metric=args.metric, n_boot=args.n_boot,
                         confidence=args.confidence, seed=args.seed, drop_nonfinite=args.drop_nonfinite)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
