"""Cost of integrity checks in the loader: per-sample sha256 (the whole-shard sha256 runs only where
images have no per-sample digests, so not here).

``python bench/verify.py [--images 400] [--size 224] [--workers 0]``

Baseline: the same loader, same process, same photo shards (~500x375 JPEGs) with the checks
switched off on the loader's metadata (no per-sample digests, no whole-shard check). Prints
the per-sample check cost in microseconds (sha256 of the bytes already in memory + compare),
and epoch throughput with and without all checks.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline import DataConfig, IOConfig, SourceConfig, build_loader, write_dataset  # noqa: E402
from pipeline.demo_data import make_photo_folder  # noqa: E402
from pipeline.format import resolve  # noqa: E402


def epoch(url: str, *, size: int, workers: int, checks: bool, epoch_no: int) -> float:
    cfg = DataConfig(source=SourceConfig(url=url), image_size=size, batch_size=32, output="uint8", io=IOConfig(num_workers=workers))
    ld = build_loader(cfg, rank=0, world_size=1, epoch=epoch_no)
    if not checks:  # the baseline: same loader, no per-sample hash, no whole-shard hash
        ld.meta.verify_samples = False
        ld.meta.shard_bytes = None
    t0, n = time.perf_counter(), 0
    for x, _y in ld:
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_verify_") as tmp:
        src = make_photo_folder(Path(tmp) / "src", n=a.images, num_classes=10)
        url = str(Path(tmp) / "ds")
        write_dataset(src, url, samples_per_shard=100, progress=False)
        ld = build_loader(DataConfig(source=SourceConfig(url=url), image_size=a.size, batch_size=32, io=IOConfig(num_workers=0)), rank=0, world_size=1)
        vds = Path(resolve(url).root_url)
        st = ld.meta
        blobs = []
        for i in range(min(200, st.num_samples)):
            shard = vds / st.shard_names[int(st.shard_of[i])]
            with open(shard, "rb") as f:
                f.seek(int(st.offsets[i]))
                blobs.append(f.read(int(st.sizes[i])))
        mean_kb = sum(map(len, blobs)) / len(blobs) / 1e3
        t0 = time.perf_counter()
        reps = 20
        for _ in range(reps):
            for i, b in enumerate(blobs):
                assert hashlib.sha256(b).digest() == st.digests[i].tobytes()
        per_sample_us = (time.perf_counter() - t0) / (reps * len(blobs)) * 1e6
        print(f"per-sample check: {per_sample_us:.1f} us per {mean_kb:.0f} KB JPEG "
              f"({per_sample_us / mean_kb * 1e3:.2f} us/MB)")
        on, off = [], []
        for r in range(a.rounds):
            off.append(epoch(url, size=a.size, workers=a.workers, checks=False, epoch_no=r))
            on.append(epoch(url, size=a.size, workers=a.workers, checks=True, epoch_no=r))
        print(f"loader images/s at {a.size}px, workers={a.workers}: with checks {max(on):.0f} vs without "
              f"{max(off):.0f} -> ratio {max(on) / max(off):.3f} (per-sample sha256; the size check)")


if __name__ == "__main__":
    main()
