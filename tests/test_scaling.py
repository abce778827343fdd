"""orchestration.studies (table, law, report) and the orchestration.scaling CLI: the Zhai et al. law fit, frontier, bootstrap, per-size curves, plots.

Synthetic studies with a known truth. Stated tolerances (40 log-spaced points over four
decades of compute, 1% multiplicative noise): b within 6%, c within 8%, d within 25%, the
curve within 2.5% everywhere on the data's range (over 60 noise seeds the largest misses
were 4%, 6%, 15% and 1.7%). ``a`` is only checked to a factor 2: it is the curve's value
at C = 1 FLOP, so it moves as scale^b with any change in b.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from orchestration.scaling import main
from orchestration.studies.law import PowerLaw, fit_frontier, fit_power_law, frontier_indices
from orchestration.studies.scaling_report import analyze
from orchestration.studies.sizes import fit_per_size, optimal_size, optimal_sizes
from orchestration.studies.table import points_from_table, points_table, read_points, write_points

# E(1e12) = 0.9, E(1e16) ≈ 0.14: both the bend (d) and the saturation (c) are visible.
TRUE = PowerLaw(a=0.8 * (6e12) ** 0.4, b=0.4, c=0.1, d=5e12)


def _row(trial: str, variant: str, params: int, flops: float, err: float, step: int = 0) -> dict:
    return dict(study="s", trial=trial, variant=variant, params=params, steps=100, step=step,
                images=step * 32, flops=flops, eval_error=err, eval_loss=2 * err)


def on_law_study(seed: int, *, n_trials: int = 12, per_trial: int = 4, sigma: float = 0.01) -> pa.Table:
    """Trials whose points lie on TRUE (interleaved in compute) + dominated trials above it.

    Noise (1%) is below the law's improvement between neighbouring points, so the
    envelope is an unbiased sample of the law and the bootstrap can be judged on coverage.
    """
    rng = np.random.default_rng(seed)
    logc = np.linspace(12, 16, n_trials * per_trial)
    rows = []
    for k in range(n_trials):
        v = ["S", "M", "L"][k % 3]
        for j, c in enumerate(10 ** logc[k::n_trials]):
            rows.append(_row(f"t{k}", v, 10 ** (6 + k % 3), c, TRUE(c) * math.exp(rng.normal(0, sigma)), j))
    for k in range(6):  # wasted compute: 30% above the law, never on the frontier
        for j, c in enumerate(np.geomspace(2e12, 1e16, 6) * 10 ** rng.uniform(0, 0.3)):
            rows.append(_row(f"d{k}", "X", 10**5, c, 1.3 * TRUE(c) * math.exp(rng.normal(0, sigma)), j))
    return points_table(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_known_law_from_noisy_points(seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = np.geomspace(1e12, 1e16, 40)
    e = TRUE(c) * np.exp(rng.normal(0, 0.01, c.size))
    law = fit_power_law(c, e)
    assert law.b == pytest.approx(TRUE.b, rel=0.06)
    assert law.c == pytest.approx(TRUE.c, rel=0.08)
    assert law.d == pytest.approx(TRUE.d, rel=0.25)
    assert 1 / 2 < law.a / TRUE.a < 2
    assert np.max(np.abs(law(c) / TRUE(c) - 1)) < 0.025


def test_noiseless_fit_is_exact() -> None:
    c = np.geomspace(1e9, 1e15, 12)
    law = fit_power_law(c, TRUE(c))
    assert law.b == pytest.approx(TRUE.b, rel=1e-3)
    assert law.c == pytest.approx(TRUE.c, rel=1e-3)
    assert law.d == pytest.approx(TRUE.d, rel=1e-2)


def test_frontier_is_the_lower_envelope() -> None:
    c = np.array([1.0, 2.0, 2.0, 3.0, 4.0, 5.0])
    e = np.array([0.9, 0.8, 0.7, 0.75, 0.6, 0.6])
    # 0.8 at C=2 loses to 0.7 at the same C; 0.75 at C=3 is above 0.7 reached earlier;
    # 0.6 at C=5 is no better than 0.6 at C=4.
    assert frontier_indices(c, e).tolist() == [0, 2, 4]


def test_bootstrap_ci_covers_truth_and_frontier_skips_dominated_trials() -> None:
    # Across 12 seeds the 95% intervals covered each parameter in 83-92% of studies (percentile
    # bootstrap over 12+6 trials); seed 0 is one of the covering ones, and it is deterministic.
    pts = points_from_table(on_law_study(0))
    fit = fit_frontier(pts, n_boot=100, seed=0)
    assert not set(fit.frontier.trial) & {f"d{k}" for k in range(6)}
    assert len(fit.boot) >= 90
    for name in ("a", "b", "c", "d"):
        lo, hi = fit.ci[name]
        assert lo <= getattr(TRUE, name) <= hi, (name, lo, hi)
    assert fit.ci["b"][1] - fit.ci["b"][0] < 0.1  # and is informative, not [0, 4]
    lo, hi = fit.band(np.array([1e13, 1e15]))
    assert np.all(lo <= TRUE(np.array([1e13, 1e15]))) and np.all(TRUE(np.array([1e13, 1e15])) <= hi)
    h = fit.holdout
    assert h is not None and h.law is not None and h.n_points >= 1
    assert h.left_out_trials  # the largest-budget trial(s), removed entirely
    assert h.mean_abs_rel_error < 0.05  # the law extrapolates to the largest budget


def _per_size_truth() -> dict[str, tuple[int, PowerLaw]]:
    # Bigger models: each step costs more (larger d: slow start) but they saturate lower (c).
    out = {}
    for name, params, d, c in (("Ti", 10**6, 1e12, 0.30), ("S", 10**7, 1e13, 0.15), ("B", 10**8, 1e14, 0.04)):
        a = (0.9 - c) * (2 * d) ** 0.5
        out[name] = (params, PowerLaw(a=a, b=0.5, c=c, d=d))
    return out


def per_size_study(seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for name, (params, law) in _per_size_truth().items():
        for steps in (1, 2, 4):  # three training lengths per size, 6 eval points each
            cmax = law.d * 10 * steps
            for j, c in enumerate(np.geomspace(law.d / 4, cmax, 6)):
                rows.append(_row(f"{name}-{steps}", name, params, c, law(c) * math.exp(rng.normal(0, 0.01)), j))
    return points_table(rows)


def test_compute_optimal_size_picks_the_lowest_curve() -> None:
    pts = points_from_table(per_size_study())
    curves = fit_per_size(pts)
    assert list(curves) == ["Ti", "S", "B"]  # ordered by parameter count
    assert all(c.law is not None for c in curves.values())
    truth = _per_size_truth()
    budgets = np.geomspace(1e12, 1e16, 60)
    true_errs = np.stack([law(budgets) for _, law in truth.values()])  # (3, M)
    names = list(truth)
    # Only the sizes measured at a budget compete there (the nearest measured ones beyond every range).
    lo = np.log10([curves[n].compute_range[0] for n in names])[:, None]
    hi = np.log10([curves[n].compute_range[1] for n in names])[:, None]
    dist = np.maximum(lo - np.log10(budgets), 0) + np.maximum(np.log10(budgets) - hi, 0)
    true_errs = np.where(dist <= dist.min(axis=0) + 1e-9, true_errs, np.inf)
    true_best = [names[i] for i in np.argmin(true_errs, axis=0)]
    srt = np.sort(true_errs, axis=0)
    clear = srt[1] / srt[0] > 1.05  # away from cross-overs
    got = optimal_sizes(curves, budgets)
    assert [g for g, k in zip(got, clear, strict=True) if k] == [t for t, k in zip(true_best, clear, strict=True) if k]
    assert {"Ti", "S", "B"} <= set(np.array(true_best)[clear])  # every size wins somewhere
    assert optimal_size(curves, 2e12) == "Ti" and optimal_size(curves, 1e16) == "B"


# ---------------------------------------------------------------- degenerate input


def test_too_few_points_is_a_clear_error() -> None:
    c = np.geomspace(1e12, 1e14, 4)
    with pytest.raises(ValueError, match="need at least 5 points"):
        fit_power_law(c, TRUE(c))


def test_non_finite_losses_are_a_clear_error() -> None:
    c = np.geomspace(1e12, 1e14, 8)
    e = TRUE(c)
    e[3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fit_power_law(c, e)
    rows = [_row("t0", "S", 1, float(ci), float(ei), j) for j, (ci, ei) in enumerate(zip(c, e, strict=True))]
    rows += [_row("t1", "B", 2, float(ci) * 2, 0.5, j) for j, ci in enumerate(c)]
    with pytest.raises(ValueError, match=r"non-finite eval_error value\(s\) in trial\(s\) \['t0'\]"):
        points_from_table(points_table(rows))
    with pytest.warns(UserWarning, match="dropping 1"):
        assert len(points_from_table(points_table(rows), drop_nonfinite=True)) == 15


def test_one_model_size_is_a_clear_error() -> None:
    rows = [_row(f"t{k}", "S", 1, float(c), float(TRUE(c)), j)
            for k in range(3) for j, c in enumerate(np.geomspace(1e12, 1e15, 5) * (k + 1))]
    pts = points_from_table(points_table(rows))
    with pytest.raises(ValueError, match="needs several model sizes"):
        fit_frontier(pts, n_boot=5)
    assert fit_per_size(pts)["S"].law is not None  # a single size still gets its own curve


@pytest.mark.parametrize("bad", [0.0, -1e12, math.inf])
def test_non_positive_compute_is_a_clear_error(bad: float) -> None:
    c = np.geomspace(1e12, 1e14, 8)
    e = TRUE(c)
    c[2] = bad
    with pytest.raises(ValueError, match="compute must be finite and > 0"):
        fit_power_law(c, e)


def test_zero_error_suggests_loss() -> None:
    c = np.geomspace(1e12, 1e14, 8)
    e = TRUE(c)
    e[-1] = 0.0
    with pytest.raises(ValueError, match="fit eval_loss instead"):
        fit_power_law(c, e)


def test_unknown_metric_and_unknown_field() -> None:
    with pytest.raises(ValueError, match="unknown point field"):
        points_table([{"trial": "t", "flop": 1.0}])
    with pytest.raises(ValueError, match="metric 'top1'"):
        points_from_table(on_law_study(0), "top1")


# ---------------------------------------------------------------- end to end


def test_analyze_writes_plots_and_json_and_cli_refits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = per_size_study()
    path = write_points(table, tmp_path / "points.parquet")
    assert read_points(path).num_rows == table.num_rows
    report = analyze(read_points(path), tmp_path / "a", n_boot=20)
    for key in ("error_vs_compute", "optimal_size", "fit"):
        assert report.files[key].exists() and report.files[key].stat().st_size > 0
    assert report.files["error_vs_compute"].read_bytes()[:4] == b"\x89PNG"
    summary = json.loads(report.files["fit"].read_text())
    assert summary["frontier_fit"]["n_boot"] > 0 and set(summary["per_size"]) == {"Ti", "S", "B"}
    assert summary["optimal_size"][-1]["variant"] == "B"

    assert main([str(path), "--out", str(tmp_path / "cli"), "--metric", "eval_loss", "--n-boot", "10"]) == 0
    out = capsys.readouterr().out
    assert "frontier fit" in out and "leave-largest-budget-out" in out
    assert (tmp_path / "cli" / "scaling_eval_loss.png").exists()
    assert (tmp_path / "cli" / "optimal_size_eval_loss.png").exists()


def test_analyze_without_law_only_plots(tmp_path: Path) -> None:
    report = analyze(per_size_study(), tmp_path, fit_law=False)
    assert report.fit is None and report.curves == {}
    assert report.files["error_vs_compute"].exists() and "frontier_fit" not in report.summary


def test_analyze_non_strict_still_plots_one_size(tmp_path: Path) -> None:
    rows = [_row("t0", "S", 1, float(c), float(TRUE(c)), j) for j, c in enumerate(np.geomspace(1e12, 1e15, 6))]
    report = analyze(points_table(rows), tmp_path, n_boot=5, strict=False)
    assert report.fit is None and "several model sizes" in report.summary["error"]
    assert report.files["error_vs_compute"].exists()
    with pytest.raises(ValueError, match="several model sizes"):
        analyze(points_table(rows), tmp_path, n_boot=5)
