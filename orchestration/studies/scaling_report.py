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
from orchestration.studies.plots import EXA, PFLOP_DAY, plot_error_vs_compute, plot_optimal_size
from orchestration.studies.sizes import SizeCurve, fit_per_size, optimal_sizes
from orchestration.studies.table import fitted_label, higher_is_better, metric_slug, points_from_table


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
    summary: dict[str, Any] = {"metric": metric, "fitted": fitted_label(metric), "n_points": len(pts),
                               "n_trials": len(set(pts.trial)), "variants": sorted(set(pts.variant))}
    fit: FrontierFit | None = None
    slug = metric_slug(metric)
    if not fit_law:
        files = {"error_vs_compute": plot_error_vs_compute(pts, None, out / f"scaling_{slug}.png")}
        files["fit"] = out / f"fit_{slug}.json"
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
    files = {"error_vs_compute": plot_error_vs_compute(pts, fit, out / f"scaling_{slug}.png", curves=curves)}
    if any(c.law is not None for c in curves.values()):
        grid = np.geomspace(float(pts.compute.min()), float(pts.compute.max()) * 10, 400)
        files["optimal_size"] = plot_optimal_size(curves, grid, out / f"optimal_size_{slug}.png")
        budgets = np.geomspace(grid[0], grid[-1], 9)
        summary["optimal_size"] = [
            {"compute": float(b), "exaflops": float(b) / EXA, "pflop_days": float(b) / PFLOP_DAY, "variant": v,
             "predicted": _predicted(fit, float(b), metric)}
            for b, v in zip(budgets, optimal_sizes(curves, budgets), strict=True)
        ]
    files["fit"] = out / f"fit_{slug}.json"
    files["fit"].write_text(json.dumps(summary, indent=2, default=_json_default))
    report = Report(fit, curves, files, summary)
    files["table"] = out / f"table_{slug}.md"
    files["table"].write_text(format_table(report))
    return report


def _predicted(fit: FrontierFit | None, compute: float, metric: str) -> float | None:
    """The frontier law's value of ``metric`` itself at ``compute`` (an accuracy, not its error)."""
    if fit is None:
        return None
    e = float(fit.law(np.array([compute]))[0])
    return 1.0 - e if higher_is_better(metric) else e


def format_table(report: Report) -> str:
    """The study as Markdown tables: the law with its intervals, the holdout check, and the
    compute-optimal size per budget (exaFLOPs and PFLOP-days, with the law's prediction)."""
    s, fit = report.summary, report.fit
    lines = [f"# Scaling study: {s['fitted']} vs pre-training compute", "",
             f"{s['n_trials']} trials, {s['n_points']} points, sizes {', '.join(s['variants'])}.", ""]
    if fit is None:
        lines += [f"No frontier fit: {s.get('error', 'not requested')}", ""]
    else:
        lines += [f"Law (C in FLOPs): `{fit.law}`, fitted on {len(fit.frontier)} frontier points, "
                  f"rmse(log) {fit.rmse_log:.3f}.", "", f"| parameter | value | {fit.confidence:.0%} CI |",
                  "|---|---|---|"]
        lines += [f"| {k} | {getattr(fit.law, k):.4g} | [{fit.ci[k][0]:.4g}, {fit.ci[k][1]:.4g}] |" for k in PARAM_NAMES]
        h = fit.holdout
        if h is not None and h.law is not None:
            lines += ["", f"Holdout (fit without {', '.join(h.left_out_trials)}, C <= {h.fit_compute_max / EXA:.3g} "
                          f"exaFLOPs): mean abs. relative error {h.mean_abs_rel_error:.1%} (max "
                          f"{h.max_abs_rel_error:.1%}) on {h.n_points} frontier point(s) beyond."]
        elif h is not None:
            lines += ["", f"Holdout: not possible ({h.reason})."]
        lines += [f"Warning: {w}" for w in fit.warnings]
    if s.get("optimal_size"):
        lines += ["", f"| budget (exaFLOPs) | budget (PFLOP-days) | compute-optimal size | law's {s['metric']} |",
                  "|---|---|---|---|"]
        for r in s["optimal_size"]:
            pred = "" if r["predicted"] is None else f"{r['predicted']:.4g}"
            lines.append(f"| {r['exaflops']:.3g} | {r['pflop_days']:.3g} | {r['variant']} | {pred} |")
    return "\n".join(lines) + "\n"


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
        lines.append(f"  budget {row['compute']:.3g} FLOPs ({row['exaflops']:.3g} exaFLOPs) -> optimal size "
                     f"{row['variant']}")
    lines += [f"wrote {p}" for p in report.files.values()]
    return "\n".join(lines)
