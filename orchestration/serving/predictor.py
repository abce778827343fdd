"""Encoded images -> top-k classes and probabilities (and the pre-logit embedding), one model.

The one place a served model turns bytes into answers: the pyfunc (``mlflow models serve``), the
Ray Serve deployment, the batch predictor and ``bench/serve.py`` all call :class:`Predictor`.
Pixels go through the loader's own eval path (``pipeline.decode.decode_eval`` + the
``to_float_batch`` normalisation) with the values recorded in ``serving.json``, so a served
prediction equals the evaluation's forward pass on the same image.

A request only ever carries image *bytes*: a string (a URL, a path) is refused as a bad row,
never fetched or opened.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.tokenizer import ImageTokenizer
from orchestration.serving.spec import SERVING_FILE, ServingSpec
from pipeline.decode import BadSample, decode_eval
from pipeline.transforms import affine_for

if TYPE_CHECKING:
    from model import VisionTransformer


_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class RowError:
    """Why row ``row`` of a request could not be predicted (``reason``: a short key)."""

    row: int
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"row {self.row}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


class BadRequest(ValueError):
    """A request the model cannot answer as a whole; ``errors`` names every bad row (servers: 4xx)."""

    def __init__(self, message: str, errors: Sequence[RowError] = ()) -> None:
        super().__init__(message)
        self.errors = list(errors)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Predictor:
    """A loaded model and its :class:`ServingSpec`.

    ``batch_size``: images per forward pass; ``decode_threads``: images decoded at once (PIL
    releases the GIL while decoding).
    """

    def __init__(self, model: VisionTransformer, spec: ServingSpec, *, device: str | None = None,
                 batch_size: int = 32, decode_threads: int | None = None, where: str = "model") -> None:
        spec.check_model(model.cfg, where)
        # A registered tokenizer (BEiT's dVAE) has no features or head: it answers with the visual
        # token of every patch (row-major), what BEiT pre-training predicts.
        self.tokenizer = isinstance(model, ImageTokenizer) and not hasattr(model, "forward_features")
        self.device = torch.device(device or _default_device())
        self.model = model.float().eval().to(self.device)
        self.spec = spec
        self.batch_size = max(1, int(batch_size))
        self.threads = max(1, decode_threads or min(4, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode") if self.threads > 1 else None
        self._affine = affine_for(spec.mean, spec.std, 3, self.device)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], where: str = "", **kw: Any) -> Predictor:
        """A Predictor from a model folder: ``model.safetensors`` + ``config.json`` + ``serving.json``
        (at its root or under ``artifacts/``, the pyfunc layout). Weights are checked against the
        config before anything is allocated (``tracking.model_from_path``)."""
        from orchestration.tracking.registry import model_from_path

        root = Path(path)
        where = where or str(root)
        if not (root / SERVING_FILE).is_file() and (root / "artifacts" / SERVING_FILE).is_file():
            root = root / "artifacts"
        spec_file = root / SERVING_FILE
        if not spec_file.is_file():
            raise FileNotFoundError(f"{where}: no {SERVING_FILE} (the eval transform and class names); the model was "
                                    "registered before serving existed: register it again "
                                    "(python orchestration/import_weights.py FILE or a training run)")
        spec = ServingSpec.from_json(spec_file.read_text(), f"{where}/{SERVING_FILE}")
        return cls(model_from_path(root, where), spec, where=where, **kw)

    # ------------------------------------------------------------------ bytes -> pixels
    def _decode_one(self, i: int, data: Any) -> torch.Tensor | RowError:
        spec = self.spec
        if isinstance(data, str):
            return RowError(i, "not_bytes", "a string, not encoded image bytes (send the image itself, base64 in "
                                            "JSON; a URL or a path is never fetched or opened)")
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        if not isinstance(data, bytes):
            return RowError(i, "not_bytes", f"a {type(data).__name__}, not encoded image bytes")
        if not data:
            return RowError(i, "empty", "no bytes")
        if len(data) > spec.max_image_bytes:
            return RowError(i, "too_large", f"{len(data)} bytes > the limit of {spec.max_image_bytes}")
        try:
            arr = decode_eval(data, size=spec.image_size, crop_pct=spec.crop_pct, max_pixels=spec.max_pixels)
        except BadSample as e:
            # PIL names the buffer object ("<_io.BytesIO object at 0x7f...>"): an address would make the
            # same bad image's message differ between runs (and batch outputs between reruns).
            detail = _ADDRESS.sub("the image bytes", str(e).removeprefix(f"{e.reason}: "))
            return RowError(i, e.reason, detail)
        return torch.from_numpy(arr).permute(2, 0, 1)  # (3, S, S) uint8, a free view of CHW memory

    def decode(self, rows: Sequence[Any]) -> list[torch.Tensor | RowError]:
        """Each row's ``(3, S, S)`` uint8 crop, or the :class:`RowError` that stopped it."""
        if self._pool is None or len(rows) < 2:
            return [self._decode_one(i, d) for i, d in enumerate(rows)]
        return list(self._pool.map(self._decode_one, range(len(rows)), rows))

    # ------------------------------------------------------------------ pixels -> outputs
    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """uint8 ``(B, 3, S, S)`` -> (scores ``(B, C)`` float32 or None without a head, embedding ``(B, D)``).

        Scores are softmax (or sigmoid) probabilities as ``serving.json`` says; the embedding is the
        pre-logit representation (``forward_head(pre_logits=True)``), what the head sees.
        """
        scale, shift = self._affine
        x = images.to(self.device, non_blocking=True).float().mul_(scale).sub_(shift)  # (B, 3, S, S)
        if self.tokenizer:
            return None, self.model.tokenize(x).cpu()  # (B, N) token ids
        feats = self.model.forward_features(x)
        emb = self.model.forward_head(feats, pre_logits=True)  # (B, D)
        if self.spec.embedding_only:
            return None, emb.float().cpu()
        # from the features, not head(emb): a timm network's head may pool (Swin) or hold two (DeiT)
        logits = self.model.forward_head(feats).float()  # (B, C)
        scores = logits.softmax(-1) if self.spec.activation == "softmax" else logits.sigmoid()
        return scores.cpu(), emb.float().cpu()

    def check_params(self, top_k: Any = None, return_embedding: Any = False) -> tuple[int, bool]:
        """Validated ``(top_k, return_embedding)``; BadRequest names a bad one."""
        k = self.spec.top_k if top_k is None else top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise BadRequest(f"top_k={top_k!r} must be an integer >= 1")
        if not isinstance(return_embedding, bool):
            raise BadRequest(f"return_embedding={return_embedding!r} must be true or false")
        return min(k, len(self.spec.class_names)) if self.spec.class_names else k, return_embedding

    def check_size(self, rows: Sequence[Any]) -> None:
        """BadRequest unless ``rows`` is within the request limits of ``serving.json``."""
        if len(rows) > self.spec.max_rows:
            raise BadRequest(f"{len(rows)} rows in one request, more than the limit of {self.spec.max_rows}; "
                             "split it")
        total = sum(len(r) for r in rows if isinstance(r, (bytes, bytearray, memoryview, str)))
        if total > self.spec.max_request_bytes:
            raise BadRequest(f"{total} bytes of images in one request, more than the limit of "
                             f"{self.spec.max_request_bytes}; split it")

    def predict(self, rows: Sequence[Any], *, top_k: Any = None, return_embedding: Any = False,
                strict: bool = True) -> list[dict[str, Any]]:
        """One result per row: ``{"classes": [...], "probabilities": [...]}`` (top-k, best first),
        plus ``"embedding"`` when asked (always, for a model without a head); a tokenizer's:
        ``{"tokens": [...]}`` (one visual token per patch, row-major).

        ``strict`` (a server): any bad row fails the request with :class:`BadRequest` naming
        every bad row, before any forward pass. Otherwise (batch prediction) a bad row's result is
        ``{"error": "<reason>: <detail>"}`` and the other rows are still predicted.
        """
        k, want_emb = self.check_params(top_k, return_embedding)
        if strict:
            self.check_size(rows)
        decoded = self.decode(rows)
        errors = [d for d in decoded if isinstance(d, RowError)]
        if errors and strict:
            raise BadRequest(f"{len(errors)} of {len(rows)} rows are not usable images: "
                             + "; ".join(map(str, errors[:20])) + (" ..." if len(errors) > 20 else ""), errors)
        good = [i for i, d in enumerate(decoded) if not isinstance(d, RowError)]
        out: list[dict[str, Any]] = [{"error": f"{d.reason}: {d.detail}"} if isinstance(d, RowError) else {}
                                     for d in decoded]
        for a in range(0, len(good), self.batch_size):
            idx = good[a:a + self.batch_size]
            scores, emb = self.forward(torch.stack([decoded[i] for i in idx]))  # type: ignore[misc]
            for j, i in enumerate(idx):
                out[i] = self._result(None if scores is None else scores[j], emb[j], k, want_emb)
        return out

    def _result(self, scores: torch.Tensor | None, emb: torch.Tensor, k: int, want_emb: bool) -> dict[str, Any]:
        res: dict[str, Any] = {}
        if self.tokenizer:
            return {"tokens": emb.tolist()}
        if scores is not None:
            p, c = scores.topk(k)
            names = self.spec.class_names
            res["classes"] = [names[i] for i in c.tolist()]
            res["probabilities"] = p.tolist()
        if want_emb or scores is None:
            res["embedding"] = emb.tolist()
        return res
