"""Small, real image sets built from images bundled with scikit-learn / scikit-image.

* :func:`make_digits_folder` - an ImageNet-21k-style folder (``dst/<class>/<image>.jpg``) of
  scikit-learn's 1797 handwritten digits (8x8 grayscale, upsampled, saved as RGB JPEG); with
  ``unlabelled`` a plain folder of the images (``dst/<image>.jpg``, no classes) for
  ``write_shards --unlabelled``.
* :func:`make_digits_manifest` - the same digits as a JFT-style multi-label manifest
  (``manifest.parquet`` with ``path`` and ``labels`` columns: the digit, parity, and "big").
* :func:`make_photo_folder` - realistic ~500x375 photo JPEGs (random crops, resizes, flips and
  colour shifts of the bundled sample photographs), for decode tests and loader benchmarks.
* ``metadata``: a metadata-only dataset of any size (shard table and per-sample rows, no
  images) for planning and scale tests: :func:`pipeline.demo_metadata.make_metadata_dataset`.

CLI::

    python -m pipeline.demo_data digits /tmp/digits --image-size 32
    python -m pipeline.demo_data digits /tmp/digits-raw --unlabelled   # images only, no class folders
    python -m pipeline.demo_data photos /tmp/photos --n 1500
    python -m pipeline.demo_data manifest /tmp/digits_ml
    python -m pipeline.demo_data metadata /tmp/i21k-meta --samples 14000000 --samples-per-shard 1000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target  # (N, 8, 8) float 0..16, (N,)


def _digit_image(img8: np.ndarray, image_size: int) -> Image.Image:
    arr = (img8 * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L").resize((image_size, image_size), Image.BICUBIC).convert("RGB")


def make_digits_folder(dst: str | Path, *, image_size: int = 32, limit: int | None = None,
                       unlabelled: bool = False) -> Path:
    """Write scikit-learn's digits as ``dst/<digit>/<n>.jpg`` (classes "0".."9"), or as
    ``dst/<n>.jpg`` when ``unlabelled`` (no folder tells the digit); return ``dst``."""
    dst = Path(dst)
    images, target = _digits()
    n = len(images) if limit is None else min(limit, len(images))
    dst.mkdir(parents=True, exist_ok=True)
    for c in range(0 if unlabelled else 10):
        (dst / str(c)).mkdir(exist_ok=True)
    for i in range(n):
        folder = dst if unlabelled else dst / str(int(target[i]))
        _digit_image(images[i], image_size).save(folder / f"{i:05d}.jpg", quality=95)
    return dst


def make_digits_manifest(dst: str | Path, *, image_size: int = 32, limit: int | None = None) -> Path:
    """A JFT-style multi-label manifest of the digits; returns the ``manifest.parquet`` path.

    Labels per image: the digit name ("0".."9"), "even"/"odd", and "big" for digits >= 5, so
    every image has 2 or 3 labels out of 13 classes.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    dst = Path(dst)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    images, target = _digits()
    n = len(images) if limit is None else min(limit, len(images))
    paths, labels = [], []
    for i in range(n):
        rel = f"images/{i:05d}.jpg"
        _digit_image(images[i], image_size).save(dst / rel, quality=95)
        d = int(target[i])
        lab = [str(d), "even" if d % 2 == 0 else "odd"] + (["big"] if d >= 5 else [])
        paths.append(rel)
        labels.append(lab)
    out = dst / "manifest.parquet"
    pq.write_table(pa.table({"path": paths, "labels": labels}), out)
    return out


def _source_photos() -> list[np.ndarray]:
    """Bundled colour photographs (no download): sklearn's two samples + skimage's locals."""
    photos: list[np.ndarray] = []
    try:
        from sklearn.datasets import load_sample_images

        photos += list(load_sample_images().images)
    except Exception:  # noqa: BLE001 - optional source
        pass
    try:
        import skimage.data as sd

        for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field"):
            try:
                a = getattr(sd, name)()
            except Exception:  # noqa: BLE001 - some images need a download; skip those
                continue
            if a.ndim == 3 and a.shape[2] == 3:
                photos.append(a)
    except ImportError:
        pass
    if not photos:
        raise RuntimeError("no bundled sample photographs found (install scikit-learn or scikit-image)")
    return photos


def make_photos(n: int, *, size: tuple[int, int] = (500, 375), seed: int = 0, quality: int = 90) -> list[bytes]:
    """``n`` distinct JPEG byte strings of about ``size`` (w, h): crops of real photographs."""
    rng = np.random.default_rng(seed)
    srcs = [Image.fromarray(p) for p in _source_photos()]
    out = []
    for _ in range(n):
        src = srcs[int(rng.integers(len(srcs)))]
        w, h = src.size
        s = rng.uniform(0.35, 1.0)
        cw, ch = int(w * s), int(h * s)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        tw, th = size if rng.random() < 0.75 else (size[1], size[0])  # some portrait
        tw, th = int(tw * rng.uniform(0.9, 1.1)), int(th * rng.uniform(0.9, 1.1))
        im = src.resize((tw, th), Image.BILINEAR, box=(x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(im, dtype=np.float32) * rng.uniform(0.8, 1.2, size=3) + rng.uniform(-20, 20)
        im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        import io

        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def make_photo_folder(dst: str | Path, *, n: int = 1000, num_classes: int = 10, size: tuple[int, int] = (500, 375),
                      seed: int = 0, quality: int = 90) -> Path:
    """An I21k-style folder of ``n`` photo JPEGs spread over ``num_classes`` classes; returns ``dst``."""
    dst = Path(dst)
    for i, data in enumerate(make_photos(n, size=size, seed=seed, quality=quality)):
        d = dst / f"c{i % num_classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.jpg").write_bytes(data)
    return dst


def make_index_folder(dst: str | Path, *, n: int, num_classes: int = 10, image_size: int = 16) -> Path:
    """Solid-colour JPEGs whose colour encodes their index ``i`` (< 4096); class ``i % num_classes``.

    Any crop, flip or resize keeps the colour, so :func:`decode_index` recovers which source
    image a loader row came from: exactly-once and resume tests use it. Files are
    ``dst/c<class>/<i>.jpg``.
    """
    if n > 4096:
        raise ValueError(f"n={n}: at most 4096 indices fit in the 16-level colour code")
    dst = Path(dst)
    for i in range(n):
        d = dst / f"c{i % num_classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        rgb = tuple(int(((i >> (4 * k)) & 15) * 16 + 8) for k in range(3))
        Image.new("RGB", (image_size, image_size), rgb).save(d / f"{i:05d}.jpg", quality=95)
    return dst


def decode_index(images: np.ndarray | object, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 std: tuple[float, ...] = (0.5, 0.5, 0.5)) -> np.ndarray:
    """Indices encoded by :func:`make_index_folder` from a normalized ``(B, 3, S, S)`` batch."""
    x = np.asarray(images, dtype=np.float64)
    b, _, h, w = x.shape
    px = x[:, :, h // 2, w // 2] * np.asarray(std) + np.asarray(mean)  # (B, 3) in [0, 1]
    levels = np.clip(np.round((px * 255 - 8) / 16), 0, 15).astype(np.int64)
    return levels[:, 0] + 16 * levels[:, 1] + 256 * levels[:, 2]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.demo_data", description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=["digits", "photos", "manifest", "metadata"])
    ap.add_argument("dst")
    ap.add_argument("--image-size", type=int, default=32, help="digits: side in pixels")
    ap.add_argument("--limit", type=int, default=None, help="digits: at most this many images")
    ap.add_argument("--unlabelled", action="store_true", help="digits: a plain folder of images, no class "
                    "folders (write it with python -m pipeline.write_shards SRC DEST --unlabelled)")
    ap.add_argument("--n", type=int, default=1000, help="photos: number of images")
    ap.add_argument("--num-classes", type=int, default=None, help="photos (10), metadata (1000): number of classes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=1_000_000, help="metadata: number of samples")
    ap.add_argument("--samples-per-shard", type=int, default=1000, help="metadata: samples per shard")
    ap.add_argument("--val-fraction", type=float, default=0.0, help="metadata: fraction in split 'val'")
    ap.add_argument("--multi-label", action="store_true", help="metadata: 1-3 labels per sample")
    ap.add_argument("--layout", type=int, choices=[2, 3], default=3, help="metadata: dataset format (2: one "
                    "samples.parquet, as written before format 3)")
    ap.add_argument("--index-only", action="store_true", help="metadata: the shard table only, no rows files")
    a = ap.parse_args(argv)
    if a.unlabelled and a.kind != "digits":
        ap.error(f"--unlabelled makes an unlabelled digits folder; not available for {a.kind!r}")
    if a.kind == "digits":
        out = make_digits_folder(a.dst, image_size=a.image_size, limit=a.limit, unlabelled=a.unlabelled)
    elif a.kind == "manifest":
        out = make_digits_manifest(a.dst, image_size=a.image_size, limit=a.limit)
    elif a.kind == "metadata":
        from .demo_metadata import make_metadata_dataset

        info = make_metadata_dataset(a.dst, samples=a.samples, samples_per_shard=a.samples_per_shard,
                                     val_fraction=a.val_fraction, num_classes=a.num_classes or 1000,
                                     multi_label=a.multi_label, seed=a.seed, layout=a.layout,
                                     index_only=a.index_only)
        out = f"{a.dst} (version {info['dataset_version']}, format {info['version']}, {info['counts']})"
    else:
        out = make_photo_folder(a.dst, n=a.n, num_classes=a.num_classes or 10, seed=a.seed)
    print(out)


if __name__ == "__main__":
    main()
