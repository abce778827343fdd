"""Per-rank metadata cost at start-up: format 3 (shard table; a shard's rows when it is opened)
against format 2, today's path until this change (every rank reads every sample row).

    .venv/bin/python bench/metadata.py                      # 1M and 14M measured, 300M (see below)
    .venv/bin/python bench/metadata.py --sizes 1e6 --big 0  # quick

For each size N a metadata-only dataset (``python -m pipeline.demo_data metadata``: realistic
rows, no images; 1000 samples per shard, 21,843 classes, 1 % val) is written twice: as format 3
and as format 2 (one ``samples.parquet``, what the writer produced before). Then one fresh
process per (size, format) plays rank 0 of ``--world`` ranks (2 loader workers, batch 256): it
imports everything, notes its RSS and bytes read so far, and then

* before (format 2): ``load_meta`` (its format-2 path is the old code: the whole samples table,
  checked as one blob, filtered, sorted, per-sample arrays) and the old plan as the old loader
  built it before its first batch: the epoch's id array (``Loader.plan``), then every worker's
  emission order, read list and shard runs (``ShardStream.whole_checked``) -- copied below from
  the previous ``pipeline/plan.py`` / ``pipeline/loader/dataset.py`` so both run in this script;
* after (format 3): ``build_loader`` (shard table + plan), ``ShardStream.whole_checked``, then the
  first batch's metadata: worker 0's slot cursor and its first shard's rows file, read and checked.

It prints the peak RSS growth over the post-import baseline (VmHWM - VmRSS: the metadata's
memory; the imports, torch included, are ~1 GB on every rank either way), the time to the first
batch's metadata and the bytes read from storage (``/proc/self/io`` rchar growth). Goal at 300M:
after <= 200 MB and <= 1 % of before's bytes. ``--big`` (300M by default) is measured for the
after path with the shard table alone (``--index-only``: writing 300M rows files is ~19 GB of
disk), plus the rows file of one shard as measured at 14M (its cost does not depend on N); the
before path at ``--big`` is extrapolated linearly from the measured sizes (it cannot run here:
~43 GB at 144 B/sample).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORLD = 8
WORKERS = 2
BATCH = 256
SHUFFLE = 512
CLASSES = 21843


# ----------------------------------------------------------------------------- the child
def _proc() -> tuple[float, float, int]:
    """(VmRSS MB, VmHWM MB, rchar bytes) of this process."""
    status = {ln.split(":")[0]: ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("Vm")}
    rchar = next(int(ln.split()[1]) for ln in open("/proc/self/io") if ln.startswith("rchar"))
    return int(status["VmRSS"]) / 1e3, int(status["VmHWM"]) / 1e3, rchar


def _old_first_batch_plan(meta: object, rank: int, world: int) -> int:
    """The previous loader's planning before its first batch (pipeline/plan.py and
    ShardStream.slot_work / whole_checked of commit 21c6bad): materialised id arrays."""
    import random
    from dataclasses import dataclass

    import numpy as np

    from pipeline.plan import mix

    def shuffle_buffer_order(seq: np.ndarray, buffer: int, seed: int) -> np.ndarray:
        if buffer <= 1 or len(seq) <= 1:
            return seq.copy()
        rnd = random.Random(seed)
        buf = list(seq[:buffer])
        out = []
        b = len(buf)
        for x in seq[buffer:].tolist():
            j = int(rnd.random() * b)
            out.append(buf[j])
            buf[j] = x
        rnd.shuffle(buf)
        out.extend(buf)
        return np.asarray(out, dtype=np.int64)

    @dataclass(frozen=True)
    class Run:
        shard: str
        ids: np.ndarray
        offsets: np.ndarray
        sizes: np.ndarray

    shard_start = meta.shard_start  # type: ignore[attr-defined]
    n = len(shard_start) - 1
    perm = np.random.default_rng(mix(0, 0, 0x5A4D)).permutation(n)
    order = np.concatenate([np.arange(shard_start[s], shard_start[s + 1], dtype=np.int64) for s in perm])
    S = world * WORKERS
    L = (len(order) // (S * BATCH)) * BATCH
    runs = 0
    for w in range(WORKERS):
        slot = rank * WORKERS + w
        seq = order[slot * L:(slot + 1) * L]
        emission = shuffle_buffer_order(seq, SHUFFLE, mix(0, 0, 0, slot, 0xB0F))
        stream = seq[np.isin(seq, emission)]
        sh = meta.shard_of[stream]  # type: ignore[attr-defined]
        for part in np.split(stream, np.flatnonzero(np.diff(sh)) + 1):
            Run(meta.shard_names[int(meta.shard_of[part[0]])], part, meta.offsets[part],  # type: ignore[attr-defined]
                meta.sizes[part])  # type: ignore[attr-defined]
            runs += 1
    return runs


def child(url: str, mode: str, warm: str) -> None:
    # Imports and one-time set-up happen before the baseline (a training process has them
    # anyway): the same steps on a 10,000-sample dataset of the same format first.
    first_batch_metadata(warm, mode)
    rss0, _, read0 = _proc()
    out = first_batch_metadata(url, mode, read0)
    rss1, hwm, read1 = _proc()
    out.update(peak_mb=hwm - rss0, held_mb=rss1 - rss0, read_bytes=read1 - read0, base_mb=rss0)
    print("RESULT " + json.dumps(out))


def first_batch_metadata(url: str, mode: str, read0: int = 0) -> dict[str, float]:
    from pipeline import DataConfig, IOConfig, SourceConfig, build_loader
    from pipeline.loader import ShardStream, load_meta
    from pipeline.storage import open_storage

    t0 = time.perf_counter()
    out: dict[str, float] = {}
    if mode == "before":
        meta = load_meta(url, "train")
        out["runs"] = _old_first_batch_plan(meta, 0, WORLD)
    else:
        cfg = DataConfig(source=SourceConfig(url=url), batch_size=BATCH,
                         io=IOConfig(num_workers=WORKERS, shuffle_buffer=SHUFFLE))
        ld = build_loader(cfg, rank=0, world_size=WORLD)
        ds = ShardStream(cfg, ld.meta, ld.plan(), 0, 0)
        out["whole"] = len(ds.whole_checked())
        out["plan_s"], out["plan_read"] = time.perf_counter() - t0, _proc()[2] - read0
        if mode == "after":  # the first batch's metadata: worker 0's cursor and first shard's rows
            t, r = time.perf_counter(), _proc()[2]
            _, cur = ds.slot_work(0)
            first = next(ds._runs(cur))
            out["first_rows"] = len(ld.meta.rows(first.index, open_storage(ld.meta.root_url)))
            out["rows_s"], out["rows_read"] = time.perf_counter() - t, _proc()[2] - r
    out["seconds"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- the driver
def measure(url: str, mode: str, warm: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, __file__, "--child", url, mode, warm], env=env, capture_output=True,
                       text=True, timeout=3600)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"child {mode} {url} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(line[7:])


def make(tmp: Path, n: int, layout: int, index_only: bool = False) -> str:
    from pipeline.demo_metadata import make_metadata_dataset

    url = str(tmp / f"n{n}-f{layout}{'-index' if index_only else ''}")
    if Path(url).exists():
        return url
    t0 = time.perf_counter()
    make_metadata_dataset(url, samples=n, samples_per_shard=1000, val_fraction=0.01, num_classes=CLASSES,
                          layout=layout, index_only=index_only)
    print(f"  wrote {url} in {time.perf_counter() - t0:.0f}s", flush=True)
    return url


def fmt_row(n: int, b: dict[str, float], a: dict[str, float], note: str = "") -> str:
    return (f"| {n / 1e6:g}M | {b['peak_mb']:.0f} MB | {a['peak_mb']:.1f} MB | {b['seconds']:.2f} s | "
            f"{a['seconds']:.3f} s | {b['read_bytes'] / 1e6:.1f} MB | {a['read_bytes'] / 1e6:.2f} MB | "
            f"{100 * a['read_bytes'] / b['read_bytes']:.3f} % |{note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e6,14e6", help="sample counts measured both ways")
    ap.add_argument("--big", type=float, default=300e6, help="after measured (shard table), before extrapolated; 0: skip")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    sizes = [int(float(x)) for x in a.sizes.split(",")]
    rows = []
    measured: list[tuple[int, dict[str, float], dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="bench_metadata_") as tmp:
        warm = {layout: make(Path(tmp), 10_000, layout) for layout in (2, 3)}
        for n in sizes:
            print(f"N = {n:,}", flush=True)
            before = measure(make(Path(tmp), n, 2), "before", warm[2])
            after = measure(make(Path(tmp), n, 3), "after", warm[3])
            print(f"  before {before}\n  after  {after}", flush=True)
            measured.append((n, before, after))
            rows.append(fmt_row(n, before, after))
        if a.big:
            big = int(a.big)
            plan = measure(make(Path(tmp), big, 3, index_only=True), "plan", warm[3])
            (n1, b1, _), (n2, b2, a2) = measured[0], measured[-1]
            est = {k: b1[k] + (b2[k] - b1[k]) * (big - n1) / max(1, n2 - n1) for k in ("peak_mb", "seconds", "read_bytes")}
            after = {"peak_mb": plan["peak_mb"], "seconds": plan["seconds"] + a2["rows_s"],
                     "read_bytes": plan["read_bytes"] + a2["rows_read"]}
            print(f"  {big:,}: after, shard table {plan}; + one shard's rows as at {n2:,}; before extrapolated {est}")
            rows.append(fmt_row(big, est, after, " before: extrapolated; after: shard table measured, plus one "
                                               f"rows file as at {n2 / 1e6:g}M"))
    print(f"\nrank 0 of {WORLD}, {WORKERS} workers, batch {BATCH}; per-rank peak RSS growth over the post-import "
          "baseline, time to the first batch's metadata, bytes read at start")
    print("| samples | before RSS | after RSS | before time | after time | before read | after read | after/before read |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
