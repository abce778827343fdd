"""Dataset sources (issue #17): the ImageNet-21k release tar, an S3 manifest, bad input.

Real files and a real moto S3 server; the only fault injection is bad data: a synset tar that
is not a tar, a non-image member, a JPEG that does not decode, a manifest row naming a missing
S3 object. prepare.py itself: tests/test_prepare_ray.py (local Ray), test_prepare_multinode.py.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import format as fmt
from pipeline import open_storage, write_dataset

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(seed: int, size: int = 24) -> bytes:
    im = Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    im.putpixel((seed % size, (seed // size) % size), (255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def _synset_tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            _add(tf, name, data)
    return buf.getvalue()


def make_release_tar(path: Path, *, per_synset: int = 6, bad: bool = True) -> Path:
    """An ImageNet-21k-style release: a tar of <synset>.tar files (written in unsorted order).

    With ``bad``: a synset tar that is not a tar, a README member, and one undecodable JPEG.
    """
    synsets = ["n02084071", "n01440764", "n01443537"]  # deliberately not sorted
    with tarfile.open(path, "w") as outer:
        for s_i, syn in enumerate(synsets):
            members = {f"{syn}_{k}.JPEG": _jpeg(100 * s_i + k) for k in range(per_synset)}
            if bad and syn == "n01443537":
                members["README.txt"] = b"not an image"
                members[f"{syn}_broken.JPEG"] = b"\xff\xd8\xff\xe0 truncated"
            _add(outer, f"{syn}.tar", _synset_tar(members))
        if bad:
            _add(outer, "n09999999.tar", b"this is not a tar file at all" * 40)
    return path


def _rejects(url: str) -> dict[str, str]:
    res = fmt.resolve(url)
    table = pq.read_table(io.BytesIO(res.storage().read_bytes(fmt.REJECTS)))
    return {r["src"].rsplit("/", 1)[-1].rsplit("#", 1)[-1]: r["reason"] for r in table.to_pylist()}


def test_release_tar_of_synset_tars_is_read_without_unpacking(tmp_path: Path) -> None:
    """Classes = sorted synset ids (classes.json keeps them); images read via their byte span."""
    tar = make_release_tar(tmp_path / "fall11_whole.tar")
    info = write_dataset(tar, str(tmp_path / "ds"), samples_per_shard=5, progress=False)
    res = fmt.resolve(str(tmp_path / "ds"))
    assert fmt.read_classes(res) == ["n01440764", "n01443537", "n02084071", "n09999999"]
    assert info["counts"] == {"train": 18}  # 3 synsets x 6 images; the broken JPEG is rejected
    assert _rejects(str(tmp_path / "ds")) == {
        "n01443537_broken.JPEG": "undecodable", "README.txt": "not_an_image", "n09999999.tar": "unreadable_tar_member"}
    samples = fmt.read_samples(res).to_pylist()
    # Every stored image is byte-for-byte the member of its synset tar, labelled by its synset.
    with tarfile.open(tar) as outer:
        for row in samples[:8]:
            member = row["src"].rsplit("/", 1)[1]
            syn = member.split("_")[0]
            inner = tarfile.open(fileobj=outer.extractfile(f"{syn}.tar"))
            want = inner.extractfile(member).read()
            got = res.storage().read_bytes(row["shard"])[row["offset"]: row["offset"] + row["size"]]
            assert got == want and fmt.read_classes(res)[row["label"]] == syn


def test_release_tar_on_s3_is_streamed(s3_bucket: str, tmp_path: Path) -> None:
    """The release tar as one S3 object: scanned in one streaming pass, images read by range GETs."""
    tar = make_release_tar(tmp_path / "release.tar", bad=False)
    open_storage(f"s3://{s3_bucket}").write_bytes("raw/release.tar", tar.read_bytes())
    info = write_dataset(f"s3://{s3_bucket}/raw/release.tar", f"s3://{s3_bucket}/ds", samples_per_shard=7,
                         progress=False)
    local = write_dataset(tar, str(tmp_path / "local"), samples_per_shard=7, progress=False)
    assert info["counts"] == local["counts"] == {"train": 18}
    s3_index = fmt.read_index(fmt.resolve(f"s3://{s3_bucket}/ds")).to_pylist()
    local_index = fmt.read_index(fmt.resolve(str(tmp_path / "local"))).to_pylist()
    assert [r["sha256"] for r in s3_index] == [r["sha256"] for r in local_index]


def test_manifest_of_s3_uris_with_missing_object_and_non_image(s3_bucket: str, tmp_path: Path) -> None:
    """JFT-style: s3:// URIs, many labels per image; a missing object and a non-image are rejects."""
    st = open_storage(f"s3://{s3_bucket}/img")
    rows = []
    for i in range(12):
        st.write_bytes(f"{i}.jpg", _jpeg(i))
        rows.append({"image": f"s3://{s3_bucket}/img/{i}.jpg", "labels": f"cat|{'dog' if i % 2 else 'fox'}"})
    st.write_bytes("notes.jpg", b"plain text, not an image")
    rows.append({"image": f"s3://{s3_bucket}/img/notes.jpg", "labels": "cat"})
    rows.append({"image": f"s3://{s3_bucket}/img/missing.jpg", "labels": "dog"})
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    info = write_dataset(tmp_path / "m.parquet", f"s3://{s3_bucket}/jft", samples_per_shard=5, progress=False)
    assert info["multi_label"] and info["counts"] == {"train": 12}
    res = fmt.resolve(f"s3://{s3_bucket}/jft")
    assert fmt.read_classes(res) == ["cat", "dog", "fox"]
    assert sorted(map(tuple, (r["labels"] for r in fmt.read_samples(res).to_pylist()))) == \
        sorted([(0, 1)] * 6 + [(0, 2)] * 6)
    rejects = _rejects(f"s3://{s3_bucket}/jft")
    assert rejects == {"notes.jpg": "undecodable", "missing.jpg": "unreadable"}
    detail = pq.read_table(io.BytesIO(res.storage().read_bytes(fmt.REJECTS))).to_pylist()
    assert any("missing.jpg" in r["src"] and "FileNotFoundError" in r["detail"] for r in detail), detail


def test_s3_folder_prefix_and_s3_manifest_object(s3_bucket: str) -> None:
    """SRC on S3 only: a prefix of <class>/<image> keys, and a manifest object with relative URIs."""
    st = open_storage(f"s3://{s3_bucket}/raw")
    for i in range(9):
        st.write_bytes(f"n0{2 - i % 3}/{i}.JPEG", _jpeg(i))  # classes n00, n01, n02
    st.write_bytes("n01/notes.txt", b"x")
    info = write_dataset(f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/ds", samples_per_shard=4, progress=False)
    res = fmt.resolve(f"s3://{s3_bucket}/ds")
    assert fmt.read_classes(res) == ["n00", "n01", "n02"] and info["counts"] == {"train": 9}
    assert all(fmt.read_classes(res)[r["label"]] == r["src"].split("/")[-2] for r in fmt.read_samples(res).to_pylist())
    assert _rejects(f"s3://{s3_bucket}/ds") == {"notes.txt": "not_an_image"}
    st.write_bytes("m.csv", b"path,labels\n" + b"".join(f"n0{2 - i % 3}/{i}.JPEG,{i % 2}\n".encode() for i in range(9)))
    info = write_dataset(f"s3://{s3_bucket}/raw/m.csv", f"s3://{s3_bucket}/ds-m", samples_per_shard=4, progress=False)
    assert info["counts"] == {"train": 9} and info["num_classes"] == 2


@pytest.mark.parametrize(("cli", "args", "needle"), [
    ("prepare", ["--tasks", "0"], "--tasks 0 must be >= 1"),
    ("prepare", ["--cpus-per-task", "0"], "--cpus-per-task 0.0 must be > 0"),
    ("prepare", ["--quality", "0"], "--quality 0 must be in [1, 100]"),
    ("audit", ["--hamming", "64"], "--hamming 64 must be in [0, 63]"),
    ("audit", ["--decode-fraction", "1.5"], "--decode-fraction 1.5 must be in [0, 1]"),
])
def test_cli_arguments_are_checked_before_ray_starts(cli: str, args: list[str], needle: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    main = importlib.import_module(f"orchestration.{cli}").main
    positional = [str(tmp_path / "src"), str(tmp_path / "dest")] if cli == "prepare" else [str(tmp_path / "ds")]
    with pytest.raises(SystemExit) as e:
        main([*positional, *args])
    assert e.value.code == 2 and needle in capsys.readouterr().err
