"""Scaling studies on any logged metric (issue #16): few-shot accuracy as the y axis.

A trial's sink makes a point whenever the study's metric is logged (few-shot runs after the
Trainer's eval at the same step, so the point has both), the points table carries the metric
as a column, accuracies are fitted as their error (1 - accuracy), and the report has the
paper's view: exaFLOPs on the x axis, one line per size, the frontier law with its band, and
a table with the fit, its holdout error and the compute-optimal size per budget.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from orchestration.studies.law import PowerLaw
from orchestration.studies.points import StudySink, TrialInfo, points_from_rows
from orchestration.studies.scaling_report import analyze
from orchestration.studies.spec import StudySpec, trial_overrides
from orchestration.studies.table import (
    higher_is_better,
    points_from_table,
    points_table,
    read_points,
    write_points,
)

FEW = "fewshot/digits/10shot"
INFO = TrialInfo(study="t", trial="mu4_s100_nall_seed0", variant="mu/4", params=1234, steps=100, samples=None,
                 seed=0, lr=1e-3, weight_decay=0.05)


def test_sink_makes_a_point_per_fewshot_evaluation_with_that_steps_eval_metrics() -> None:
    reported: list[dict] = []
    sink = StudySink(INFO, global_batch=32, flops_per_image=1e6, report=reported.append, metric=FEW)
    sink.log_metrics({"loss": 2.0, "data/bad_samples": 0.0}, 10)
    sink.log_metrics({"eval_loss": 1.5, "eval_top1": 0.4}, 10)
    assert reported == []  # an eval alone is not a point of a few-shot study
    sink.log_metrics({FEW: 0.55, "fewshot/digits/1shot": 0.3, "fewshot/seconds": 2.0}, 10)
    sink.log_metrics({FEW: 0.7}, 20)  # a few-shot run without an eval at that step
    assert [p["step"] for p in reported] == [10, 20]
    first, second = reported
    assert first[FEW] == 0.55 and first["eval_loss"] == 1.5 and first["eval_error"] == pytest.approx(0.6)
    assert first["flops"] == 1e6 * 10 * 32
    assert "fewshot/seconds" not in first and "data/bad_samples" not in first  # only the study's metric
    assert second[FEW] == 0.7 and math.isnan(second["eval_loss"])  # nothing stale from step 10
    # Tune rows -> the study table: the metric is a column, Tune's own keys are not.
    rows = [{**p, "config/lr": 1e-3, "time_total_s": 1.0} for p in reported]
    table = points_from_rows(rows, (FEW,))
    assert table.column(FEW).to_pylist() == [0.55, 0.7]
    assert "config/lr" not in table.column_names
    # The default (eval_error) study is unchanged: a point per eval, no extra column.
    plain: list[dict] = []
    StudySink(INFO, global_batch=32, flops_per_image=1e6, report=plain.append).log_metrics(
        {"eval_loss": 1.5, "eval_top1": 0.4}, 10)
    assert len(plain) == 1 and FEW not in points_from_rows(plain).column_names


def _accuracy_study(seed: int = 0):  # noqa: ANN202 - a pyarrow Table
    """Three sizes x three lengths whose few-shot ERROR follows per-size saturating laws."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, params, d, c in (("mu", 10**5, 1e12, 0.45), ("Ti", 10**6, 1e13, 0.25), ("S", 10**7, 1e14, 0.1)):
        law = PowerLaw(a=(0.85 - c) * (2 * d) ** 0.5, b=0.5, c=c, d=d)
        for steps in (1, 2, 4):
            for j, comp in enumerate(np.geomspace(d, d * 10 * steps, 6)):  # error 0.85 at the start
                acc = 1.0 - law(comp) * math.exp(rng.normal(0, 0.01))
                rows.append(dict(study="s", trial=f"{name}-{steps}", variant=name, params=params, steps=100,
                                 step=j, images=j * 32, flops=comp, eval_error=math.nan, eval_loss=math.nan,
                                 **{FEW: acc}))
    return points_table(rows)


def test_accuracy_metric_is_fitted_as_its_error_and_reported_like_the_paper(tmp_path: Path) -> None:
    assert higher_is_better(FEW) and higher_is_better("eval_top1") and not higher_is_better("eval_loss")
    table = read_points(write_points(_accuracy_study(), tmp_path / "points.parquet"))  # the column survives
    pts = points_from_table(table, FEW)
    assert np.all((pts.error > 0) & (pts.error < 1))
    assert np.allclose(pts.error, 1.0 - np.asarray(table.column(FEW).to_pylist()))
    rep = analyze(table, tmp_path / "out", metric=FEW, n_boot=20)
    assert rep.fit is not None and 0.0 <= rep.fit.law.c < 0.2  # S saturates at error 0.1 (accuracy 0.9)
    assert set(rep.curves) == {"mu", "Ti", "S"} and all(c.law is not None for c in rep.curves.values())
    files = {k: Path(v).name for k, v in rep.files.items()}
    assert files["error_vs_compute"] == "scaling_fewshot_digits_10shot.png"
    assert files["table"] == "table_fewshot_digits_10shot.md"
    assert all(Path(p).stat().st_size > 0 for p in rep.files.values())
    budgets = rep.summary["optimal_size"]
    assert budgets[0]["variant"] == "mu" and budgets[-1]["variant"] == "S"  # bigger models at bigger budgets
    preds = [b["predicted"] for b in budgets]
    assert all(0 < p < 1 for p in preds) and preds == sorted(preds)  # accuracies, rising with compute
    assert budgets[0]["exaflops"] == pytest.approx(budgets[0]["compute"] / 1e18)
    assert budgets[0]["pflop_days"] == pytest.approx(budgets[0]["compute"] / (1e15 * 86400))
    md = (tmp_path / "out" / files["table"]).read_text()
    assert "1 - fewshot/digits/10shot (error)" in md and "Holdout" in md and "mean abs. relative error" in md
    assert "| budget (exaFLOPs) | budget (PFLOP-days) | compute-optimal size |" in md
    assert json.loads((tmp_path / "out" / "fit_fewshot_digits_10shot.json").read_text())["fitted"].startswith("1 - ")
    with pytest.raises(ValueError, match=r"'fewshot/other/10shot' is not a column.*fewshot/digits/10shot"):
        points_from_table(table, "fewshot/other/10shot")


def _spec(*sets: str, metric: str) -> StudySpec:
    return StudySpec(name="t", overrides=("data.source.url=/data", "image_size=32", *sets), variants=("mu", "Ti"),
                     steps=(100, 200), metric=metric)


def test_study_metric_must_be_logged_by_the_trials() -> None:
    with pytest.raises(ValueError, match="the trials run no few-shot evaluation; add --fewshot-data"):
        _spec(metric=FEW)
    with pytest.raises(ValueError, match=r"not logged by the trials; choose one of \['fewshot/digits/1shot'"):
        _spec("eval.fewshot_data=digits=/down", metric="fewshot/cifar/10shot")
    with pytest.raises(ValueError, match="metric 'nope'"):
        _spec(metric="nope")
    spec = _spec("eval.fewshot_data=digits=/down", metric=FEW)
    items = trial_overrides(spec, variant="mu", steps=100, samples=None, seed=0)
    assert "eval.fewshot_every=25" in items and "train.eval_every=25" in items  # few-shot at every evaluation
    assert "eval.fewshot_every=25" not in trial_overrides(_spec(metric="eval_error"), variant="mu", steps=100,
                                                     samples=None, seed=0)
