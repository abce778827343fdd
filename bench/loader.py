"""Loader throughput vs stock webdataset, and S3 streaming vs raw boto3, on the same shards.

    .venv/bin/python bench/loader.py                 # ~2-3 min on 2 cores
    .venv/bin/python bench/loader.py --images 2000 --workers 4 --rounds 3

1. images/s of ``pipeline.build_loader`` (train preset, 224 px) against the stock
   webdataset pipeline ``wds.WebDataset(urls, shardshuffle=...).shuffle(N).decode("pil")``
   + torchvision ``RandomResizedCrop(224)`` + flip + ``ToTensor``, batched by a DataLoader
   with the same worker count and batch size, on the same local shards of ~500x375 photo
   JPEGs (generated from bundled sample photos). Runs alternate; best round of each counts
   (the machine is shared; best-of is the least noisy). Goal: ratio >= 2.0. Ours runs twice:
   ``output="uint8"`` (what the Trainer consumes: it normalizes on its device, as timm's
   PrefetchLoader and FFCV do; stock's float ``ToTensor`` conversion runs on the host) and
   ``output="float"`` (normalized float32 on the host, the loader's default). A second
   comparison at ``--low-res`` (128 px) shows the regime where JPEG draft mode applies: at
   224 px from ~500x375 images a crop is never >= 2x the target on both sides, so there
   draft mode cannot reduce work without lowering quality and the gain comes from the rest
   of the pipeline (crop-before-decode geometry, no tar parsing, one batched normalize).
2. MB/s reading every shard from a moto S3 server (started here, 127.0.0.1) with our
   ``Storage.open_range`` streams (as the loader does: ``prefetch_shards`` concurrent
   streams) against raw boto3 ``download_fileobj`` of the same objects. Goal: ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline import (  # noqa: E402
    AugmentConfig,
    DataConfig,
    IOConfig,
    SourceConfig,
    build_loader,
    open_storage,
    write_dataset,
)
from pipeline.demo_data import make_photo_folder  # noqa: E402
from pipeline.format import resolve  # noqa: E402


def ours_epoch(url: str, *, workers: int, batch: int, size: int, buffer: int, epoch: int, output: str) -> float:
    cfg = DataConfig(source=SourceConfig(url=url), image_size=size, batch_size=batch, output=output, io=IOConfig(num_workers=workers, shuffle_buffer=buffer), augment=AugmentConfig(crop_scale=(0.08, 1.0)))
    ld = build_loader(cfg, rank=0, world_size=1, epoch=epoch)
    t0, n = time.perf_counter(), 0
    for x, _y in ld:
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def stock_epoch(urls: list[str], *, workers: int, batch: int, size: int, buffer: int) -> float:
    import torchvision.transforms as T
    import webdataset as wds

    tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()])
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False).shuffle(buffer).decode("pil")
          .to_tuple("jpg", "cls").map_tuple(tf, int))
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
    t0, n = time.perf_counter(), 0
    for x, _y in dl:
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_bench(local_ds: Path, shards: list[str], rounds: int, prefetch: int) -> tuple[float, float]:
    import boto3

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        st = open_storage("s3://bench/ds")
        total = 0
        for k in shards:
            st.upload_file(local_ds / k, k)
            total += (local_ds / k).stat().st_size

        def raw() -> float:
            t0 = time.perf_counter()
            for k in shards:
                buf = io.BytesIO()
                client.download_fileobj("bench", f"ds/{k}", buf)
                assert buf.getbuffer().nbytes == (local_ds / k).stat().st_size
            return total / (time.perf_counter() - t0) / 1e6

        def ours() -> float:
            import numpy as np

            from pipeline.stream import Run, iter_runs

            runs = [Run(k, np.array([0]), np.array([0]), np.array([st.size(k)])) for k in shards]
            t0 = time.perf_counter()
            got = sum(len(d) for _, d, *_ in iter_runs(st, runs, prefetch=prefetch))  # type: ignore[arg-type]
            assert got == total
            return total / (time.perf_counter() - t0) / 1e6

        r, o = [], []
        for _ in range(rounds):
            r.append(raw())
            o.append(ours())
        print(f"  S3 read: boto3 download_fileobj {r} MB/s, ours {o} MB/s")
        return max(o), max(r)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--buffer", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--low-res", type=int, default=128,
                    help="also compare at this size, where crops are >= 2x the target and JPEG draft mode "
                         "(DCT-domain downscaling) applies; 0 to skip")
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--skip-loader", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        t0 = time.perf_counter()
        src = make_photo_folder(Path(tmp) / "src", n=a.images, num_classes=10)
        info = write_dataset(src, str(Path(tmp) / "ds"), samples_per_shard=a.shard_size, workers=a.workers,
                             progress=False)
        ds = Path(tmp) / "ds"
        vds = Path(resolve(str(ds)).root_url)  # the published version's folder (pipeline.format)
        shards = sorted(f"shards/{p.name}" for p in (vds / "shards").iterdir())
        mb = info["splits"]["train"]["bytes"] / 1e6
        print(f"data: {a.images} photo JPEGs (~500x375) in {len(shards)} shards, {mb:.1f} MB "
              f"(prepared in {time.perf_counter() - t0:.1f}s); workers={a.workers} batch={a.batch} size={a.size}")
        urls = [str(vds / s) for s in shards]
        sizes = [] if a.skip_loader else [a.size] + ([a.low_res] if a.low_res else [])
        for size in sizes:
            runs: dict[str, list[float]] = {"uint8": [], "float": [], "stock": []}
            for r in range(a.rounds):
                for out in ("uint8", "float"):
                    runs[out].append(ours_epoch(str(ds), workers=a.workers, batch=a.batch, size=size,
                                                buffer=a.buffer, epoch=r, output=out))
                runs["stock"].append(stock_epoch(urls, workers=a.workers, batch=a.batch, size=size, buffer=a.buffer))
                print(f"  {size}px round {r}: ours uint8 {runs['uint8'][-1]:.0f} img/s, ours float "
                      f"{runs['float'][-1]:.0f} img/s, stock webdataset {runs['stock'][-1]:.0f} img/s")
            best = {k: max(v) for k, v in runs.items()}
            goal = " (goal >= 2.0)" if size == a.size else " (draft-mode regime)"
            print(f"loader images/s at {size}px: ours {best['uint8']:.0f} (uint8 out, normalized on the device "
                  f"as the Trainer does) vs stock webdataset {best['stock']:.0f} -> ratio "
                  f"{best['uint8'] / best['stock']:.2f}{goal}")
            print(f"loader images/s at {size}px: ours {best['float']:.0f} (normalized float32 on the host) vs stock "
                  f"webdataset {best['stock']:.0f} -> ratio {best['float'] / best['stock']:.2f}")
        if not a.skip_s3:
            o, r = s3_bench(vds, shards, a.rounds, prefetch=2)
            print(f"S3 read MB/s: ours {o:.1f} vs boto3 download_fileobj {r:.1f} -> ratio {o / r:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
