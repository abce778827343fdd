"""Plots of a study: error vs compute with the fitted frontier law, and the compute-optimal size."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from orchestration.studies.law import FrontierFit, frontier_of
from orchestration.studies.sizes import SizeCurve, measured_budgets, optimal_sizes
from orchestration.studies.table import Points, fitted_label

#: The x axis unit of the plots (the ViT paper plots pre-training exaFLOPs; 1 PFLOP-day = 86.4 exaFLOPs).
EXA = 1e18
PFLOP_DAY = 1e15 * 86400


def _compute_grid(points: Points, extend: float = 4.0, n: int = 200) -> np.ndarray:
    lo, hi = float(points.compute.min()), float(points.compute.max())
    return np.geomspace(lo / extend, hi * extend, n)


def _fmt_params(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def plot_error_vs_compute(
    points: Points, fit: FrontierFit | None, path: str | Path, *, title: str = "",
    curves: Mapping[str, SizeCurve] | None = None,
) -> Path:
    """Log-log metric (its error for accuracies) vs pre-training compute in exaFLOPs: each trial
    (colour = size), each size's fitted curve (one line per model size), the compute-efficient
    frontier, the frontier law and its band, and the fit without the largest budget."""
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
    rank = {v: i for i, v in enumerate(variants)}
    first = {str(t): str(v) for t, v in zip(points.trial, points.variant, strict=True)}
    for t in sorted(set(first), key=lambda t: (rank[first[t]], t)):  # legend in size order
        m = points.trial == t
        order = np.argsort(points.compute[m])
        v = str(points.variant[m][0])
        label = f"{v} ({_fmt_params(points.params[v])})" if v in points.params else v
        ax.plot(points.compute[m][order] / EXA, points.error[m][order], "o", ms=3, alpha=0.6,
                color=colors[v], label=None if v in seen else label)
        ax.plot(points.compute[m][order] / EXA, points.error[m][order], "-", lw=0.6, alpha=0.3, color=colors[v])
        seen.add(v)
    for v, c in (curves or {}).items():  # one line per model size: its own fitted curve
        if c.law is not None and v in colors:
            g = np.geomspace(*c.compute_range, 100)
            ax.plot(g / EXA, c.law(g), "-", lw=1.8, color=colors[v], alpha=0.9)
    if fit is not None:
        grid = _compute_grid(points)
        lo, hi = fit.band(grid)
        ax.fill_between(grid / EXA, lo, hi, color="tab:red", alpha=0.18,
                        label=f"{fit.confidence:.0%} bootstrap band")
        ax.plot(grid / EXA, fit.law(grid), color="tab:red", lw=2, label=f"fit (C in FLOPs): {fit.law}")
        ax.plot(fit.frontier.compute / EXA, fit.frontier.error, "s", color="black", ms=4, mfc="none",
                label="compute-efficient frontier")
        ax.axhline(fit.law.c, color="tab:red", ls=":", lw=1, label=f"saturation c = {fit.law.c:.3g}")
        h = fit.holdout
        if h is not None and h.law is not None:
            ax.plot(grid / EXA, h.law(grid), "--", color="gray", lw=1.2,
                    label=f"fit without largest budget: {h.mean_abs_rel_error:.1%} mean error beyond")
            ax.axvline(h.fit_compute_max / EXA, color="gray", ls=":", lw=0.8)
    else:
        front = frontier_of(points)
        ax.plot(front.compute / EXA, front.error, "s", color="black", ms=4, mfc="none",
                label="compute-efficient frontier")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Frame the measurements; a wild extrapolation of the band must not squash them.
    lo_e, hi_e = float(points.error.min()), float(points.error.max())
    ax.set_ylim(lo_e / 2.5, hi_e * 1.6)
    ax.set_xlabel("pre-training compute (exaFLOPs)")
    ax.set_ylabel(fitted_label(points.metric))
    ax.set_title(title or f"{fitted_label(points.metric)} vs pre-training compute: trials, per-size fits, "
                          "frontier and law", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_optimal_size(
    curves: Mapping[str, SizeCurve], compute: np.ndarray, path: str | Path, *, title: str = ""
) -> Path:
    """Compute-optimal model size (by parameter count where known) against budget
    (:func:`optimal_size_figure`), written to ``path``."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = optimal_size_figure(curves, compute, title=title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def optimal_size_figure(curves: Mapping[str, SizeCurve], compute: np.ndarray, *, title: str = "") -> Any:
    """The compute-optimal size plot as a matplotlib Figure.

    Solid where some size was measured at that budget, dashed where none was (the nearest
    measured size, an extrapolation); the legend sits below the axes, clear of every bar.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = optimal_sizes(curves, compute)
    ordered = [v for v in sorted(curves, key=lambda v: (curves[v].params or 0, v)) if curves[v].law is not None]
    use_params = all(curves[v].params for v in ordered)
    ypos = {v: float(curves[v].params) if use_params else float(i) for i, v in enumerate(ordered)}  # type: ignore[arg-type]
    y = np.array([ypos[v] for v in best])
    x = np.asarray(compute, dtype=float) / EXA
    measured = measured_budgets(curves, compute)
    fig, ax = plt.subplots(figsize=(9, 5))
    for v in ordered:  # where each size was measured
        ax.plot(np.asarray(curves[v].compute_range) / EXA, [ypos[v], ypos[v]], color="gray", alpha=0.35, lw=7,
                solid_capstyle="butt", label="measured compute range of the size" if v == ordered[0] else None)
    ax.step(x, np.where(measured, y, np.nan), where="post", color="tab:blue", lw=2, label="compute-optimal size")
    if not measured.all():  # budgets no size reached: the nearest measured size, dashed
        ax.step(x, np.where(measured, np.nan, y), where="post", color="tab:blue", lw=1.5, ls="--",
                label="no size measured there: the nearest one")
    ax.set_xscale("log")
    if use_params:
        ax.set_yscale("log")
        ax.minorticks_off()
    labels = [f"{v} ({_fmt_params(curves[v].params)})" if use_params else v for v in ordered]  # type: ignore[arg-type]
    ax.set_yticks([ypos[v] for v in ordered], labels, fontsize=8)
    ax.set_ylabel("model size")
    ax.set_xlabel("pre-training compute budget (exaFLOPs)")
    ax.set_title(title or "compute-optimal model size (lowest per-size fitted curve)")
    ax.grid(True, which="both", alpha=0.25)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))  # the bottom strip: the legend, below the axes and their labels
    return fig
