"""Points: what every evaluation of every trial contributes to the study table, and the trial's
sink that reports them to Tune (and MLflow)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from orchestration.studies.table import POINTS_SCHEMA, is_logged_metric, points_table

log = logging.getLogger(__name__)


#: Points-table identity columns reported with every Tune result (the rest are measurements).
POINT_FIELDS = tuple(POINTS_SCHEMA.names)


@dataclass(frozen=True, kw_only=True)
class TrialInfo:
    """Identity of one trial, repeated on each of its points."""

    study: str
    trial: str
    variant: str
    params: int
    steps: int
    samples: int | None
    seed: int
    lr: float
    weight_decay: float


def make_point(info: TrialInfo, *, step: int, global_batch: int, flops_per_image: float,
               eval_metrics: Mapping[str, float], extra: Sequence[str] = ()) -> dict[str, Any]:
    """One row of the points table from an evaluation at ``step``.

    images = step × global_batch (every optimizer step consumes one global batch);
    flops = train_flops_per_image × images (forward + backward ≈ 3 forwards, 2 FLOPs/MAC);
    eval_error = 1 − top-1 (1 − precision@1 for sigmoid/multi-label runs; NaN for an objective
    without a top-1, such as MAE, whose studies fit eval_loss or a few-shot accuracy); ``extra``: logged
    metrics (``fewshot/<ds>/10shot``) to carry as columns (NaN when not logged at this step).
    """
    top1 = eval_metrics.get("eval_top1", eval_metrics.get("eval_prec1", math.nan))
    images = int(step) * int(global_batch)
    logged = {k: float(eval_metrics.get(k, math.nan)) for k in extra}
    return {
        **dataclasses.asdict(info),
        "step": int(step),
        "images": images,
        "flops": float(flops_per_image) * images,
        "eval_loss": float(eval_metrics.get("eval_loss", math.nan)),
        "eval_error": 1.0 - float(top1),
        **logged,  # e.g. fewshot/<ds>/<K>shot logged at this step: a column of the study table
    }


def points_from_rows(rows: Iterable[Mapping[str, Any]], metrics: Sequence[str] = ()) -> pa.Table:
    """Study table from reported results (Tune result rows, or ``make_point`` dicts).

    Keeps rows that carry a point (have ``trial`` and ``eval_loss`` or one of the logged
    ``metrics``), drops Tune's own columns (the logged ``metrics`` are kept as columns), and
    keeps the last report of each (trial, step): a trial that was restarted from scratch (its
    checkpoints gone) re-reports its steps and the newest run wins. Rows are sorted by trial,
    then step.
    """
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    logged = [m for m in metrics if is_logged_metric(m)]
    for row in rows:
        if row.get("trial") is None or row.get("step") is None:
            continue
        if row.get("eval_loss") is None and all(_plain_float(row.get(m)) is None for m in logged):
            continue
        point = {k: _plain(k, row.get(k)) for k in POINT_FIELDS}
        point.update({m: _plain_float(row.get(m)) for m in logged})
        latest[(str(point["trial"]), int(point["step"]))] = point
    ordered = [latest[k] for k in sorted(latest)]
    return points_table(ordered)


def _plain_float(v: Any) -> float | None:
    if hasattr(v, "item"):
        v = v.item()
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _plain(name: str, v: Any) -> Any:
    """A reported value coerced to its schema column type; NaN/None (pandas fills) -> null."""
    if hasattr(v, "item"):
        v = v.item()
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    t = POINTS_SCHEMA.field(name).type
    if pa.types.is_integer(t):
        return int(v)
    if pa.types.is_floating(t):
        return float(v)
    return str(v)


class StudySink:
    """The trial's ``MetricsSink``: forwards everything to ``inner`` (MLflow) and turns each
    evaluation into a point that goes to ``report`` (``ray.tune.report`` in a trial).

    ``metric``: the study's metric. A built-in one (``eval_error``/``eval_loss``) makes a point at
    every evaluation; a logged one (``fewshot/<ds>/10shot``) at every step that logs it (the
    Trainer runs few-shot after its eval at the same step, so the point has both).
    """

    def __init__(
        self,
        info: TrialInfo,
        *,
        global_batch: int,
        flops_per_image: float,
        report: Callable[[dict[str, Any]], None],
        inner: Any | None = None,
        persist: Callable[[list[dict[str, Any]]], None] | None = None,
        metric: str = "eval_error",
    ) -> None:
        from training import NullSink

        # A logged metric (fewshot/...) makes its own points; the built-in ones come with eval.
        self.trigger = metric if is_logged_metric(metric) else "eval_loss"
        self.extra = (metric,) if is_logged_metric(metric) else ()
        self._step_metrics: tuple[int, dict[str, float]] = (-1, {})
        self.info = info
        self.persist = persist
        self.global_batch = global_batch
        self.flops_per_image = flops_per_image
        self.report = report
        self.inner = inner if inner is not None else NullSink()
        self.points: list[dict[str, Any]] = []

    def log_params(self, params: dict[str, Any]) -> None:
        self.inner.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.inner.log_metrics(metrics, step)
        seen_step, seen = self._step_metrics
        seen = {**(seen if seen_step == step else {}), **metrics}  # everything logged at this step
        self._step_metrics = (step, seen)
        if self.trigger not in metrics:
            return
        point = make_point(self.info, step=step, global_batch=self.global_batch,
                           flops_per_image=self.flops_per_image, eval_metrics=seen, extra=self.extra)
        self.points.append(point)
        if self.persist is not None:
            self.persist(self.points)
        self.inner.log_metrics({"images": point["images"], "flops": point["flops"],
                                "eval_error": point["eval_error"]}, step)
        self.report(point)

    def replay(self, points: Sequence[Mapping[str, Any]], upto_step: int) -> None:
        """Re-report the points a resumed trial made before its checkpoint at ``upto_step``.

        A restored Tune trial without a Tune checkpoint starts a fresh result history, so
        the points from before the interruption would be lost from the study table.
        MLflow already has them; they only go to ``report``.
        """
        for p in points:
            if int(p["step"]) <= upto_step:
                self.points.append(dict(p))
                self.report(dict(p))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.inner.log_artifact(local_path, artifact_path)

    def on_eval(self, model: Any, step: int) -> None:
        self.inner.on_eval(model, step)

    def close(self) -> None:
        self.inner.close()


def best_hparams(table: pa.Table) -> dict[str, dict[str, float]]:
    """Per size: lr / weight decay of the trial with the lowest eval loss at its final step.

    Only trials that reached the longest step count compete (ASHA stops the others early).
    """
    rows = table.to_pylist()
    final: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["step"] == r["steps"] and r["eval_loss"] is not None and math.isfinite(r["eval_loss"]):
            cur = final.get(r["variant"])
            if cur is None or r["eval_loss"] < cur["eval_loss"]:
                final[r["variant"]] = r
    return {v: {"lr": r["lr"], "weight_decay": r["weight_decay"], "eval_loss": r["eval_loss"],
                "eval_error": r["eval_error"], "trial": r["trial"]} for v, r in sorted(final.items())}
