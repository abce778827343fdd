"""Datasets are immutable once published, readers pin a version, stored bytes are verified.

Issue #12 items 4 and 10: a killed rewriter, two racing writers, a same-length swapped sample,
a flipped shard byte, damaged metadata files, resume after a newer version was published.
Faults are injected for real: killed writer processes, bytes edited on disk / in S3.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import DataConfig, IOConfig, SourceConfig, build_loader, open_storage, write_dataset
from pipeline.demo_data import decode_index, make_index_folder
from pipeline.format import DatasetFormatError, IntegrityError, read_samples, resolve

N = 300
PER_SHARD = 30
ROOT = Path(__file__).resolve().parents[1]
#: Runs the writer CLI with every shard slowed down by argv[1] seconds (a patch of our own
#: function), so a test can kill it mid-write. With $BARRIER set, writers wait before their
#: first shard until $BARRIER holds 2 entries: both have then read what DEST published, so
#: they really race to publish.
SLOW_WRITER = (
    "import os, pathlib, sys, time\n"
    "import pipeline.write_shards as w\n"
    "orig, first = w.write_shard, [True]\n"
    "def slow(*a, **k):\n"
    "    barrier = os.environ.get('BARRIER')\n"
    "    if barrier and first[0]:\n"
    "        first[0] = False\n"
    "        (pathlib.Path(barrier) / str(os.getpid())).touch()\n"
    "        deadline = time.time() + 60\n"
    "        while len(os.listdir(barrier)) < 2 and time.time() < deadline:\n"
    "            time.sleep(0.01)\n"
    "    time.sleep(float(sys.argv[1]))\n"
    "    return orig(*a, **k)\n"
    "w.write_shard = slow\n"
    "w.main(sys.argv[2:])\n"
)


@pytest.fixture(scope="module")
def id_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 index-coded 16x16 JPEGs (all the same byte length), class ``i % 10``."""
    return make_index_folder(tmp_path_factory.mktemp("ids") / "src", n=N, num_classes=10)


def write(src: Path, dest: Path | str, seed: int = 0, **kw: object) -> dict:
    return write_dataset(src, str(dest), samples_per_shard=PER_SHARD, seed=seed, progress=False, **kw)


def vdir(ds: Path) -> Path:
    return Path(resolve(str(ds)).root_url)


def writer_cmd(src: Path, dest: str, seed: int, slow: float, *extra: str) -> list[str]:
    return [sys.executable, "-c", SLOW_WRITER, str(slow), str(src), dest, "--samples-per-shard", str(PER_SHARD),
            "--seed", str(seed), "--workers", "1", "--quiet", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def read_all(url: str, version: str | None = None) -> tuple[list[int], list[int], str]:
    """(image ids decoded from pixels, labels, pinned version) of one eval pass over ``url``."""
    ld = build_loader(DataConfig(source=SourceConfig(url=url, dataset_version=version), train=False, image_size=16, batch_size=50, io=IOConfig(num_workers=0)), rank=0, world_size=1)
    ids: list[int] = []
    labels: list[int] = []
    for x, y, valid in ld:
        ids += decode_index(x.numpy())[valid.numpy()].tolist()
        labels += y[valid].tolist()
    assert ld.stats().get("skipped", 0) == 0
    return ids, labels, ld.dataset_version


def assert_consistent(url: str, version: str) -> None:
    """The published dataset is ``version`` and every sample is its own image with its label."""
    ids, labels, got = read_all(url)
    assert got == version
    assert sorted(ids) == list(range(N))
    assert labels == [i % 10 for i in ids], "a sample carries another image's label"


# ----------------------------------------------------------------------------- writers
@pytest.mark.integration
def test_killed_rewriter_leaves_old_version_published_then_resumes(tmp_path: Path, id_src: Path) -> None:
    ds = tmp_path / "ds"
    old = write(id_src, ds, seed=0)["dataset_version"]
    proc = subprocess.Popen(writer_cmd(id_src, str(ds), 1, 0.3, "--overwrite"), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    done: list[Path] = []
    # Kill it once 4 of the 10 new shards are complete: a shard's marker is written after its tar
    # (a tar alone may be the one in flight when the kill lands, and is then rewritten: CI saw 3).
    while len(done) < 4:
        assert proc.poll() is None, f"writer ended before it could be killed: {proc.communicate()}"
        assert time.monotonic() < deadline, "writer wrote no shards in 60 s"
        done = [p for p in ds.glob("versions/*/markers/*.json") if old not in str(p)]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert_consistent(str(ds), old)  # before versions: 4 new shards under the old index
    # re-running the same write resumes its version, then publishes it
    info = write(id_src, ds, seed=1, overwrite=True)
    assert info["dataset_version"] != old
    assert 4 <= info["summary"]["shards_resumed"] < 10
    assert_consistent(str(ds), info["dataset_version"])


@pytest.mark.integration
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_racing_writers_publish_one_whole_version(tmp_path: Path, id_src: Path, where: str,
                                                      request: pytest.FixtureRequest) -> None:
    dest = str(tmp_path / "ds") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/ds"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen(writer_cmd(id_src, dest, seed, 0.02), env={**env(), "BARRIER": str(barrier)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], outs
    loser_err = outs[codes.index(1)][1]
    assert "another writer published dataset version" in loser_err and "NOT published" in loser_err, loser_err
    assert len(loser_err.strip().splitlines()) == 1, loser_err  # one line, no traceback
    winner_out = outs[codes.index(0)][0]
    version = resolve(dest).version
    assert f"version {version} (published)" in winner_out
    assert_consistent(dest, version)


def test_writer_refuses_to_replace_a_dataset_without_overwrite(tmp_path: Path, id_src: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.write_shards import main

    ds = tmp_path / "ds"
    old = write(id_src, ds, seed=0)["dataset_version"]
    args = [str(id_src), str(ds), "--samples-per-shard", str(PER_SHARD), "--seed", "1", "--quiet"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert f"already publishes dataset version {old}" in err and "--overwrite" in err
    assert [p.name for p in (ds / "versions").iterdir()] == [old]  # nothing written
    main([*args, "--overwrite"])
    new = resolve(str(ds)).version
    assert new != old and sorted(p.name for p in (ds / "versions").iterdir()) == sorted([old, new])
    assert_consistent(str(ds), new)
    # a reader that pins the old version still reads it, whole
    ids, labels, got = read_all(str(ds), version=old)
    assert got == old and sorted(ids) == list(range(N)) and labels == [i % 10 for i in ids]


def test_publish_is_compare_and_swap_and_idempotent_for_the_same_version(tmp_path: Path, id_src: Path) -> None:
    from pipeline.format import PublishConflict, Published, publish, published

    ds = tmp_path / "ds"
    v1 = write(id_src, ds)["dataset_version"]
    st = open_storage(ds)
    manifest = (vdir(ds) / "dataset.json").read_bytes()
    publish(st, manifest, v1, Published(version=None, token=None))  # same version already there: fine
    with pytest.raises(PublishConflict, match=rf"another writer published dataset version {v1}.*NOT published"):
        publish(st, b'{"dataset_version": "other"}', "other", Published(version=None, token=None))
    assert published(st).version == v1


# ----------------------------------------------------------------------------- shard bytes
def test_same_length_swapped_sample_is_caught_naming_shard_and_key(tmp_path: Path, id_src: Path) -> None:
    ds = tmp_path / "ds"
    write(id_src, ds)
    rows = read_samples(resolve(str(ds))).to_pylist()
    a = rows[0]
    b = next(r for r in rows if r["size"] == a["size"] and r["label"] != a["label"] and r["shard"] != a["shard"])
    shard = vdir(ds) / a["shard"]
    raw = bytearray(shard.read_bytes())
    raw[a["offset"]: a["offset"] + a["size"]] = (vdir(ds) / b["shard"]).read_bytes()[b["offset"]: b["offset"] + b["size"]]
    shard.write_bytes(bytes(raw))  # same length: shard size and every offset still match
    for workers in (0, 2):
        ld = build_loader(DataConfig(source=SourceConfig(url=str(ds)), train=False, image_size=16, batch_size=10, io=IOConfig(num_workers=workers)),
                          rank=0, world_size=1)
        served: list[int] = []
        with pytest.raises(IntegrityError, match=rf"sample {a['key']} in shard .*{a['shard']}.*sha256"):
            for x, _y, valid in ld:  # every run here reads its shard whole: no whole-shard hash, the per-sample one
                served += decode_index(x.numpy())[valid.numpy()].tolist()
        # b's pixels under a's key were never served (they would show up as a second b)
        assert len(served) == len(set(served)), "the swapped sample was served before the error"


def _flip_tar_header_byte(ds: Path) -> str:
    """Flip a byte inside the first tar header of the last shard (no image byte changes); its name."""
    name = pq.read_table(vdir(ds) / "index.parquet").to_pylist()[-1]["shard"]
    raw = bytearray((vdir(ds) / name).read_bytes())
    raw[100] ^= 0xFF  # the first member's mode field
    (vdir(ds) / name).write_bytes(bytes(raw))
    return name


def _audit(ds: Path) -> dict[str, str]:
    """The shard audit's problems (pipeline.shard_audit, what orchestration/audit.py runs per shard)."""
    from pipeline.shard_audit import ShardAudit, audit_shard

    res = resolve(str(ds))
    samples = read_samples(res).to_pylist()
    out = {}
    for i in pq.read_table(vdir(ds) / "index.parquet").to_pylist():
        rows = [r for r in samples if r["shard"] == i["shard"]]
        got = audit_shard(ShardAudit(shard=i["shard"], bytes=i["bytes"], sha256=i["sha256"], samples=rows,
                                     decode=[False] * len(rows)), res.root_url)
        if not got["ok"]:
            out[got["shard"]] = got["problem"]
    return out


@pytest.mark.parametrize("damage", ["truncated", "appended"])
def test_damaged_shard_size_is_caught_naming_the_shard(tmp_path: Path, id_src: Path, damage: str) -> None:
    ds = tmp_path / "ds"
    write(id_src, ds)
    index = pq.read_table(vdir(ds) / "index.parquet").to_pylist()
    shard = vdir(ds) / index[-1]["shard"]
    raw = bytearray(shard.read_bytes())
    raw = raw[: len(raw) - 5000] if damage == "truncated" else raw + b"\0" * 512
    shard.write_bytes(bytes(raw))
    cfg = DataConfig(source=SourceConfig(url=str(ds)), train=False, image_size=16, batch_size=10, io=IOConfig(num_workers=0))
    with pytest.raises(IntegrityError, match=rf"shard .*{index[-1]['shard']}.*index\.parquet records"):
        list(build_loader(cfg, rank=0, world_size=1))


def test_tar_header_damage_is_reported_by_the_audit_and_by_the_loader_without_sample_checks(
        tmp_path: Path, id_src: Path) -> None:
    """One hash per served byte: with per-sample sha256 checks the loader does not hash whole shards
    (labels and byte ranges come from the checked rows file, never from tar headers), so a header byte
    is the audit's to find, and the loader's whole-shard hash finds it when per-sample checks are off."""
    ds = tmp_path / "ds"
    write(id_src, ds)
    name = _flip_tar_header_byte(ds)
    assert list(_audit(ds)) == [name] and "index.parquet records" in _audit(ds)[name]
    assert_consistent(str(ds), resolve(str(ds)).version)  # every served byte is intact: served, each checked
    cfg = DataConfig(source=SourceConfig(url=str(ds)), train=False, image_size=16, batch_size=10, io=IOConfig(num_workers=0))
    ld = build_loader(cfg, rank=0, world_size=1)
    ld.meta.verify_samples = False
    with pytest.raises(IntegrityError, match=rf"shard .*{name}.*index\.parquet records"):
        list(ld)


def test_whole_shard_hash_only_without_sample_checks_and_once_per_run(tmp_path: Path, id_src: Path) -> None:
    ds = tmp_path / "ds"
    write(id_src, ds)

    def loader(verify_samples: bool) -> object:
        ld = build_loader(DataConfig(source=SourceConfig(url=str(ds)), image_size=16, batch_size=10, io=IOConfig(num_workers=2)), rank=0,
                          world_size=1)
        ld.meta.verify_samples = verify_samples  # before the first pass forks the workers
        return ld

    checked = loader(True)
    list(checked)
    assert checked._verified == set()  # per-sample checks on: no whole-shard hash
    ld = loader(False)
    list(ld)
    first = set(ld._verified)
    assert len(first) >= 8  # shards read whole in epoch 0 (slot boundaries may split a couple)
    shard = vdir(ds) / sorted(first)[0]
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF  # header byte: only the whole-shard hash could see it
    shard.write_bytes(bytes(raw))
    list(ld)  # epoch 1 does not hash already-verified shards again (the cost is paid once per run)
    with pytest.raises(IntegrityError, match=sorted(first)[0]):
        list(loader(False))


# ----------------------------------------------------------------------------- metadata
def _garble(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)] + b"garbage")


@pytest.mark.parametrize("target", ["index.parquet", "samples/train-000003.parquet", "dataset.json",
                                    "version/dataset.json", "dataset.json-field", "legacy/index.parquet",
                                    "legacy/samples.parquet"])
def test_damaged_metadata_errors_name_the_file(tmp_path: Path, id_src: Path, target: str) -> None:
    ds = tmp_path / "ds"
    write(id_src, ds)
    if target.startswith("legacy/"):  # format 1: no checksums, so the parser itself must name the file
        _to_legacy(ds)
        path = ds / target.split("/")[1]
    elif target == "dataset.json":
        path = ds / "dataset.json"
    elif target == "dataset.json-field":
        path = ds / "dataset.json"
        info = json.loads(path.read_text())
        del info["num_classes"]
        path.write_text(json.dumps(info))
    elif target == "version/dataset.json":
        path = vdir(ds) / "dataset.json"
    else:
        path = vdir(ds) / target
    version = None
    if target == "version/dataset.json":
        version = resolve(str(ds)).version  # a pinned reader opens the version's own manifest
    if target != "dataset.json-field":
        _garble(path)
    cfg = DataConfig(source=SourceConfig(url=str(ds), dataset_version=version), image_size=16, batch_size=10, io=IOConfig(num_workers=0))
    with pytest.raises(DatasetFormatError) as e:
        ld = build_loader(cfg, rank=0, world_size=1)
        assert target.startswith("samples/"), "a damaged shard table must fail before the first batch"
        list(ld)  # a shard's rows file is read (and checked) when the shard is opened
    msg = str(e.value)
    assert str(path) in msg and "damaged" in msg and "pipeline.write_shards" in msg, msg
    if target == "dataset.json-field":
        assert "num_classes" in msg


def _to_legacy(ds: Path) -> None:
    """Rewrite a dataset in the format-1 layout (metadata at the root, no per-sample sha256)."""
    rows = read_samples(resolve(str(ds)))
    v = vdir(ds)
    for p in v.iterdir():
        os.replace(p, ds / p.name)
    shutil.rmtree(ds / "versions")
    info = json.loads((ds / "dataset.json").read_text())
    for k in ("dataset_version", "files"):
        info.pop(k)
    info["version"] = 1
    (ds / "dataset.json").write_text(json.dumps(info))
    pq.write_table(rows.drop_columns(["sha256"]), ds / "samples.parquet")


def test_format1_dataset_still_loads_and_checks_shard_size(tmp_path: Path, id_src: Path) -> None:
    from pipeline.format import DatasetExists

    ds = tmp_path / "ds"
    write(id_src, ds)
    _to_legacy(ds)
    assert_consistent(str(ds), "legacy")
    with pytest.raises(DatasetExists, match="already publishes dataset version legacy"):
        write(id_src, ds)  # upgrading an old dataset in place is explicit: --overwrite
    shard = sorted((ds / "shards").iterdir())[2]
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF  # a tar header byte: no per-sample digests here, so the whole-shard hash is kept
    shard.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=rf"{shard.name}.*index\.parquet records"):
        read_all(str(ds))
    shard.write_bytes(shard.read_bytes()[:-700])
    with pytest.raises(IntegrityError, match=shard.name):
        read_all(str(ds))


# ----------------------------------------------------------------------------- readers pin
def test_resume_reads_the_pinned_version_and_says_when_it_is_gone(tmp_path: Path, id_src: Path) -> None:
    ds = tmp_path / "ds"
    v1 = write(id_src, ds, seed=0)["dataset_version"]
    cfg = DataConfig(source=SourceConfig(url=str(ds)), image_size=16, batch_size=10, io=IOConfig(num_workers=0, shuffle_buffer=16))
    full = [decode_index(b[0].numpy()) for b in build_loader(cfg, rank=0, world_size=1)]
    ld = build_loader(cfg, rank=0, world_size=1)
    it = iter(ld)
    head = [decode_index(next(it)[0].numpy()) for _ in range(3)]
    state = ld.state_dict()
    assert state["dataset_version"] == v1
    v2 = write(id_src, ds, seed=1, overwrite=True)["dataset_version"]  # same images, other order
    resumed = build_loader(cfg, rank=0, world_size=1)
    assert resumed.dataset_version == v2
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert resumed.dataset_version == v1
    tail = [decode_index(b[0].numpy()) for b in resumed]
    assert len(head + tail) == len(full) and all(np.array_equal(a, b) for a, b in zip(head + tail, full, strict=True))
    shutil.rmtree(ds / "versions" / v1)
    again = build_loader(cfg, rank=0, world_size=1)
    with pytest.raises(DatasetFormatError, match=rf"pinned dataset version {v1} .*deleted.*now {v2}"):
        again.load_state_dict(state)


def test_s3_swapped_sample_and_lineage_record_the_version(s3_bucket: str, id_src: Path) -> None:
    from orchestration.launch.ray_train import dataset_lineage

    url = f"s3://{s3_bucket}/ds"
    info = write(id_src, url)
    lin = dataset_lineage(url)
    st = open_storage(resolve(url).root_url)
    assert lin["version"] == info["dataset_version"] == lin["dataset"]["dataset_version"]
    assert lin["index_sha256"] == info["files"]["index.parquet"]["sha256"] and lin["splits"] == ["train"]
    rows = read_samples(resolve(url)).to_pylist()
    a = rows[5]
    b = next(r for r in rows if r["size"] == a["size"] and r["label"] != a["label"])
    raw = bytearray(st.read_bytes(a["shard"]))
    raw[a["offset"]: a["offset"] + a["size"]] = st.read_bytes(b["shard"])[b["offset"]: b["offset"] + b["size"]]
    st.write_bytes(a["shard"], bytes(raw))
    with pytest.raises(IntegrityError, match=rf"sample {a['key']} in shard s3://.*{a['shard']}"):
        read_all(url)


def test_damaged_classes_json_names_the_file(tmp_path: Path, id_src: Path) -> None:
    from pipeline.format import read_classes

    ds = tmp_path / "ds"
    write(id_src, ds)
    assert read_classes(resolve(str(ds))) == [f"c{i:03d}" for i in range(10)]
    path = vdir(ds) / "classes.json"
    path.write_text('["c000", "c001"]')  # valid JSON, but not what was published
    with pytest.raises(DatasetFormatError, match=rf"{path}.* is damaged"):
        read_classes(resolve(str(ds)))
