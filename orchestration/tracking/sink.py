"""The rank-0 ``MetricsSink`` that writes to one MLflow run.

:class:`MLflowSink` talks to one run by id through :class:`mlflow.MlflowClient` (no global
"active run"), so the driver creates the run and any Ray worker - including a restarted one -
keeps appending to it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, RunTag

if TYPE_CHECKING:
    pass
from orchestration.tracking.redact import redact, redact_text
from orchestration.tracking.runs import client, resolve_uri

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000  # MLflow's param value limit
#: Where an MAE's or a tokenizer's per-eval figures go: ``reconstruction/step_<N>/reconstruction.png``.
RECONSTRUCTION_FOLDER = "reconstruction"


class MLflowSink:
    """``training.metrics.MetricsSink`` that writes to one existing MLflow run (rank 0 only).

    Metrics are buffered and flushed with ``log_batch`` (one sqlite transaction per log
    interval, not one per value). ``on_eval`` gets the whole trained module: for a classifier it
    renders [CLS] attention maps of the first probe image (``attention/step_<N>/``); for an MAE
    (a ``model.mae.MaskedAutoencoder``) the reconstructions of every probe image under masks of
    ``probe_mask`` drawn from a fixed seed (``reconstruction/step_<N>/reconstruction.png``); for a
    dVAE tokenizer the reconstructions from its tokens and its codebook usage over the eval split
    (``reconstruction/step_<N>/{reconstruction,codebook_usage}.png``).
    ``probe_norm`` is the (mean, std) the probe images were normalised with, to draw them. System
    metrics (CPU, memory, GPU) are sampled by MLflow's monitor thread when ``system_metrics`` is
    True and psutil exists.
    """

    def __init__(
        self,
        run_id: str,
        *,
        uri: str | None = None,
        attention_images: Any | None = None,
        probe_norm: tuple[Sequence[float], Sequence[float]] | None = None,
        probe_mask: Any | None = None,
        system_metrics: bool = True,
        system_metrics_interval_s: float = 10.0,
    ) -> None:
        self.run_id = run_id
        self.uri = resolve_uri(uri)
        self.client = client(self.uri)
        self.attention_images = attention_images  # (B, 3, S, S) tensor or None
        self.probe_norm = probe_norm
        self.probe_mask = probe_mask  # pipeline.masking.MaskConfig of the reconstructions, or None
        self._buffer: list[Metric] = []
        self._monitor = None
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(
                    run_id,
                    sampling_interval=system_metrics_interval_s,
                    resume_logging=True,
                    tracking_uri=self.uri,
                )
                self._monitor.start()
            except Exception as e:  # noqa: BLE001 - psutil/pynvml missing is not an error
                log.info("system metrics disabled: %s", e)
                self._monitor = None

    # MetricsSink protocol -------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (redacted, stringified) params; values longer than MLflow's limit are truncated.

        Params already logged with the same value are skipped (a restarted worker re-logs them).
        """
        existing = self.client.get_run(self.run_id).data.params
        clean = {k: v[:_MAX_PARAM_LEN] for k, v in redact(params).items()}
        fresh = [Param(k, v) for k, v in clean.items() if existing.get(k) is None]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i : i + 100])
        # Params are immutable in MLflow; a changed value (e.g. after a resume) becomes a tag.
        changed = {f"param_override.{k}": v for k, v in clean.items() if existing.get(k) not in (None, v)}
        if changed:
            self.set_tags(changed)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer finite metrics at ``step`` and flush them in one batch."""
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                self._buffer.append(Metric(_metric_key(key), v, now, int(step)))
        self.flush()

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Upload a file or directory to the run's artifacts."""
        if Path(local_path).is_dir():
            self.client.log_artifacts(self.run_id, local_path, artifact_path)
        else:
            self.client.log_artifact(self.run_id, local_path, artifact_path)

    def on_eval(self, model: Any, step: int) -> None:
        """Log the figures of the fixed probe images at this eval step (best effort): attention
        maps of a classifier, reconstructions of an MAE."""
        if self.attention_images is None:
            return
        from model.mae import MaskedAutoencoder
        from model.tokenizer import DiscreteVAE

        module = _unwrap(model)
        what = "reconstructions" if isinstance(module, (MaskedAutoencoder, DiscreteVAE)) else "attention maps"
        try:
            with tempfile.TemporaryDirectory() as tmp:
                if isinstance(module, DiscreteVAE):
                    self._tokenizer_figures(module, step, Path(tmp))
                    self.client.log_artifacts(self.run_id, tmp, f"{RECONSTRUCTION_FOLDER}/step_{step:07d}")
                elif isinstance(module, MaskedAutoencoder):
                    self._reconstructions(module, step, Path(tmp))
                    self.client.log_artifacts(self.run_id, tmp, f"{RECONSTRUCTION_FOLDER}/step_{step:07d}")
                else:
                    from orchestration.tracking.attention_figures import attention_figures

                    kw = dict(zip(("mean", "std"), self.probe_norm, strict=True)) if self.probe_norm else {}
                    attention_figures(module, self.attention_images, Path(tmp), max_images=1, **kw)
                    self.client.log_artifacts(self.run_id, tmp, f"attention/step_{step:07d}")
        except Exception as e:  # noqa: BLE001 - a plot must never kill a training run
            log.warning("%s at step %d failed: %s", what, step, redact_text(str(e)))

    def _reconstructions(self, mae: Any, step: int, out: Path) -> Path:
        from orchestration.tracking.attention_figures import DEFAULT_MEAN, DEFAULT_STD
        from orchestration.tracking.reconstruction_figures import reconstruction_figure
        from pipeline.masking import MaskConfig

        mask = self.probe_mask or MaskConfig(kind="random", ratio=0.75, patch_size=mae.patch_size)
        mean, std = self.probe_norm or (DEFAULT_MEAN, DEFAULT_STD)
        return reconstruction_figure(mae, self.attention_images, out / "reconstruction.png", mask=mask, mean=mean,
                                     std=std, title=f"MAE reconstructions at step {step}")

    def _tokenizer_figures(self, dvae: Any, step: int, out: Path) -> None:
        from orchestration.tracking.attention_figures import DEFAULT_MEAN, DEFAULT_STD
        from orchestration.tracking.tokenizer_figures import reconstruction_figure, usage_figure

        mean, std = self.probe_norm or (DEFAULT_MEAN, DEFAULT_STD)
        reconstruction_figure(dvae, self.attention_images, out / "reconstruction.png", mean=mean, std=std,
                              title=f"dVAE reconstructions from tokens at step {step}")
        if dvae.usage_counts is not None:  # the counts of this evaluation (training.objectives.dvae)
            usage_figure(dvae.usage_counts, out / "codebook_usage.png", title=f"step {step}")

    def close(self) -> None:
        """Flush metrics and stop the system-metrics thread. Does not end the run (the driver does)."""
        self.flush()
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:  # noqa: BLE001
                pass
            self._monitor = None

    # Extras -----------------------------------------------------------------------------------
    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:900], self._buffer[900:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, v[:_MAX_PARAM_LEN]) for k, v in redact(tags).items()]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Log a JSON document (redacted) as an artifact file."""
        text = redact_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(text)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(str(path), None if parent in ("", ".") else parent)


def _metric_key(key: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / ; map anything else to "_".
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(key))


def _unwrap(model: Any) -> Any:
    """The nn.Module inside a DeepSpeed engine / DDP wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return model


def log_params_once(run_id: str, params: Mapping[str, Any], uri: str | None = None) -> None:
    """Driver-side params logging (same rules as :meth:`MLflowSink.log_params`)."""
    sink = MLflowSink(run_id, uri=uri, system_metrics=False)
    sink.log_params(params)
