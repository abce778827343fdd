"""A study's analysis: fit, holdout check, per-size curves, plots and ``fit_<metric>.json``, and the
text report (``python -m orchestration.scaling`` prints it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from orchestration.studies.law import (
    PARAM_NAMES,
    FrontierFit,
    fit_frontier,
)
from orchestration.studies.plots import plot_error_vs_compute, plot_optimal_size
from orchestration.studies.sizes import SizeCurve, fit_per_size, optimal_sizes
from orchestration.studies.table import points_from_table


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
