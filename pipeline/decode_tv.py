"""Whole-image JPEG decode through torchvision's libjpeg-turbo call, where it gives PIL's exact pixels.

``torchvision.io.decode_jpeg`` decodes a ~500x375 photo in ~0.61 ms against PIL's ~0.80 ms on the
dev box (BENCHMARKS.md, "making the loader faster"): same library (libjpeg-turbo, default
ISLOW IDCT and fancy upsampling in both), but one ``jpeg_read_scanlines`` loop straight into
the output tensor instead of PIL's chunked feed and row unpack. Its pixels equal PIL's bit for
bit on baseline, progressive, 4:4:4/4:2:2/4:2:0, odd-sized, restart-marker and damaged-but-
decodable JPEGs (checked on torchvision 0.29.1 / Pillow 13.0.0), so :mod:`pipeline.decode` uses
it as the full-decode step when DCT scaling does not apply, and a given seed serves the same
pixels as before. It cannot decode part of an image, so crops that end well above the bottom
keep PIL's partial decode (:data:`MIN_ROWS_FRACTION`).

Safety: an import-time self-check decodes generated JPEGs both ways; if torchvision is missing
(its image decoders are deprecated since 0.29 in favour of TorchCodec), lacks libjpeg, or
answers other pixels, this path is off with one warning naming why, and PIL decodes everything
(same pixels, slower). Any error from torchvision (truncated or corrupt data) returns None: the
PIL path then decodes and reports the sample exactly as it always has (same BadSample reasons).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

#: Use torchvision when the crop's bottom row is below this fraction of the image height. PIL's
#: partial decode costs roughly that fraction of its full decode (rows below the crop are never
#: decoded), and torchvision's full decode costs ~0.76 of PIL's; measured best at 0.7-0.8.
MIN_ROWS_FRACTION = 0.75


class _TorchvisionDecode:
    """Whether torchvision decodes our JPEGs here, decided once per process by :func:`self_check`."""

    enabled: bool = False
    reason: str = "not checked yet"
    decode_jpeg: Any = None
    rgb: Any = None

    @classmethod
    def disable(cls, reason: str) -> None:
        if cls.enabled or cls.reason != reason:
            log.warning("torchvision JPEG decoding disabled, PIL decodes every image instead (same pixels, "
                        "~20 %% slower decode): %s", reason)
        cls.enabled, cls.reason = False, reason


def status() -> dict[str, object]:
    """``{"enabled", "reason"}`` of the torchvision decode path in this process."""
    return {"enabled": _TorchvisionDecode.enabled, "reason": _TorchvisionDecode.reason}


def decode_rgb(data: bytes, w: int, h: int) -> torch.Tensor | None:
    """Whole RGB decode: a ``(3, h, w)`` uint8 channels-last view, or None (path off, or any error)."""
    if not _TorchvisionDecode.enabled:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 0.29 deprecation notice; the read-only buffer note
            t = _TorchvisionDecode.decode_jpeg(torch.frombuffer(data, dtype=torch.uint8),
                                               mode=_TorchvisionDecode.rgb)
    except Exception:  # noqa: BLE001 - corrupt/truncated data: PIL decides and reports it as before
        return None
    return t if t.shape == (3, h, w) else None


def _jpegs() -> list[bytes]:
    """Small JPEGs covering the layouts the loader sees: 4:2:0 and 4:4:4, progressive, grayscale."""
    yy, xx = np.mgrid[0:53, 0:71]
    pixels = np.stack([xx * 3, yy * 4, (xx * yy) % 251], axis=-1).astype(np.uint8)  # (53, 71, 3)
    out = []
    for mode, kw in (("RGB", {"subsampling": 2}), ("RGB", {"subsampling": 0}),
                     ("RGB", {"progressive": True}), ("L", {})):
        buf = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buf, format="JPEG", quality=90, **kw)
        out.append(buf.getvalue())
    return out


def self_check(decoder: Callable[..., torch.Tensor] | None = None) -> None:
    """Turn the path on if torchvision (or ``decoder``, for tests) decodes reference JPEGs to PIL's pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchvision.io import ImageReadMode, decode_jpeg
        _TorchvisionDecode.decode_jpeg, _TorchvisionDecode.rgb = decoder or decode_jpeg, ImageReadMode.RGB
        _TorchvisionDecode.enabled = True
        for data in _jpegs():
            want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            got = decode_rgb(data, want.shape[1], want.shape[0])
            if got is None or not np.array_equal(got.permute(1, 2, 0).numpy(), want):
                raise ValueError("torchvision's decode of a reference JPEG differs from PIL's")
        _TorchvisionDecode.reason = ""
    except Exception as exc:  # noqa: BLE001 - any failure here means: decode with PIL
        _TorchvisionDecode.disable(f"self-check failed: {type(exc).__name__}: {exc}")


self_check()
