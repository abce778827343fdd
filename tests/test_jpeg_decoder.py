"""_vitscale_jpeg (pipeline/_jpeg.c), the loader's JPEG decoder (region + DCT-scaled decode on libjpeg-turbo).

What it promises (pipeline/decode.py): the pixels of a region are exactly those of a full decode
at the same scale, and so the PIL path's it replaced (decode_train/decode_eval pixels are checked
against that path in tests/test_pipeline.py); damaged or truncated data above the region's last
row is an error, never grey or garbage rows; damage below it is never read; bad arguments, a
short buffer and hostile headers get a clear error, not a crash; threads decode at once.
"""

from __future__ import annotations

import io
import random
import threading

import numpy as np
import pytest
from PIL import Image

from pipeline import decode
from pipeline.decode import _jpeg
from pipeline.demo_data import make_photos
from pipeline.encode import Reject, prepare_image


def _save(a: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def layouts() -> list[tuple[str, bytes]]:
    """One photo in every JPEG layout the decoder meets: chroma 4:4:4 / 4:2:2 / 4:2:0, progressive,
    restart markers, grayscale, RGB (no colour transform), odd sizes."""
    photo = np.asarray(Image.open(io.BytesIO(next(iter(make_photos(1, size=(317, 243), seed=5, quality=92))))))
    out = [(f"sub{s}", _save(photo, quality=90, subsampling=s)) for s in (0, 1, 2)]
    out += [("progressive", _save(photo, quality=85, progressive=True)),
            ("restart", _save(photo, quality=85, restart_marker_blocks=3)),
            ("gray", _save(photo[..., 1])),
            ("rgb", _save(photo, quality=90, keep_rgb=True)),  # Adobe RGB: no YCbCr transform
            ("odd", _save(photo[3:-6, 5:-2], quality=80, subsampling=2))]
    return out


def _marked(data: bytes) -> bytes:
    """An EOI marker in the middle of the entropy data: libjpeg warns ("premature end of data
    segment") and fills the rest with grey; Pillow serves that image."""
    mid = len(data) // 2
    return data[:mid] + b"\xff\xd9" + data[mid + 2:]


def _region(data: bytes, m: int, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    w, h = _jpeg.header(data)[:2]
    out = np.empty((y1 - y0) * -(-w * m // 8) * 4, np.uint8)
    xoff, width, rows = _jpeg.decode(data, out, m, x0, y0, x1, y1)
    assert xoff <= x0 and xoff + width >= x1 and rows == y1 - y0
    return out[: rows * width * 4].reshape(rows, width, 4)[:, x0 - xoff: x1 - xoff, :3]


def test_a_region_is_exactly_the_full_decode_cropped(layouts: list[tuple[str, bytes]]) -> None:
    """Random boxes at scales 8/8, 4/8, 2/8, 1/8, against PIL's full decode (draft for the scale):
    the fancy chroma upsampler's edge columns and the skipped rows above are exact too."""
    rng = random.Random(0)
    for name, data in layouts:
        w, h, _, _ = _jpeg.header(data)
        for m in (8, 4, 2, 1):
            im = Image.open(io.BytesIO(data))
            if m < 8:
                im.draft(im.mode, (w * m // 8, h * m // 8))
            full = np.asarray(im.convert("RGB"))
            assert full.shape[:2] == (-(-h * m // 8), -(-w * m // 8)), (name, m)
            fh, fw = full.shape[:2]
            for _ in range(25):
                x0, y0 = rng.randrange(fw), rng.randrange(fh)
                box = (x0, y0, rng.randrange(x0 + 1, fw + 1), rng.randrange(y0 + 1, fh + 1))
                got = _region(data, m, box)
                assert np.array_equal(got, full[box[1]:box[3], box[0]:box[2]]), (name, m, box)


def test_damage_above_the_region_is_an_error_and_below_it_is_never_read(layouts: list[tuple[str, bytes]]) -> None:
    data = dict(layouts)["sub2"]
    w, h = _jpeg.header(data)[:2]
    whole = _region(data, 8, (0, 0, w, h))
    cut = data[: len(data) * 2 // 3]  # ends around two thirds down
    with pytest.raises(ValueError, match="damaged above row .*Premature end of JPEG file"):
        _region(cut, 8, (0, 0, w, h))
    top = _region(cut, 8, (10, 0, w - 10, h // 4))  # the rows it needs are all there
    assert np.array_equal(top, whole[: h // 4, 10: w - 10])
    marked = _marked(data)
    with pytest.raises(ValueError, match="damaged above row .*Corrupt JPEG data"):
        _region(marked, 8, (0, 0, w, h))
    assert np.array_equal(_region(marked, 8, (0, 0, w, 16)), whole[:16])
    # through decode_train: skipped as corrupt, never served with grey or garbage rows
    for i in range(10):
        with pytest.raises(decode.BadSample) as err:
            decode.decode_train(data[: len(data) // 10], size=32, scale=(0.5, 1.0), rng=random.Random(i))
        assert err.value.reason == "corrupt_image"


def test_the_writer_refuses_what_the_loader_would_skip(layouts: list[tuple[str, bytes]]) -> None:
    """Damaged entropy data that libjpeg only warns about (grey/garbage rows) is rejected by the
    writer with the decoder's message, so a stored image is one the loader serves."""
    data = dict(layouts)["sub0"]
    assert prepare_image(data, max_side=None, quality=90) == data
    marked = _marked(data)
    im = Image.open(io.BytesIO(marked))
    im.load()  # Pillow decodes it (grey rows from the marker on): the PIL check let it through
    with pytest.raises(Reject) as err:
        prepare_image(marked, max_side=None, quality=90)
    assert err.value.reason == "undecodable" and "Corrupt JPEG data" in err.value.detail
    assert decode.decode_problem(data) is None
    assert str(decode.decode_problem(marked)).startswith("corrupt_image")


@pytest.mark.parametrize("bad", ["empty", "png", "garbage", "soi_only", "huge_header", "zero_width"])
def test_hostile_bytes_get_a_named_reason_not_a_crash(layouts: list[tuple[str, bytes]], bad: str) -> None:
    data = dict(layouts)["sub2"]
    sof = data.index(b"\xff\xc0") + 5  # SOF0: precision, then height and width (big-endian)
    blob = {
        "empty": b"",
        "png": (lambda b: (Image.new("RGB", (40, 30), (9, 9, 9)).save(b, "PNG"), b.getvalue())[1])(io.BytesIO()),
        "garbage": bytes(random.Random(1).randrange(256) for _ in range(5000)),
        "soi_only": b"\xff\xd8\xff",
        "huge_header": data[:sof] + (65000).to_bytes(2, "big") + (65000).to_bytes(2, "big") + data[sof + 4:],
        "zero_width": data[:sof] + data[sof: sof + 2] + (0).to_bytes(2, "big") + data[sof + 4:],
    }[bad]
    for fn in (lambda: decode.decode_train(blob, size=32, rng=random.Random(0)),
               lambda: decode.decode_eval(blob, size=32)):
        if bad == "png":  # not a JPEG: PIL's path decodes it
            assert fn().shape == (32, 32, 3)
            continue
        with pytest.raises(decode.BadSample) as err:
            fn()
        want = "too_many_pixels" if bad == "huge_header" else "corrupt_image"
        assert err.value.reason == want, err.value


def test_bad_arguments_and_a_short_buffer_are_clear_errors(layouts: list[tuple[str, bytes]]) -> None:
    data = dict(layouts)["sub2"]
    w, h = _jpeg.header(data)[:2]
    buf = np.empty(w * h * 4, np.uint8)
    with pytest.raises(ValueError, match="scale_num 9"):
        _jpeg.decode(data, buf, 9, 0, 0, 8, 8)
    with pytest.raises(ValueError, match="non-empty"):
        _jpeg.decode(data, buf, 8, 5, 0, 5, 8)
    with pytest.raises(ValueError, match=rf"outside the {-(-w // 2)}x{-(-h // 2)} image at scale 4/8"):
        _jpeg.decode(data, buf, 4, 0, 0, w, h)
    with pytest.raises(BufferError, match="out holds 100 bytes"):
        _jpeg.decode(data, buf[:100], 8, 0, 0, w, h)
    with pytest.raises(TypeError):
        _jpeg.decode(data, b"read-only", 8, 0, 0, 4, 4)


def test_threads_decode_at_once_with_the_same_pixels(layouts: list[tuple[str, bytes]]) -> None:
    """The decoder runs without the GIL and each thread has its own scratch buffer: 4 threads
    decoding different images at once give what one thread gives."""
    datas = [d for _, d in layouts]
    want = [[decode.decode_train(d, size=48, scale=(0.1, 1.0), rng=random.Random(i)).copy() for i in range(8)]
            for d in datas]
    got: dict[int, list[list[np.ndarray]]] = {}

    def run(t: int) -> None:
        got[t] = [[decode.decode_train(d, size=48, scale=(0.1, 1.0), rng=random.Random(i)).copy() for i in range(8)]
                  for d in datas[t:] + datas[:t]]

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t in range(4):
        for j, crops in enumerate(got[t]):
            for a, b in zip(crops, want[(j + t) % len(datas)], strict=True):
                assert np.array_equal(a, b)


def test_decodes_reuse_one_buffer_per_thread() -> None:
    """The decoder writes into the thread's scratch buffer (no per-image allocation) and never
    hands that buffer out: two decodes in a row keep the first result intact."""
    photos = list(make_photos(2, size=(120, 90), seed=1, quality=85))
    first = decode.decode_train(photos[0], size=32, scale=(0.3, 0.5), rng=random.Random(3))
    keep = first.copy()
    buf = decode._SCRATCH.buf
    assert buf is not None and not np.shares_memory(first, buf)
    decode.decode_train(photos[1], size=32, scale=(0.3, 0.5), rng=random.Random(4))
    assert decode._SCRATCH.buf is buf  # reused, not reallocated
    np.testing.assert_array_equal(first, keep)


_FUZZ = r"""
import io, json, random, sys
from PIL import Image
from pipeline import decode
from pipeline.demo_data import make_photos
seeds = list(make_photos(3, size=(160, 120), seed=1, quality=85))
for kw in ({"progressive": True}, {"restart_marker_blocks": 2, "subsampling": 1}):
    b = io.BytesIO(); Image.open(io.BytesIO(seeds[0])).save(b, "JPEG", **kw); seeds.append(b.getvalue())
rng = random.Random(int(sys.argv[1]))
seen = {}
for it in range(int(sys.argv[2])):
    d = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        if op < 0.5:
            d[rng.randrange(len(d))] = rng.randrange(256)
        elif op < 0.7 and len(d) > 2:
            d = d[: rng.randrange(1, len(d))]
        elif op < 0.85:
            p = rng.randrange(len(d)); d[p:p] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
        else:
            d[rng.randrange(min(len(d), 700))] = rng.randrange(256)  # the headers
    for fn in (lambda: decode.decode_train(bytes(d), size=rng.choice([16, 64]), scale=(0.05, 1), rng=random.Random(it)),
               lambda: decode.decode_eval(bytes(d), size=32)):
        try:
            out = fn()
            assert out.shape[2] == 3
            r = "ok"
        except decode.BadSample as e:
            r = e.reason
        seen[r] = seen.get(r, 0) + 1
print(json.dumps(seen))
"""


def test_fuzzed_jpegs_never_crash_the_process() -> None:
    """Mutated JPEGs (bytes changed, cut, inserted; headers too) through both decode paths, in a
    child process so that a crash in C is a failure with its exit code, not a dead test run:
    each gives pixels or a BadSample (23,000 such inputs were run while writing the decoder)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _FUZZ, "7", "600"], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(seen) <= {"ok", "corrupt_image", "too_many_pixels"} and seen.get("ok", 0) > 50 and seen["corrupt_image"] > 50
