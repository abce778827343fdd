"""Partial and direct JPEG decoding use PIL internals: a Pillow that changed them must never look like bad data.

A simulated Pillow change (an internal attribute gone, a changed call signature, or a decode
that silently writes other pixels; injected at our two functions that touch the internals,
``_decode_top_internal`` and ``_decode_into_internal``, since PIL's own full decode uses the same
internals) turns both paths off with a warning
naming why; every image then decodes fully, with the same pixels, and no sample is counted
as corrupt.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from pipeline import decode


def _jpeg(w: int = 120, h: int = 90) -> bytes:
    rng = np.random.default_rng(0)
    pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture()
def fresh_state() -> Iterator[None]:
    saved = (decode._PartialDecode.enabled, decode._PartialDecode.reason, decode._PartialDecode.fallbacks)
    decode._PartialDecode.enabled, decode._PartialDecode.reason, decode._PartialDecode.fallbacks = True, "", 0
    yield
    decode._PartialDecode.enabled, decode._PartialDecode.reason, decode._PartialDecode.fallbacks = saved


def _train(data: bytes) -> np.ndarray:
    return decode.decode_train(data, size=32, scale=(0.3, 0.5), rng=random.Random(3)).copy()


def test_self_check_passes_on_the_pinned_pillow(fresh_state: None) -> None:
    decode._self_check_partial_decode()
    assert decode.partial_decode_status() == {"enabled": True, "reason": "", "fallbacks": 0}
    _train(_jpeg())
    assert decode.partial_decode_status()["fallbacks"] == 0  # the crop really used partial decoding


def test_missing_internal_disables_partial_decode_at_import(
        fresh_state: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    data = _jpeg()
    expected = _train(data)

    def drifted(im: Image.Image, data: bytes, rows: int) -> bool:
        raise AttributeError("'JpegImageFile' object has no attribute 'decoderconfig'")

    monkeypatch.setattr(decode, "_decode_top_internal", drifted)
    monkeypatch.setattr(decode, "_decode_into_internal", drifted)
    with caplog.at_level(logging.WARNING, logger="pipeline.decode"):
        decode._self_check_partial_decode()
    status = decode.partial_decode_status()
    assert status["enabled"] is False and "decoderconfig" in status["reason"]
    assert "partial JPEG decoding disabled" in caplog.text
    np.testing.assert_array_equal(_train(data), expected)  # full decode: same pixels, no BadSample
    assert decode.partial_decode_status()["fallbacks"] == 1


def test_self_check_catches_wrong_pixels(fresh_state: None, monkeypatch: pytest.MonkeyPatch) -> None:
    real = decode._decode_top_internal

    def off_by_one(im: Image.Image, data: bytes, rows: int) -> bool:
        done = real(im, data, rows - 1)  # a changed decoder that stops one row early
        im.im, im._size = Image.new(im.mode, (im.size[0], rows)).im, (im.size[0], rows)
        return done

    monkeypatch.setattr(decode, "_decode_top_internal", off_by_one)
    decode._self_check_partial_decode()
    assert decode.partial_decode_status()["enabled"] is False
    assert "differs from the full decode" in str(decode.partial_decode_status()["reason"])


def test_self_check_catches_wrong_pixels_of_the_direct_path(fresh_state: None, monkeypatch: pytest.MonkeyPatch) -> None:
    real = decode._decode_into_internal

    def shifted(im: Image.Image, data: bytes, rows: int) -> np.ndarray | None:
        got = real(im, data, rows)  # a changed unpacker that writes the channels in another order
        return None if got is None else got[..., [2, 1, 0, 3]]

    monkeypatch.setattr(decode, "_decode_into_internal", shifted)
    decode._self_check_partial_decode()
    status = decode.partial_decode_status()
    assert status["enabled"] is False and "direct decode" in str(status["reason"])


def test_direct_decode_reuses_one_buffer_per_thread(fresh_state: None) -> None:
    """The RGB fast path decodes into the thread's scratch buffer (no per-image allocation) and
    never hands that buffer out: two decodes in a row keep the first result intact."""
    data = _jpeg()
    first = decode.decode_train(data, size=32, scale=(0.3, 0.5), rng=random.Random(3))
    keep = first.copy()
    buf = decode._SCRATCH.buf
    assert buf is not None and not np.shares_memory(first, buf)
    decode.decode_train(_jpeg(100, 80), size=32, scale=(0.3, 0.5), rng=random.Random(4))
    assert decode._SCRATCH.buf is buf  # reused, not reallocated
    np.testing.assert_array_equal(first, keep)


def test_internal_failing_at_run_time_falls_back_not_corrupt(
        fresh_state: None, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _jpeg()
    expected = _train(data)

    def changed_api(im: Image.Image, data: bytes, rows: int) -> bool:
        raise TypeError("_getdecoder() takes 2 positional arguments but 4 were given")

    monkeypatch.setattr(decode, "_decode_top_internal", changed_api)
    monkeypatch.setattr(decode, "_decode_into_internal", changed_api)
    for _ in range(3):
        np.testing.assert_array_equal(_train(data), expected)
    status = decode.partial_decode_status()
    assert status["enabled"] is False and "TypeError" in status["reason"] and status["fallbacks"] == 3


def test_truncated_jpeg_is_still_bad_data(fresh_state: None) -> None:
    data = _jpeg(200, 160)
    with pytest.raises(decode.BadSample) as err:
        decode.decode_eval(data[: len(data) // 3], size=32)
    assert err.value.reason == "corrupt_image"
    assert decode.partial_decode_status()["enabled"] is True  # bad data does not switch the path off
