"""JPEG bytes -> fixed-size uint8 RGB arrays, decoding only what the crop needs.

The train path is the Inception crop (torchvision ``RandomResizedCrop`` parameters, sampled
from the image size in the JPEG header, i.e. before any pixel is decoded). A JPEG is then
decoded by ``_vitscale_jpeg`` (our C extension on libjpeg-turbo, pipeline/_jpeg.c) only inside the crop: no
IDCT, upsampling or colour conversion for the rows above it or the columns beside it, nothing
below it, and scaled in the DCT domain by 1/2, 1/4 or 1/8 when the crop still has at least
``size`` pixels across (:func:`_scale_num`). The region's pixels are exactly those of a full
decode at that scale, and so those of the PIL path this replaced. Eval is resize (shorter side
to ``size / crop_pct``) + center crop, through the same region decode. The resize runs in torch on the RGBX
rows libjpeg wrote into a reused per-thread buffer. Images that are not plain JPEGs (PNG, CMYK
JPEGs, ...) go through PIL.

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

try:
    # A top-level module, not pipeline._jpeg: `ray job submit --working-dir .` uploads the checkout
    # without ignored files (the built .so), and the uploaded pipeline/ package shadows the installed
    # one; a top-level module still resolves to the installed build (site-packages, or the editable
    # install's copy).
    import _vitscale_jpeg as _jpeg
except ImportError as exc:  # pragma: no cover - a checkout whose extension was never built
    raise ImportError(
        f"_vitscale_jpeg (the loader's JPEG decoder, pipeline/_jpeg.c) is not built ({exc}): run `make install` "
        "(or `pip install -e .`) in the repository; it needs a C compiler and libjpeg-turbo's headers "
        "(apt-get install libjpeg62-turbo-dev)") from exc

log = logging.getLogger(__name__)

#: libjpeg colour spaces our decoder decodes to RGB itself (others, CMYK/YCCK, go through PIL).
_PLAIN_SPACES = (_jpeg.JCS_GRAYSCALE, _jpeg.JCS_RGB, _jpeg.JCS_YCbCr)

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


def _scale_num(w: int, h: int, need_w: float, need_h: float) -> int:
    """M of the M/8 DCT scale at which a ``w x h`` JPEG still has >= ``need`` pixels across each side.

    PIL ``draft()``'s rule, which the loader used before its own decoder: 1/2, 1/4 or 1/8 (the
    largest ``1/s`` with ``w // s >= need``), only when ``need`` is at most half the image; so the
    pixels are the PIL path's, bit for bit. Any M/8 would be possible (libjpeg scales by 1/8 ... 8/8),
    but 3/8, 5/8, 6/8 and 7/8 measured slower than 8/8 + resize (their IDCTs have no SIMD) and
    softer (BENCHMARKS.md), so they are not used.
    """
    if not (need_w * 2 <= w and need_h * 2 <= h):
        return 8
    room = min(w // math.ceil(need_w), h // math.ceil(need_h))
    return 8 // next(s for s in (8, 4, 2, 1) if room >= s)


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


def _pixel_box(box: tuple[float, float, float, float], w: int, h: int) -> tuple[int, int, int, int]:
    """A float box in a ``w x h`` image -> whole pixels, at least 1x1, inside the image (at most
    half a pixel off the exact box)."""
    x0 = min(max(int(round(box[0])), 0), w - 1)
    y0 = min(max(int(round(box[1])), 0), h - 1)
    x1 = max(min(int(round(box[2])), w), x0 + 1)
    y1 = max(min(int(round(box[3])), h), y0 + 1)
    return x0, y0, x1, y1


#: The op ``F.interpolate(mode="bilinear", antialias=True)`` dispatches to, called directly: the
#: wrapper's argument checks cost ~20 us per call, about a tenth of the resize itself.
_UPSAMPLE_AA = getattr(torch._C._nn, "_upsample_bilinear2d_aa", None)


def _resize(nchw: torch.Tensor, size: int, flip: bool, out: torch.Tensor | None = None) -> np.ndarray:
    """``(1, C, h, w)`` uint8 (C = 3, or 4 with the X of RGBX last) -> ``(size, size, 3)`` uint8.

    Bilinear with antialiasing (PIL ``BILINEAR``'s filter) in torch: 3-4x faster than PIL's
    resampler on 224 px crops; its uint8 fast path is 4-channel (3-channel input is repacked). The
    result is an HWC view of CHW memory (strides ``(S, 1, S*S)``): the loader turns it back into a
    ``(3, S, S)`` tensor without a copy. ``out``: a ``(3, S, S)`` uint8 tensor (a row of the batch
    being built) to write the result into, instead of a fresh array; the result is then its view.
    """
    if _UPSAMPLE_AA is not None:
        res = _UPSAMPLE_AA(nchw, [size, size], False, None, None)[0, :3]
    else:  # pragma: no cover - a torch without the private op
        res = F.interpolate(nchw, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0, :3]
    if res.is_contiguous():  # planar (the crop was a strided view): dropping X and flipping are cheap
        src = res.flip(-1) if flip else res
        if out is None:
            return src.permute(1, 2, 0).numpy()  # (S, S, 3) view of CHW memory
        out.copy_(src)
        return out.permute(1, 2, 0).numpy()
    # A dense channels-last input gives channels-last output: numpy de-interleaves (and flips) in one
    # pass, ~2-3x faster than torch's strided copy.
    hwc = res.permute(1, 2, 0).numpy()  # (S, S, 3) view of the (S, S, 4) output
    chw = np.empty((3, size, size), np.uint8) if out is None else out.numpy()
    np.copyto(chw, (hwc[:, ::-1] if flip else hwc).transpose(2, 0, 1))
    return chw.transpose(1, 2, 0)  # (S, S, 3) view of CHW memory


def _jpeg_header(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """``(w, h)`` of a JPEG our decoder takes (grayscale, RGB, YCbCr), else None (PIL decides)."""
    try:
        w, h, _components, space = _jpeg.header(data)
    except ValueError:
        return None  # not a JPEG, or a header libjpeg refuses: the PIL path names the problem
    if space not in _PLAIN_SPACES or w <= 0 or h <= 0:
        return None  # CMYK/YCCK (Adobe) JPEGs: PIL converts them
    if max_pixels and w * h > max_pixels:
        raise BadSample("too_many_pixels", f"{w}x{h} > {max_pixels}")
    return w, h


def _jpeg_crop(data: bytes, w: int, h: int, m: int, box: tuple[float, float, float, float], size: int,
               flip: bool, out: torch.Tensor | None = None) -> np.ndarray:
    """Decode only ``box`` (original pixels) of the JPEG scaled by ``m/8``, resize to ``size``.

    The pixels are exactly those of a full decode at that scale, cropped (tests/test_pipeline.py):
    libjpeg skips the IDCT, upsampling and colour work of the rows above the box and the columns
    beside it, and stops after its last row; only entropy decoding runs over the rows above.
    """
    sw, sh = -(-w * m // 8), -(-h * m // 8)
    fx, fy = sw / w, sh / h
    x0, y0, x1, y1 = _pixel_box((box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy), sw, sh)
    buf = _scratch((y1 - y0) * sw * 4)
    try:
        xoff, width, rows = _jpeg.decode(data, buf, m, x0, y0, x1, y1)
    except ValueError as exc:  # corrupt or truncated entropy data
        raise BadSample("corrupt_image", str(exc)) from exc
    rgbx = buf[: rows * width * 4].reshape(rows, width, 4)[:, x0 - xoff: x1 - xoff]
    # (1, 4, h, w) channels-last view of the scratch buffer; torch's uint8 resize reads it in place.
    return _resize(torch.from_numpy(rgbx).permute(2, 0, 1).unsqueeze(0), size, flip, out)


def _pil_crop(data: bytes, box: tuple[float, float, float, float], size: int, max_pixels: int,
              flip: bool = False, out: torch.Tensor | None = None) -> np.ndarray:
    """Any other image PIL reads (PNG, CMYK JPEG, ...): full decode (JPEG: draft 1/2^k), crop, resize."""
    im = _open(data, max_pixels)
    w, h = im.size
    fx = fy = 1.0
    need_w, need_h = w * size / (box[2] - box[0]), h * size / (box[3] - box[1])  # the image's size at 1:1 crop
    if im.format == "JPEG" and need_w * 2 <= w and need_h * 2 <= h:
        im.draft(im.mode, (math.ceil(need_w), math.ceil(need_h)))
        fx, fy = im.size[0] / w, im.size[1] / h
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()  # corrupt data surfaces here
            crop = im.crop(_pixel_box((box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy), *im.size))
            if crop.mode != "RGB":
                # L, CMYK, P, RGBA, I;16 ... -> RGB (alpha dropped: JPEG carries none anyway).
                crop = crop.convert("RGBA").convert("RGB") if crop.mode == "P" else crop.convert("RGB")
            arr = np.asarray(crop)  # (h, w, 3) uint8, read-only; only read below (torch's warning muted)
            nchw = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
    except BadSample:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt entropy data surfaces here
        raise BadSample("corrupt_image", f"{type(exc).__name__}: {exc}") from exc
    return _resize(nchw, size, flip, out)


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
                 max_pixels: int = DEFAULT_MAX_PIXELS, out: torch.Tensor | None = None) -> np.ndarray:
    """Inception crop + optional horizontal flip: ``(size, size, 3)`` uint8.

    The crop (``sample_crop`` on the header's size) and the flip are drawn before any pixel is
    decoded; a JPEG is then decoded only inside the crop (:func:`_jpeg_crop`). ``out``: a
    ``(3, size, size)`` uint8 tensor to write into (the returned array is then its HWC view);
    untouched when the sample is bad.
    """
    wh = _jpeg_header(data, max_pixels)
    w, h = wh if wh is not None else _open(data, max_pixels).size
    x, y, cw, ch = sample_crop(w, h, scale, ratio, rng)
    flip = hflip and rng.random() < 0.5
    box = (x, y, x + cw, y + ch)
    if wh is None:
        return _pil_crop(data, box, size, max_pixels, flip, out)
    m = _scale_num(w, h, w * size / cw, h * size / ch)
    return _jpeg_crop(data, w, h, m, box, size, flip, out)  # (S, S, 3) uint8


def decode_eval(data: bytes, *, size: int, crop_pct: float = 0.875, max_pixels: int = DEFAULT_MAX_PIXELS,
                out: torch.Tensor | None = None) -> np.ndarray:
    """Resize the shorter side to ``size / crop_pct``, center crop ``size``: ``(size, size, 3)`` uint8
    (``out`` as in :func:`decode_train`).

    """
    wh = _jpeg_header(data, max_pixels)
    w, h = wh if wh is not None else _open(data, max_pixels).size
    side = min(w, h) * crop_pct  # the center square, in original pixels
    x0, y0 = (w - side) / 2, (h - side) / 2
    box = (x0, y0, x0 + side, y0 + side)
    if wh is None:
        return _pil_crop(data, box, size, max_pixels, out=out)
    m = _scale_num(w, h, w * size / side, h * size / side)
    return _jpeg_crop(data, w, h, m, box, size, False, out)


def decode_problem(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why the loader would skip this image (``"reason: detail"``), or None when every row decodes.

    The writer's check (``pipeline.encode.prepare_image``), so that whatever it stores the loader
    serves: every row is entropy-decoded, at 1/8 scale (the IDCT and colour work of the others is
    not needed to see damaged or truncated data).
    """
    try:
        wh = _jpeg_header(data, max_pixels)
        if wh is None:
            im = _open(data, max_pixels)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if im.format == "JPEG":
                    im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
                im.load()
            return None
        sw, sh = -(-wh[0] // 8), -(-wh[1] // 8)
        _jpeg.decode(data, _scratch(sw * sh * 4), 1, 0, 0, sw, sh)
    except BadSample as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - any decoder failure: corrupt data
        return f"corrupt_image: {type(exc).__name__}: {exc}"
    return None
