"""Dataset metadata that scales (issue #31): a rank's start-up is O(shards), not O(samples).

* a rank of a 5M-sample dataset (metadata-only, ``pipeline.demo_data metadata``) builds its
  loader, plans the epoch and reads its first shard's rows in a bounded memory and read budget
  (a subprocess's own RSS and /proc/self/io: real numbers, no estimates);
* the plan's O(shards) representation gives exactly the orders of the materialised reference;
* the ranks of a node download the shard table once (moto S3, concurrent processes);
* a format-2 dataset still loads (and says how to upgrade), ``python -m pipeline.reindex``
  upgrades it without touching a tar, and the loader then yields the same batches;
* an interrupted format-2 write resumes as format 3 without re-encoding; the writer hands no
  sample rows to its driver.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import DataConfig, IOConfig, SourceConfig, build_loader, write_dataset
from pipeline import format as fmt
from pipeline.demo_data import decode_index, make_index_folder
from pipeline.demo_metadata import make_metadata_dataset
from pipeline.plan import EpochPlan, consumed_ids, epoch_order, remaining_order, resume_slot

ROOT = Path(__file__).resolve().parents[1]

#: One rank of 8 (2 workers, batch 256): imports and a warm-up on a small dataset first (a training
#: process has those anyway), then the loader on the big one: shard table, plan, the shards its epoch
#: checks whole, and worker 0's first shard's rows. Prints the growth of peak RSS and of bytes read.
RANK = """
import json, sys, time
from pipeline import DataConfig, IOConfig, SourceConfig, build_loader
from pipeline.loader import ShardStream
from pipeline.storage import open_storage

def proc():
    vm = {l.split(':')[0]: int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('Vm')}
    io = {l.split(':')[0]: int(l.split()[1]) for l in open('/proc/self/io')}
    return vm['VmRSS'] / 1e3, vm['VmHWM'] / 1e3, io['rchar']

def plan(url):
    cfg = DataConfig(source=SourceConfig(url=url), batch_size=256, io=IOConfig(num_workers=2, shuffle_buffer=512))
    ld = build_loader(cfg, rank=0, world_size=8)
    ds = ShardStream(cfg, ld.meta, ld.plan(), 0, 0)
    ds.whole_checked()
    _, cur = ds.slot_work(0)
    return ld, next(ds._runs(cur))

def first_rows(ld, run):
    return len(ld.meta.rows(run.index, open_storage(ld.meta.root_url)))

first_rows(*plan(sys.argv[2]))
rss0, _, read0 = proc()
t0 = time.perf_counter()
ld, run = plan(sys.argv[1])
_, plan_hwm, plan_read = proc()
rows = first_rows(ld, run)
seconds = time.perf_counter() - t0
_, hwm, read1 = proc()
print(json.dumps({"plan_mb": plan_hwm - rss0, "plan_read_mb": (plan_read - read0) / 1e6, "peak_mb": hwm - rss0,
                  "read_mb": (read1 - read0) / 1e6, "seconds": seconds, "samples": ld.meta.num_samples,
                  "batches": len(ld), "rows": rows}))
"""


def _rank(url: str, warm: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", RANK, url, warm], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_a_rank_of_a_5m_sample_dataset_starts_in_bounded_memory_and_reads(tmp_path: Path) -> None:
    n = 5_000_000
    big = str(tmp_path / "big")
    warm = str(tmp_path / "warm")
    # few, large shards: the shard table is tiny, so anything per sample stands out
    make_metadata_dataset(big, samples=n, samples_per_shard=50_000, num_classes=21843)
    make_metadata_dataset(warm, samples=20_000, samples_per_shard=2_000, num_classes=21843)
    r = _rank(big, warm)
    print(f"rank of {n:,} samples: {r}")
    assert r["samples"] == n and r["rows"] == 50_000 and r["batches"] == n // (8 * 2 * 256) * 2
    # Loading the shard table and planning: nothing per sample. Format 2 (every sample row on every
    # rank) grew a rank by ~430 B/sample (2 GB here); a single int64 per sample would be 40 MB.
    assert r["plan_mb"] < 10, f"loading + planning 5M samples grew the rank by {r['plan_mb']:.1f} MB"
    assert r["plan_read_mb"] < 0.1, f"{r['plan_read_mb']:.2f} MB read for a shard table of 100 rows"
    # ... then worker 0's first shard's rows file (~3 MB; parsing it is ~25 MB of allocator
    # granularity, whatever the dataset's size): the per-rank goal is 200 MB at 300M.
    assert r["peak_mb"] < 200, f"the first batch's metadata grew the rank by {r['peak_mb']:.0f} MB"
    assert r["read_mb"] < 6, f"a rank read {r['read_mb']:.1f} MB at start (format 2: ~270 MB here)"


# ----------------------------------------------------------------------------- plan
@pytest.mark.parametrize("seed", range(4))
def test_compact_plan_equals_the_materialised_one(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(20):
        start = np.concatenate([[0], np.cumsum(rng.integers(0, 80, rng.integers(1, 10)))])
        train = bool(rng.integers(2))
        world, workers, batch = (int(x) for x in rng.integers(1, 4, 3))
        p = EpochPlan(epoch_order(start, seed=seed, epoch=1, train=train), world, workers, batch, train, seed, 1, 0,
                      int(rng.choice([0, 8, 64])))
        order = p.order.ids()
        for k in range(p.batches_per_rank + 1):
            # the elastic remainder: the epoch's order minus everything consumed, in order
            rest = order[~np.isin(order, consumed_ids(p, k))]
            assert np.array_equal(remaining_order(p, k).ids(), rest)
        for slot in range(p.num_slots):
            full = p.slot_emission(slot)
            for done in range(p.batches_per_slot + 1):
                cur = resume_slot(p, slot, done * batch)
                assert np.array_equal(np.fromiter(cur.emission, np.int64), full[done * batch:])
                left = full[done * batch:]
                reads = np.concatenate([cur.buffered, cur.tail.ids()])
                assert sorted(reads.tolist()) == sorted(left[left >= 0].tolist())  # read once, nothing else


# ----------------------------------------------------------------------------- node cache
#: One rank of a node: loads the shard table through the node cache and says whether it downloaded it.
CACHED_RANK = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from pipeline.loader import load_meta
print("SAMPLES", load_meta(sys.argv[1], "train").num_samples)
"""


@pytest.mark.integration
def test_the_ranks_of_a_node_download_the_shard_table_once(s3_bucket: str, tmp_path: Path) -> None:
    url = f"s3://{s3_bucket}/ds"
    write_dataset(make_index_folder(tmp_path / "src", n=60, image_size=16), url, samples_per_shard=7,
                  progress=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    ranks = [subprocess.Popen([sys.executable, "-c", CACHED_RANK, url], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in ranks]
    assert all(p.returncode == 0 and "SAMPLES 60" in o for p, o in zip(ranks, outs, strict=True)), outs
    assert sum(o.count("metadata cache: downloaded") for o in outs) == 1, outs  # one download per node
    cache = tmp_path / f"vitscale-meta-{os.geteuid()}"
    want = fmt.resolve(url).manifest["files"]["index.parquet"]["sha256"]
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [want]  # no temp files
    # a damaged cached copy is noticed (every read is checked) and replaced by a fresh download
    (cache / want).write_bytes(b"garbage")
    out = subprocess.run([sys.executable, "-c", CACHED_RANK, url], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "SAMPLES 60" in out.stdout and "is damaged; removing it" in out.stderr, out.stderr
    assert hashlib.sha256((cache / want).read_bytes()).hexdigest() == want


# ----------------------------------------------------------------------------- old datasets
def _to_format2(ds: Path) -> None:
    """Rewrite the published version's metadata as format 2 wrote it: one samples.parquet, no rows files."""
    res = fmt.resolve(str(ds))
    v = Path(res.root_url)
    samples = fmt.read_samples(res)
    pq.write_table(samples, v / "samples.parquet")
    index = fmt.read_index(res).drop_columns(list(fmt.ROWS_COLUMNS))
    pq.write_table(index, v / "index.parquet")
    shutil.rmtree(v / "samples")
    info = dict(res.manifest)
    info.update(version=2, samples_file="samples.parquet")
    info["files"] = {**info["files"], **{n: fmt.file_entry((v / n).read_bytes())
                                         for n in ("index.parquet", "samples.parquet")}}
    for p in (v / "dataset.json", ds / "dataset.json"):
        p.write_text(json.dumps(info, indent=2))


def _epoch(ds: Path) -> list[np.ndarray]:
    cfg = DataConfig(source=SourceConfig(url=str(ds)), image_size=16, batch_size=8,
                     io=IOConfig(num_workers=0, shuffle_buffer=16))
    return [decode_index(b[0].numpy()) for b in build_loader(cfg, rank=1, world_size=2)]


def test_reindex_upgrades_a_format2_dataset_in_place_and_batches_stay_the_same(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.reindex import main as reindex_main

    ds = tmp_path / "ds"
    write_dataset(make_index_folder(tmp_path / "src", n=200, image_size=16), str(ds), samples_per_shard=30,
                  val_fraction=0.1, progress=False)
    fresh = _epoch(ds)
    _to_format2(ds)
    version = fmt.resolve(str(ds)).version
    tars = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (ds / "versions" / version / "shards").iterdir()}
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        old = _epoch(ds)  # read compatibly: every row at start
    assert f"python -m pipeline.reindex {ds}" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(old, fresh, strict=True))
    reindex_main([str(ds)])
    assert f"version {version} is format 3" in capsys.readouterr().out
    res = fmt.resolve(str(ds))
    assert (res.version, res.manifest["version"], fmt.format_of(res.manifest)) == (version, 3, 3)
    assert "samples.parquet" not in res.manifest["files"] and (Path(res.root_url) / "samples.parquet").exists()
    assert tars == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (Path(res.root_url) / "shards").iterdir()}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.loader"):
        new = _epoch(ds)
    assert "format-2" not in caplog.text
    assert len(new) == len(fresh) and all(np.array_equal(a, b) for a, b in zip(new, fresh, strict=True))
    reindex_main([str(ds)])  # already format 3: nothing to do


def test_reindex_refuses_a_format1_dataset_naming_the_rewrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.reindex import main as reindex_main

    ds = tmp_path / "ds"
    write_dataset(make_index_folder(tmp_path / "src", n=40, image_size=16), str(ds), samples_per_shard=20,
                  progress=False)
    info = json.loads((ds / "dataset.json").read_text())
    for k in ("dataset_version", "files"):
        info.pop(k)
    (ds / "dataset.json").write_text(json.dumps({**info, "version": 1}))
    (ds / "index.parquet").write_bytes(b"")  # format 1 keeps its metadata at the root
    with pytest.raises(SystemExit) as e:
        reindex_main([str(ds)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "format-1 dataset" in err and "pipeline.write_shards SRC DEST --overwrite" in err


def test_a_format2_write_resumes_as_format3_without_reencoding(tmp_path: Path) -> None:
    src = make_index_folder(tmp_path / "src", n=90, image_size=16)
    ds = tmp_path / "ds"
    write_dataset(src, str(ds), samples_per_shard=30, progress=False)
    res = fmt.resolve(str(ds))
    v = Path(res.root_url)
    rows_before = {p.name: p.read_bytes() for p in (v / "samples").iterdir()}
    marker = v / "markers" / "train-000001.tar.json"
    m = json.loads(marker.read_text())
    # what format 2's writer left: sample rows inside the marker, no rows file
    m["samples"] = [{**r, "sha256": r["sha256"].hex()} for r in fmt.read_samples(res).to_pylist()
                    if r["shard"] == "shards/train-000001.tar"]
    for k in fmt.ROWS_COLUMNS:
        del m["shard"][k]
    marker.write_text(json.dumps(m))
    (v / "samples" / "train-000001.parquet").unlink()
    tar_mtime = (v / "shards" / "train-000001.tar").stat().st_mtime_ns
    info = write_dataset(src, str(ds), samples_per_shard=30, progress=False)
    assert info["summary"]["shards_resumed"] == 3 and info["dataset_version"] == res.version
    assert (v / "shards" / "train-000001.tar").stat().st_mtime_ns == tar_mtime  # not re-encoded
    assert {p.name: p.read_bytes() for p in (v / "samples").iterdir()} == rows_before
    assert "samples" not in json.loads(marker.read_text())


def test_write_shard_hands_no_sample_rows_to_the_driver(tmp_path: Path) -> None:
    from pipeline.shards import WriteSettings, plan_dataset, write_shard

    plan = plan_dataset(make_index_folder(tmp_path / "src", n=12, image_size=16), str(tmp_path / "ds"),
                        WriteSettings(samples_per_shard=5))
    r = write_shard(plan.jobs[0], plan.vdest, plan.options)
    assert set(r) == {"shard", "rejects", "plan", "resumed"} and r["shard"]["samples"] == 5
    assert len(json.dumps(r)) < 1000  # O(1) per shard, whatever its sample count


# ----------------------------------------------------------------------------- generator
def test_metadata_only_generator_writes_loadable_layouts(tmp_path: Path) -> None:
    kw = {"samples": 12_345, "samples_per_shard": 1000, "val_fraction": 0.1, "num_classes": 50,
          "multi_label": True, "seed": 3}
    v3 = make_metadata_dataset(tmp_path / "v3", **kw)
    v2 = make_metadata_dataset(tmp_path / "v2", layout=2, **kw)
    assert (v3["version"], v2["version"], v3["counts"]) == (3, 2, {"train": 11111, "val": 1234})
    a, b = (fmt.read_samples(fmt.resolve(str(tmp_path / d))) for d in ("v3", "v2"))
    assert a.equals(b) and a.num_rows == 12_345 and max(len(x) for x in a["labels"].to_pylist()) == 3
    ld = build_loader(DataConfig(source=SourceConfig(url=str(tmp_path / "v3")), batch_size=64), rank=0, world_size=2)
    assert len(ld) == 11111 // (2 * 2 * 64) * 2
    idx = make_metadata_dataset(tmp_path / "idx", samples=5000, samples_per_shard=1000, index_only=True)
    assert idx["index_only"] and not (tmp_path / "idx" / "versions" / idx["dataset_version"] / "samples").exists()
