"""Hostile SRC (issue #32, findings 1, 2, 3, 9): nothing lost, nothing mislabelled, nothing outside DEST.

Each test plants what the issue ran: a manifest split that climbs out of DEST onto a second
dataset, integer labels sorted as strings, a symlink that relabels two classes, link members
of a release tar, a writer killed with ``kill -9`` mid-upload. Real files, tiny images, the real
CLIs (``pipeline.write_shards`` and ``orchestration/prepare.py``, which fails before starting Ray).
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import format as fmt
from pipeline import open_storage, write_dataset
from pipeline.shards import ShardJob, WriteSettings, plan_from_source, write_shard
from pipeline.sources import Item, Source, WriterError

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256)).save(buf, format="JPEG")
    return buf.getvalue()


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links not followed) and the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _rejects(ds: Path | str) -> list[tuple[str, str]]:
    res = fmt.resolve(str(ds))
    return sorted((r["src"], r["reason"]) for r in fmt.read_parquet(res, fmt.REJECTS, ("src", "reason")).to_pylist())


def _images(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, n in enumerate(names):
        (folder / n).write_bytes(_jpeg(i + 7 * len(folder.name)))
        out.append(folder / n)
    return out


# ----------------------------------------------------------------------------- 1. path escape
@pytest.fixture()
def victim(tmp_path: Path) -> tuple[Path, str]:
    """A published dataset next to DEST (tmp_path/ds): tmp_path/victim, and its version."""
    _images(tmp_path / "vsrc" / "a", ["0.jpg", "1.jpg"])
    info = write_dataset(tmp_path / "vsrc", str(tmp_path / "victim"), samples_per_shard=10, progress=False)
    return tmp_path / "victim", info["dataset_version"]


def _manifest(tmp_path: Path, splits: list[Any], fmt_: str = "csv") -> Path:
    imgs = _images(tmp_path / "img", [f"{i}.jpg" for i in range(len(splits))])
    table = pa.table({"path": [str(p) for p in imgs], "label": ["cat"] * len(splits),
                      "split": pa.array(splits, pa.string())})
    out = tmp_path / f"m.{fmt_}"
    (pcsv.write_csv if fmt_ == "csv" else pq.write_table)(table, out)
    return out


@pytest.mark.parametrize("bad", ["{victim}", "x" * 95, None, "/abs/train", "..", "a/b", "val.v2", " train"],
                         ids=["victim", "95-chars", "null", "absolute", "dotdot", "slash", "dot", "space"])
def test_bad_split_is_refused_naming_the_row_and_nothing_leaves_dest(tmp_path: Path, victim: tuple[Path, str],
                                                                      bad: str | None) -> None:
    vroot, v = victim
    if bad == "{victim}":  # from DEST/versions/<v>/shards/ four levels up is tmp_path
        bad = f"../../../../victim/versions/{v}/shards/train"
    man = _manifest(tmp_path, ["train", bad, "val"], "parquet")
    before = _tree(tmp_path)
    with pytest.raises(WriterError, match=r"manifest .*m\.parquet row 2: split .* must be") as e:
        write_dataset(man, str(tmp_path / "ds"), samples_per_shard=1, progress=False)
    assert e.value.code == 2
    assert _tree(tmp_path) == before and not (tmp_path / "ds").exists()
    assert (vroot / "versions" / v / "shards" / "train-000000.tar").is_file()


def test_both_clis_refuse_the_victim_split(tmp_path: Path, victim: tuple[Path, str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's run: exit 0 and the victim's train-000000.tar overwritten. Now exit 2, one line, no write."""
    from orchestration import prepare
    from pipeline import write_shards

    _, v = victim
    man = _manifest(tmp_path, ["train", f"../../../../victim/versions/{v}/shards/train"])
    before = _tree(tmp_path)
    for main, args in ((write_shards.main, ["--workers", "1"]), (prepare.main, ["--tasks", "1"])):
        with pytest.raises(SystemExit) as e:
            main([str(man), str(tmp_path / "ds"), "--samples-per-shard", "1", "--quiet", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "row 2 (line 3): split '../../../../victim" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _tree(tmp_path) == before


def test_shard_steps_refuse_unsafe_names_from_any_caller(tmp_path: Path, victim: tuple[Path, str]) -> None:
    """A Source built in code, or a ShardJob sent to a Ray task, is checked again before any write."""
    _, v = victim
    img = _images(tmp_path / "img", ["0.jpg"])[0]
    escape = f"../../../../victim/versions/{v}/shards/train"
    before = _tree(tmp_path)
    src = Source([Item(str(img), [0], split=escape)], ["a"], multi_label=False)
    with pytest.raises(fmt.UnsafeName, match=r"0\.jpg: split '\.\./"):
        plan_from_source(src, "code", str(tmp_path / "ds"), WriteSettings())
    job = ShardJob(escape, 0, [(f"{escape}-000000000", Item(str(img), [0]))])
    with pytest.raises(fmt.UnsafeName, match="shard job 0: split"):
        write_shard(job, str(tmp_path / "ds"), {"multi_label": False, "max_side": None, "quality": 90})
    job = ShardJob("train", 0, [("../../x-000000000", Item(str(img), [0]))])
    with pytest.raises(fmt.UnsafeName, match="sample key '../../x"):
        write_shard(job, str(tmp_path / "ds"), {"multi_label": False, "max_side": None, "quality": 90})
    assert _tree(tmp_path) == before


# ----------------------------------------------------------------------------- 2. integer labels
@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_integer_labels_are_class_indices(tmp_path: Path, kind: str) -> None:
    """Labels 0..11: classes "0".."11" in numeric order, the image labelled 2 stored as class 2 (was 4)."""
    imgs = _images(tmp_path / "img", [f"{k}.jpg" for k in range(12)])
    table = pa.table({"path": [str(p) for p in imgs], "label": pa.array(range(12), pa.int64())})
    man = tmp_path / f"m.{kind}"
    (pcsv.write_csv if kind == "csv" else pq.write_table)(table, man)
    info = write_dataset(man, str(tmp_path / "ds"), samples_per_shard=5, progress=False)
    res = fmt.resolve(str(tmp_path / "ds"))
    assert fmt.read_classes(res) == [str(k) for k in range(12)] and info["num_classes"] == 12
    rows = fmt.read_samples(res).to_pylist()
    assert len(rows) == 12 and all(r["label"] == int(Path(r["src"]).stem) for r in rows)


@pytest.mark.parametrize(("labels", "needle"), [
    (["3", "-1"], r"row 2 \(line 3\): label -1 is negative"),
    (["3", "2000000000"], r"row 2 \(line 3\): label 2000000000 is too large: .* 2,000,000,001 classes for 2 rows"),
    ([[3], [-1]], r"row 2: label -1 is negative"),
    ([[3], [10**12]], r"row 2: label 1000000000000 is too large"),  # was 24 GB of RAM, then the OOM killer
    (["cat", "a\x07b"], r"row 2 \(line 3\): class name 'a\\x07b' has a control character"),
])
def test_bad_labels_are_an_error_naming_the_row(tmp_path: Path, labels: list[Any], needle: str) -> None:
    imgs = _images(tmp_path / "img", ["0.jpg", "1.jpg"])
    if isinstance(labels[0], list):
        man = tmp_path / "m.parquet"
        pq.write_table(pa.table({"path": [str(p) for p in imgs], "labels": labels}), man)
    else:
        man = tmp_path / "m.csv"
        man.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in zip(imgs, labels, strict=True)))
    t0 = time.monotonic()
    with pytest.raises(WriterError, match=needle):
        write_dataset(man, str(tmp_path / "ds"), progress=False)
    assert time.monotonic() - t0 < 10 and not (tmp_path / "ds").exists()


def test_duplicate_manifest_rows(tmp_path: Path) -> None:
    """Same image, labels 0 and 5: both rows rejected (which is right is unknown); an exact repeat kept once."""
    a, b, c = _images(tmp_path / "img", ["a.jpg", "b.jpg", "c.jpg"])
    man = tmp_path / "m.csv"
    man.write_text(f"path,label\n{a},0\n{b},1\n{tmp_path}/img/./a.jpg,5\n{b},1\n{c},2\n")
    info = write_dataset(man, str(tmp_path / "ds"), progress=False)
    res = fmt.resolve(str(tmp_path / "ds"))
    assert sorted((Path(r["src"]).name, r["label"]) for r in fmt.read_samples(res).to_pylist()) == \
        [("b.jpg", 1), ("c.jpg", 2)]
    assert info["num_classes"] == 6
    table = fmt.read_parquet(res, fmt.REJECTS, ("src", "reason", "detail")).to_pylist()
    assert sorted((Path(r["src"]).name, r["reason"]) for r in table) == [
        ("a.jpg", "conflicting_duplicate"), ("a.jpg", "conflicting_duplicate"), ("b.jpg", "duplicate_row")]
    assert any("row 1 (line 2): labels [0]" in r["detail"] and "row 3 (line 4): labels [5]" in r["detail"]
               for r in table), table


# ----------------------------------------------------------------------------- 3. symlinks, links in tars
def test_folder_symlinks_never_relabel_or_leave_src(tmp_path: Path) -> None:
    """``SRC/a/up -> ..`` labelled every image of b and c as a (b, c: 0 samples). Now each link is a reject."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    for cls in "abc":
        _images(src / cls, [f"{cls}0.jpg", f"{cls}1.jpg"])
    _images(outside, ["o.jpg"])
    links = {
        "a/up": "..",  # SRC itself: every class
        "b/alias.jpg": "../c/c0.jpg",  # another class's image
        "c/out": str(outside),  # a folder outside SRC
        "c/outimg.jpg": str(outside / "o.jpg"),  # a file outside SRC
        "c/sub": ".",  # a cycle inside the class: walked once
        "d": "a",  # a class folder aliasing another class
        "e": str(outside),  # a class folder outside SRC
    }
    for name, target in links.items():
        os.symlink(target, src / name)
    (src / "a" / "..jpg").write_bytes(_jpeg(99))  # a hidden file: was dropped without a trace
    write_dataset(src, str(tmp_path / "ds"), samples_per_shard=4, progress=False)
    res = fmt.resolve(str(tmp_path / "ds"))
    classes = fmt.read_classes(res)
    rows = fmt.read_samples(res).to_pylist()
    assert classes == ["a", "b", "c"]
    assert sorted(Path(r["src"]).name for r in rows) == ["a0.jpg", "a1.jpg", "b0.jpg", "b1.jpg", "c0.jpg", "c1.jpg"]
    assert all(classes[r["label"]] == Path(r["src"]).parent.name for r in rows)
    assert [(Path(s).relative_to(src).as_posix(), why) for s, why in _rejects(tmp_path / "ds")] == [
        ("a/..jpg", "hidden"), ("a/up", "symlink_outside_class"), ("b/alias.jpg", "symlink_outside_class"),
        ("c/out", "symlink_outside_src"), ("c/outimg.jpg", "symlink_outside_src"), ("c/sub", "duplicate_folder"),
        ("d", "symlink_outside_class"), ("e", "symlink_outside_src")]


def test_release_tar_link_members_are_rejects(tmp_path: Path) -> None:
    """Symlink and hardlink members, in the release tar and inside a synset tar: rejects, never followed."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as tf:
        for k in range(2):
            ti = tarfile.TarInfo(f"n01_{k}.JPEG")
            data = _jpeg(k)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for name, kind in (("soft.JPEG", tarfile.SYMTYPE), ("hard.JPEG", tarfile.LNKTYPE)):
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = kind, "n01_0.JPEG"
            tf.addfile(ti)
    release = tmp_path / "release.tar"
    with tarfile.open(release, "w") as outer:
        ti = tarfile.TarInfo("n01.tar")
        ti.size = len(inner.getvalue())
        outer.addfile(ti, io.BytesIO(inner.getvalue()))
        for name, kind, target in (("n02.tar", tarfile.SYMTYPE, "/etc/passwd"), ("n03.tar", tarfile.LNKTYPE, "n01.tar")):
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = kind, target
            outer.addfile(ti)
    info = write_dataset(release, str(tmp_path / "ds"), progress=False)
    assert info["counts"] == {"train": 2} and fmt.read_classes(fmt.resolve(str(tmp_path / "ds"))) == ["n01"]
    assert [(s.split("#", 1)[1], why) for s, why in _rejects(tmp_path / "ds")] == [
        ("n01.tar/hard.JPEG", "not_a_regular_member"), ("n01.tar/soft.JPEG", "not_a_regular_member"),
        ("n02.tar", "not_a_regular_member"), ("n03.tar", "not_a_regular_member")]


def test_s3_folder_hidden_keys_are_rejects(s3_bucket: str) -> None:
    st = open_storage(f"s3://{s3_bucket}/raw")
    for k in range(2):
        st.write_bytes(f"a/{k}.jpg", _jpeg(k))
    st.write_bytes("a/..jpg", _jpeg(5))
    info = write_dataset(f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/ds", progress=False)
    assert info["counts"] == {"train": 2}
    assert _rejects(f"s3://{s3_bucket}/ds") == [(f"s3://{s3_bucket}/raw/a/..jpg", "hidden")]


# ----------------------------------------------------------------------------- 9. killed writer
STUCK_WRITER = """
import os, pathlib, shutil, sys, time
real = shutil.copyfile
def stuck(a, b, *args, **kw):  # the upload's copy is done, its rename into place is not
    real(a, b, *args, **kw)
    pathlib.Path(sys.argv[3]).write_text("ready")
    time.sleep(600)
shutil.copyfile = stuck
from pipeline.write_shards import main
main([sys.argv[1], sys.argv[2], "--samples-per-shard", "2", "--workers", "1", "--quiet"])
"""


def test_killed_writer_leaves_no_temporary_files_after_the_rerun(tmp_path: Path) -> None:
    """kill -9 mid-upload left ``.train-000000.tar.tmp<pid>`` in DEST and a shard-sized /tmp/tmp*.tar, for good."""
    _images(tmp_path / "src" / "a", [f"{k}.jpg" for k in range(4)])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(ROOT)}
    ready = tmp_path / "ready"
    args = [str(tmp_path / "src"), str(tmp_path / "ds")]
    proc = subprocess.Popen([sys.executable, "-c", STUCK_WRITER, *args, str(ready)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never reached its first upload"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    left = [p.name for p in (tmp_path / "ds").rglob(".*.tmp*")]
    assert left == [f".train-000000.tar.tmp{proc.pid}"]
    assert [p for p in scratch.rglob("*") if p.is_file()], "the killed writer's local shard tar"
    rerun = subprocess.run([sys.executable, "-m", "pipeline.write_shards", *args, "--samples-per-shard", "2",
                            "--workers", "1", "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert list((tmp_path / "ds").rglob("*.tmp*")) == []
    assert [p for p in scratch.rglob("*") if p.is_file()] == []
    assert fmt.resolve(str(tmp_path / "ds")).manifest["counts"] == {"train": 4}
