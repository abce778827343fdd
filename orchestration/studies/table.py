"""The study's points table: one row per evaluation of one trial (``POINTS_SCHEMA``), and the
``Points`` arrays a scaling-law fit reads from it."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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


#: The built-in metric columns; any other logged metric with a namespace (``fewshot/<ds>/10shot``,
#: ``linear_probe/<ds>/full``) can be a column too (:func:`is_logged_metric`).
METRICS = ("eval_error", "eval_loss")
#: Metric names (or their last component) that are accuracies: the law is fitted to 1 - value.
_HIGHER_BETTER = re.compile(r"(^(fewshot|linear_probe|finetune)/)|(^|[/_])(top1|top5|prec1|acc|accuracy)$|/\d+shot$")


def is_logged_metric(name: str) -> bool:
    """A namespaced metric name (``fewshot/digits/10shot``): a points-table column beyond the schema."""
    parts = name.split("/")
    return len(parts) >= 2 and all(parts) and name not in POINTS_SCHEMA.names


def higher_is_better(metric: str) -> bool:
    """Accuracy-type metrics (few-shot, probe, fine-tune top-1, ``*top1``): the study fits their
    error ``1 - value``, the way the paper's scaling plots read them."""
    return bool(_HIGHER_BETTER.search(metric))


def fitted_label(metric: str) -> str:
    """What the fit and the plot's y axis show for ``metric``."""
    return f"1 - {metric} (error)" if higher_is_better(metric) else metric


def metric_slug(metric: str) -> str:
    """``fewshot/digits/10shot`` -> ``fewshot_digits_10shot`` (file names)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", metric)


def _schema(extra: Iterable[str]) -> pa.Schema:
    return pa.schema([*POINTS_SCHEMA, *(pa.field(n, pa.float64()) for n in sorted(set(extra)))])


def points_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts keyed by ``POINTS_SCHEMA`` names, plus any logged metrics) -> a typed Arrow table.

    Missing optional fields (``samples``, ``lr``, ...) become nulls; a logged metric
    (:func:`is_logged_metric`) becomes a float column; any other unknown key is an error so
    that a typo in the sweep does not silently drop a column.
    """
    rows = list(rows)
    names = set(POINTS_SCHEMA.names)
    extra: set[str] = set()
    for row in rows:
        unknown = {k for k in set(row) - names if not is_logged_metric(k)}
        if unknown:
            raise ValueError(f"unknown point field(s) {sorted(unknown)}; known: {POINTS_SCHEMA.names} and "
                             "namespaced logged metrics such as fewshot/<dataset>/10shot")
        extra |= set(row) - names
    schema = _schema(extra)
    columns = {n: [row.get(n) for row in rows] for n in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def write_points(table: pa.Table, path: str | Path) -> Path:
    """Write the points table as Parquet (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = [n for n in table.column_names if n not in POINTS_SCHEMA.names]
    pq.write_table(table.select([*POINTS_SCHEMA.names, *sorted(extra)]).cast(_schema(extra)), path)
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
    error: np.ndarray  # (N,) float, the fitted metric (1 - value for accuracies: higher_is_better)
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
        have = [n for n in table.column_names if n in METRICS or is_logged_metric(n)]
        raise ValueError(f"metric {metric!r} is not a column of the table; choose one of {have} (a logged "
                         "metric is a column when the study's trials logged it, e.g. --fewshot-data for fewshot/...)")
    trial = np.asarray(table.column("trial").to_pylist(), dtype=object).astype(str)
    variant = np.asarray(table.column("variant").to_pylist(), dtype=object).astype(str)
    compute = np.asarray(table.column("flops").to_numpy(zero_copy_only=False), dtype=float)
    error = np.asarray(
        [np.nan if v is None else v for v in table.column(metric).to_pylist()], dtype=float
    )
    if higher_is_better(metric):  # an accuracy: fit its error, which falls with compute like eval error
        error = 1.0 - error
    bad = ~np.isfinite(error)
    if len(error) and bad.all():  # not a diverged trial: the study never measured it (MAE: no top-1)
        have = [n for n in table.column_names if (n in METRICS or is_logged_metric(n)) and n != metric
                and any(v is not None and math.isfinite(v) for v in table.column(n).to_pylist())]
        raise ValueError(f"metric {metric!r} has no value in any point of this table (an MAE study's trials have "
                         f"no top-1, so no eval_error); choose one it has: {have}")
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
    check_compute(pts.compute)
    return pts


def check_compute(compute: np.ndarray) -> None:
    if not np.all(np.isfinite(compute)) or np.any(compute <= 0):
        n = int(np.sum(~np.isfinite(compute) | (compute <= 0)))
        raise ValueError(f"compute must be finite and > 0 (training FLOPs); {n} point(s) are not")
