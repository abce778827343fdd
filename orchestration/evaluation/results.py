"""One report format for downstream evaluations: few-shot linear, linear probe, fine-tune.

A report is a list of rows, one per (method, dataset, setting, metric), the way the ViT paper
tabulates transfer results (e.g. "10-shot ImageNet top-1", "fine-tuned CIFAR-100 top-1"), so a
few-shot run, a linear probe and a fine-tune sit in one table and compare row by row.

``row.key`` is the MLflow metric name: ``fewshot/<dataset>/10shot`` for the few-shot top-1
(the name the issue and big_vision's ``fewshot_lsr`` use), ``<method>/<dataset>/<setting>/<metric>``
for any other metric.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_FORMAT = "vitscale-eval-report"
REPORT_VERSION = 1
#: The metric whose key omits the metric name (``fewshot/<ds>/<k>shot`` is a top-1 accuracy).
DEFAULT_METRIC = "top1"


@dataclass(frozen=True, kw_only=True)
class ResultRow:
    """One number of a report.

    ``method``: ``fewshot`` | ``linear_probe`` | ``finetune`` (any name works);
    ``setting``: ``10shot`` for few-shot, ``full`` (or a fraction) for probes and fine-tunes;
    ``details``: what produced the number (chosen regulariser, seed, support-set digest, ...).
    """

    method: str
    dataset: str
    setting: str
    metric: str = DEFAULT_METRIC
    value: float
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("method", "dataset", "setting", "metric"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v or "/" in v:
                raise ValueError(f"ResultRow.{name}={v!r} must be a non-empty name without '/'")
        if not isinstance(self.value, int | float) or not math.isfinite(self.value):
            raise ValueError(f"ResultRow.value={self.value!r} must be a finite number")

    @property
    def key(self) -> str:
        """The metric name under which the row is logged (MLflow, sweep ``--metric``)."""
        base = f"{self.method}/{self.dataset}/{self.setting}"
        return base if self.metric == DEFAULT_METRIC else f"{base}/{self.metric}"


@dataclass(frozen=True, kw_only=True)
class EvalReport:
    """The rows of one evaluation of one model, plus where the model came from."""

    model: str
    rows: tuple[ResultRow, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """``{row.key: value}``: what to log to MLflow / print."""
        return {r.key: float(r.value) for r in self.rows}

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "version": REPORT_VERSION, "model": self.model, "info": self.info,
                "rows": [dataclasses.asdict(r) for r in self.rows]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        if data.get("format") != REPORT_FORMAT or data.get("version") != REPORT_VERSION:
            raise ValueError(f"not a {REPORT_FORMAT} v{REPORT_VERSION} report (format {data.get('format')!r}, "
                             f"version {data.get('version')!r})")
        return cls(model=data["model"], info=dict(data.get("info", {})),
                   rows=tuple(ResultRow(**r) for r in data["rows"]))

    @classmethod
    def read(cls, path: str | Path) -> EvalReport:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def merged(self, other: EvalReport) -> EvalReport:
        """This report plus ``other``'s rows (e.g. few-shot + fine-tune of the same model)."""
        return dataclasses.replace(self, rows=self.rows + other.rows, info={**self.info, **other.info})
