"""The torchvision decode path serves PIL's exact pixels, and bad data is still judged by PIL."""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import decode, decode_tv
from pipeline.demo_data import make_photos

T = decode_tv._TorchvisionDecode


@pytest.fixture()
def tv_state() -> Iterator[None]:
    saved = (T.enabled, T.reason, T.decode_jpeg)
    yield
    T.enabled, T.reason, T.decode_jpeg = saved


def _both(fn: object, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    T.enabled = True
    a = fn(data).copy()  # type: ignore[operator]
    T.enabled = False
    b = fn(data).copy()  # type: ignore[operator]
    T.enabled = True
    return a, b


def test_self_check_enables_the_path_on_the_pinned_stack(tv_state: None) -> None:
    decode_tv.self_check()
    assert decode_tv.status() == {"enabled": True, "reason": ""}


def test_same_pixels_as_pil_for_train_and_eval(tv_state: None) -> None:
    photos = list(make_photos(12, size=(200, 150), seed=1, quality=85))
    buf = io.BytesIO()
    Image.open(io.BytesIO(photos[0])).save(buf, format="JPEG", quality=80, progressive=True, subsampling=0)
    used = 0
    for i, data in enumerate([*photos, buf.getvalue()]):
        for fn in (lambda d, i=i: decode.decode_train(d, size=64, scale=(0.08, 1.0), rng=random.Random(i)),
                   lambda d: decode.decode_eval(d, size=64)):
            a, b = _both(fn, data)
            assert np.array_equal(a, b)
        im = Image.open(io.BytesIO(data))
        used += decode_tv.decode_rgb(data, *im.size) is not None
    assert used == 13  # the torchvision path really decoded every one


def test_corrupt_data_is_reported_by_pil_as_before(tv_state: None) -> None:
    data = next(iter(make_photos(1, size=(200, 150), seed=2)))
    for bad in (data[: len(data) // 2], data[:400] + bytes(range(256)) * 8 + data[2448:]):
        assert decode_tv.decode_rgb(bad, 200, 150) is None  # torchvision refuses it: PIL decides
        errors = []
        for on in (True, False):
            T.enabled = on
            with pytest.raises(decode.BadSample) as exc:
                decode.decode_eval(bad, size=64)
            errors.append(exc.value.reason)
        assert errors == ["corrupt_image", "corrupt_image"]


def test_a_decoder_with_other_pixels_turns_the_path_off(tv_state: None, caplog: pytest.LogCaptureFixture) -> None:
    from torchvision.io import decode_jpeg

    def drifted(tensor: torch.Tensor, mode: object) -> torch.Tensor:  # e.g. a build with IFAST IDCT
        return decode_jpeg(tensor, mode=mode) // 2

    data = next(iter(make_photos(1, size=(200, 150), seed=3)))
    expected = decode.decode_eval(data, size=64).copy()
    with caplog.at_level(logging.WARNING, logger="pipeline.decode_tv"):
        decode_tv.self_check(drifted)
    assert decode_tv.status()["enabled"] is False
    assert "torchvision JPEG decoding disabled" in caplog.text and "differs from PIL" in caplog.text
    assert np.array_equal(decode.decode_eval(data, size=64), expected)  # PIL decodes: same pixels
