"""JPEG bytes -> fixed-size uint8 RGB arrays, cropping *before* decoding where it pays.

The train path is the Inception crop (torchvision ``RandomResizedCrop`` parameters, sampled
from the image size in the JPEG header, i.e. before any pixel is decoded) fused with PIL's
JPEG *draft* mode: libjpeg scales by 1/2, 1/4 or 1/8 in the DCT domain while decoding, and we
ask for the largest reduction that still leaves at least ``size`` pixels across the crop, so
quality is unchanged and large images decode several times faster. Eval is resize (shorter
side to ``size / crop_pct``) + center crop, also through draft mode.

Problems raise :class:`BadSample` with a short ``reason`` used as the stats key.
"""

from __future__ import annotations

import io
import logging
import math
import random
import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

#: The one pixel limit of the project (decompression bombs): the writer rejects images above it
#: (``write_shards.prepare_image``) and the loader skips them (``DataConfig.max_image_pixels``
#: defaults to it), so whatever the writer stores the loader reads. Checked from the header,
#: before any decoding; the same value as PIL's ``Image.MAX_IMAGE_PIXELS`` default.
DEFAULT_MAX_PIXELS = 89_478_485


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is one of the ``loader.stats()`` keys."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own (global) cap, 2x MAX_IMAGE_PIXELS
        raise BadSample("too_many_pixels", str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - any header failure means a corrupt image
        raise BadSample("corrupt_image", f"{type(exc).__name__}: {exc}") from exc
    w, h = im.size
    if w <= 0 or h <= 0:
        raise BadSample("corrupt_image", f"size {w}x{h}")
    if max_pixels and w * h > max_pixels:
        raise BadSample("too_many_pixels", f"{w}x{h} > {max_pixels}")
    return im


def _draft(im: Image.Image, need_w: float, need_h: float) -> tuple[float, float]:
    """Let libjpeg downscale while decoding as long as >= (need_w, need_h) remain.

    Returns the (x, y) factors from original to drafted coordinates.
    """
    w, h = im.size
    if im.format == "JPEG" and need_w * 2 <= w and need_h * 2 <= h:
        mode = "RGB" if im.mode in ("RGB", "YCbCr") else im.mode
        im.draft(mode, (math.ceil(need_w), math.ceil(need_h)))
    return im.size[0] / w, im.size[1] / h


#: Probe pixel written before a partial decode; a decoder that really wrote the last row
#: overwrites it (see :func:`_decode_top`).
_MARK = {"RGB": (1, 254, 3), "L": 7, "CMYK": (1, 254, 3, 252)}


def _decode_top_internal(im: Image.Image, data: bytes, rows: int) -> bool:
    """Decode only rows ``[0, rows)`` of a sequential JPEG into ``im``; False if not done.

    libjpeg produces scanlines top to bottom, so rows below a crop never need their IDCT,
    upsampling or colour conversion; stopping there saves ~15 % of a 224 px train decode
    on average (bench/loader.py). PIL has no API for it: we drive its JPEG decoder on an
    image of ``rows`` rows. libjpeg then reports "too few scanlines" at the end, which PIL
    returns as a broken stream; a probe pixel in the last row tells a finished decode (probe
    overwritten: the rows are exact, equal to a full decode's) from a stream that failed
    before reaching it, where we return False and let the full decode decide. Data that ends
    before ``rows`` raises :class:`BadSample`, as a truncated file does in a full decode.
    """
    w, h = im.size
    if im.format != "JPEG" or len(im.tile) != 1 or rows > h - 16 or im.mode not in _MARK:
        return False
    name, _extents, offset, args = im.tile[0]
    core = Image.core.new(im.mode, (w, rows))
    probes = ((0, rows - 1), (w - 1, rows - 1))
    for xy in probes:
        core.putpixel(xy, _MARK[im.mode])
    decoder = Image._getdecoder(im.mode, name, args, im.decoderconfig)
    decoder.setimage(core, (0, 0, w, rows))
    consumed, err = decoder.decode(memoryview(data)[offset:])
    decoder.cleanup()
    if consumed >= 0:  # libjpeg suspended: it wants bytes the sample does not have
        raise BadSample("corrupt_image", f"JPEG data ends before row {rows} of {h}")
    if err < 0 and all(core.getpixel(xy) == _MARK[im.mode] for xy in probes):
        return False  # failed before the last row we need: let a full decode decide
    im.im, im._size, im.tile = core, (w, rows), []  # what ImageFile.load() leaves behind
    return True


#: Largest scratch buffer (bytes) a thread keeps between images; a larger image gets a one-off buffer.
SCRATCH_KEEP_BYTES = 64 << 20


class _Scratch(threading.local):
    """One reusable RGBX decode target per thread: a fresh ~0.8 MB array per image costs ~190 page
    faults and the kernel's zeroing of every page, about a quarter of the decode itself."""

    buf: np.ndarray | None = None


_SCRATCH = _Scratch()


def _scratch(nbytes: int) -> np.ndarray:
    buf = _SCRATCH.buf
    if buf is not None and buf.size >= nbytes:
        return buf[:nbytes]
    if nbytes > SCRATCH_KEEP_BYTES:
        return np.empty(nbytes, np.uint8)
    _SCRATCH.buf = buf = np.empty(max(nbytes, 1 << 20), np.uint8)
    return buf[:nbytes]


def _decode_into_internal(im: Image.Image, data: bytes, rows: int) -> np.ndarray | None:
    """Decode rows ``[0, rows)`` of an RGB JPEG straight into this thread's scratch buffer.

    Returns a ``(rows, w, 4)`` uint8 RGBX view of the scratch buffer (valid until this thread's
    next decode), or None when the JPEG is not a plain RGB one or the decode did not finish cleanly
    (the PIL path then decides, and reports corrupt data the way it always has). The pixels are
    PIL's own (same libjpeg, same RGB unpacker: PIL stores RGB as RGBX anyway): the target is a PIL
    image mapped onto our buffer (``Image.frombuffer``), so there is no copy out of PIL's memory
    (``np.asarray(im)`` goes through ``tobytes``) and no fresh allocation per image; the 4th byte
    also suits torch's uint8 resize, which works on 4 channels (3-channel input is repacked).
    ``rows < h`` is the partial decode of :func:`_decode_top_internal` (same probe check).
    """
    w, h = im.size
    if im.format != "JPEG" or im.mode != "RGB" or len(im.tile) != 1 or rows > h:
        return None
    name, _extents, offset, args = im.tile[0]
    if args and args[0] == "RGB":  # libjpeg-turbo writes RGBX itself (JCS_EXT_RGBX): PIL's row unpack is a memcpy
        args = ("RGBX", *args[1:])
    arr = _scratch(rows * w * 4).reshape(rows, w, 4)  # (rows, w, RGBX)
    partial = rows < h
    if partial:
        arr[rows - 1, [0, w - 1], :3] = _MARK["RGB"]
    target = Image.frombuffer("RGBX", (w, rows), arr, "raw", "RGBX", 0, 1)  # shares arr's memory
    decoder = Image._getdecoder("RGBX", name, args, im.decoderconfig)
    decoder.setimage(target.im, (0, 0, w, rows))
    consumed, err = decoder.decode(memoryview(data)[offset:])
    decoder.cleanup()
    if not partial:
        return arr if consumed < 0 and err == 0 else None
    if consumed >= 0:  # libjpeg suspended: it wants bytes the sample does not have
        raise BadSample("corrupt_image", f"JPEG data ends before row {rows} of {h}")
    if err < 0 and all((arr[rows - 1, x, :3] == _MARK["RGB"]).all() for x in (0, w - 1)):
        return None  # failed before the last row we need: let a full decode decide
    return arr


class _PartialDecode:
    """Whether :func:`_decode_top` may use PIL's internals (decided once per process).

    Partial decoding drives private PIL API (``Image.core.new``, ``Image._getdecoder``,
    ``im.im``/``im._size``/``im.tile``), tested on the Pillow major pinned in pyproject.toml. A
    Pillow that changed them must not turn every sample into a ``corrupt_image`` skip (the
    loader would blame the shards): an import-time self-check compares a partial decode with a
    full one on a generated JPEG; if the API is missing or the pixels differ, partial decoding
    is switched off with a warning naming why and every image is fully decoded (slower, same
    pixels). The same happens if the internals fail with a non-data error at run time.
    """

    enabled: bool = True
    reason: str = ""
    fallbacks: int = 0  # images fully decoded because partial decoding is off

    @classmethod
    def disable(cls, reason: str) -> None:
        if cls.enabled:
            log.warning("partial JPEG decoding disabled, decoding whole images instead (slower, same "
                        "pixels): %s. Pillow %s; pin the tested major in pyproject.toml.", reason,
                        getattr(Image, "__version__", "?"))
        cls.enabled, cls.reason = False, reason


def partial_decode_status() -> dict[str, object]:
    """``{"enabled", "reason", "fallbacks"}`` of partial decoding in this process."""
    return {"enabled": _PartialDecode.enabled, "reason": _PartialDecode.reason,
            "fallbacks": _PartialDecode.fallbacks}


def _decode_top(im: Image.Image, data: bytes, rows: int) -> bool:
    """:func:`_decode_top_internal` if PIL's internals work here, else False (full decode)."""
    if not _PartialDecode.enabled:
        _PartialDecode.fallbacks += 1
        return False
    try:
        return _decode_top_internal(im, data, rows)
    except BadSample:
        raise
    except (AttributeError, TypeError, NameError, ValueError) as exc:  # API drift, not bad data
        _PartialDecode.disable(f"{type(exc).__name__}: {exc}")
        _PartialDecode.fallbacks += 1
        return False


def _decode_direct(im: Image.Image, data: bytes, rows: int) -> np.ndarray | None:
    """:func:`_decode_into_internal` while PIL's internals work here, else None (the PIL path)."""
    if not _PartialDecode.enabled:
        return None  # counted as a fallback by _decode_top, which the PIL path calls
    try:
        return _decode_into_internal(im, data, rows)
    except BadSample:
        raise
    except (AttributeError, TypeError, NameError, ValueError) as exc:  # API drift, not bad data
        _PartialDecode.disable(f"{type(exc).__name__}: {exc}")
        return None


def _self_check_partial_decode() -> None:
    """Partial decode of a generated JPEG must equal the full decode's top rows, pixel for pixel."""
    try:
        yy, xx = np.mgrid[0:64, 0:48]
        pixels = np.stack([xx * 5, yy * 3, (xx + yy) * 2], axis=-1).astype(np.uint8)  # (64, 48, 3)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        im = Image.open(io.BytesIO(data))
        if not _decode_top_internal(im, data, 40):
            raise ValueError("partial decode of a valid baseline JPEG did not complete")
        part = np.asarray(im)
        if part.shape != (40, 48, 3) or not np.array_equal(part, full[:40]):
            raise ValueError(f"partial decode differs from the full decode (shape {part.shape})")
        for rows in (40, 64):  # the direct path: partial and whole, into the scratch buffer
            got = _decode_into_internal(Image.open(io.BytesIO(data)), data, rows)
            if got is None or got.shape != (rows, 48, 4) or not np.array_equal(got[..., :3], full[:rows]):
                raise ValueError(f"direct decode of {rows} rows differs from the full decode")
    except Exception as exc:  # noqa: BLE001 - any failure here means: do not use the internals
        _PartialDecode.disable(f"self-check failed: {type(exc).__name__}: {exc}")


_self_check_partial_decode()


def _finish(im: Image.Image, data: bytes, box: tuple[float, float, float, float], size: int,
            flip: bool = False) -> np.ndarray:
    """Decode ``im`` (down to the box's bottom), crop ``box``, resize to ``(size, size, 3)`` uint8.

    The result is an HWC view of CHW memory (strides ``(S, 1, S*S)``): the loader turns it back
    into a ``(3, S, S)`` tensor without a copy. Only the crop is copied out of PIL's buffer
    (and converted to RGB if needed), and the resize runs in torch on uint8 channels-last data
    (bilinear with antialiasing, the same filter as PIL's ``BILINEAR`` resize): 3-4x faster
    than PIL's resampler on 224 px crops, which otherwise costs as much as the decode itself.
    """
    w, h = im.size  # drafted size; pixels are whole pixels of it: at most half a pixel off the exact box
    x0 = min(max(int(round(box[0])), 0), w - 1)
    y0 = min(max(int(round(box[1])), 0), h - 1)
    x1 = max(min(int(round(box[2])), w), x0 + 1)
    y1 = max(min(int(round(box[3])), h), y0 + 1)
    rgbx = _decode_direct(im, data, y1 if y1 <= h - 16 else h)
    if rgbx is not None:  # RGB JPEG: no PIL image, no crop copy; the same pixels as the path below
        # (1, 4, h, w) channels-last view of the scratch buffer; torch's uint8 resize reads it in place.
        nchw = torch.from_numpy(rgbx[y0:y1, x0:x1]).permute(2, 0, 1).unsqueeze(0)
        out = F.interpolate(nchw, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0, :3]
        if out.is_contiguous():  # planar (the crop is a strided view): dropping X and flipping are cheap
            return (out.flip(-1) if flip else out).permute(1, 2, 0).numpy()  # (S, S, 3) view of CHW memory
        # A full-width crop is a dense channels-last view, so torch answers channels-last: numpy de-interleaves
        # (and flips) in one pass, ~2-3x faster than torch's strided copy.
        hwc = out.permute(1, 2, 0).numpy()  # (S, S, 3) view of the (S, S, 4) output
        chw = np.empty((3, size, size), np.uint8)
        np.copyto(chw, (hwc[:, ::-1] if flip else hwc).transpose(2, 0, 1))
        return chw.transpose(1, 2, 0)  # (S, S, 3) view of CHW memory
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not _decode_top(im, data, y1):
                im.load()  # full decode: corrupt data surfaces here
            crop = im.crop((x0, y0, x1, y1))
            if crop.mode != "RGB":
                # L, CMYK, P, RGBA, I;16 ... -> RGB (alpha dropped: JPEG carries none anyway).
                crop = crop.convert("RGBA").convert("RGB") if crop.mode == "P" else crop.convert("RGB")
            arr = np.asarray(crop)  # (h, w, 3) uint8, read-only; only read below
            nchw = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w), channels-last strides
    except BadSample:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt entropy data surfaces here
        raise BadSample("corrupt_image", f"{type(exc).__name__}: {exc}") from exc
    out = F.interpolate(nchw, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if flip:
        out = out.flip(-1)  # (3, S, S)
    return out.permute(1, 2, 0).numpy()  # (S, S, 3) uint8 view


def sample_crop(w: int, h: int, scale: tuple[float, float], ratio: tuple[float, float],
                rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` with a seeded Python RNG: (x, y, cw, ch)."""
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
    in_ratio = w / h  # fallback: central crop
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def decode_train(data: bytes, *, size: int, scale: tuple[float, float] = (0.05, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True, rng: random.Random,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Inception crop + optional horizontal flip: ``(size, size, 3)`` uint8."""
    im = _open(data, max_pixels)
    w, h = im.size
    x, y, cw, ch = sample_crop(w, h, scale, ratio, rng)
    flip = hflip and rng.random() < 0.5
    fx, fy = _draft(im, w * size / cw, h * size / ch)
    return _finish(im, data, (x * fx, y * fy, (x + cw) * fx, (y + ch) * fy), size, flip)  # (S, S, 3) uint8


def decode_eval(data: bytes, *, size: int, crop_pct: float = 0.875,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Resize the shorter side to ``size / crop_pct``, center crop ``size``: ``(size, size, 3)`` uint8."""
    im = _open(data, max_pixels)
    w, h = im.size
    side = min(w, h) * crop_pct  # the center square, in original pixels
    fx, fy = _draft(im, w * size / side, h * size / side)
    x0, y0 = (w - side) / 2, (h - side) / 2
    return _finish(im, data, (x0 * fx, y0 * fy, (x0 + side) * fx, (y0 + side) * fy), size)
