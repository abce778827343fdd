"""Checking and encoding one source image for a shard: original JPEG bytes kept, others re-encoded."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from .decode import DEFAULT_MAX_PIXELS, decode_problem

#: Images above this many pixels are rejected: the loader's limit (one constant, pipeline.decode),
#: so an image the writer stores is never one the loader skips as too big.
WRITER_MAX_PIXELS = DEFAULT_MAX_PIXELS

# ----------------------------------------------------------------------------- encoding
class Reject(Exception):
    """A source image that will not be written; ``reason`` is the rejects.parquet category."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def prepare_image(data: bytes, *, max_side: int | None, quality: int) -> bytes:
    """Validate ``data`` and return JPEG bytes (original bytes when already a JPEG that fits)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked just below
            im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > WRITER_MAX_PIXELS:
            raise Reject("too_many_pixels", f"{w}x{h}")
        resize = max_side is not None and max(w, h) > max_side
        if im.format == "JPEG" and not resize:
            # The loader's own decoder over every row (at 1/8 scale: enough to see truncated or
            # damaged entropy data): an image stored here is one the loader serves.
            problem = decode_problem(data, WRITER_MAX_PIXELS)
            if problem:
                raise Reject("undecodable", problem)
            return data
        if resize:
            s = max_side / max(w, h)  # type: ignore[operator]
            tw, th = max(1, round(w * s)), max(1, round(h * s))
            if im.format == "JPEG":
                im.draft("RGB", (tw, th))
            im = im.convert("RGB").resize((tw, th), Image.BICUBIC, reducing_gap=3.0)
        else:
            im = im.convert("RGB")
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()
    except Reject:
        raise
    except Image.DecompressionBombError as exc:
        raise Reject("too_many_pixels", str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a reject, not a crash
        raise Reject("undecodable", f"{type(exc).__name__}: {exc}") from exc
