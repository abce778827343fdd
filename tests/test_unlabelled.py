"""Unlabelled data (issue #24): sources without labels become datasets of images only.

A plain folder tree (``--unlabelled``), a manifest without a labels column, a release tar or an
``s3://`` folder with ``--unlabelled``: the dataset's manifest says ``num_classes`` 0 and
``labelled: false``, ``classes.json`` is ``[]``, every row's label is -1 and the tars hold
``{key}.jpg`` members only (stock webdataset reads them). The written format is checked with
``pipeline.format``'s readers; what the loader yields for it is tested with the loader. The CLIs
refuse, before Ray, a supervised run or a few-shot evaluation on such a dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline import format as fmt
from pipeline import open_storage, write_dataset
from pipeline.write_shards import main as write_shards_main

IMAGE = 16


def _jpeg(path: Path, seed: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (IMAGE, IMAGE), (seed * 37 % 256, seed * 91 % 256, 128)).save(path, quality=95)
    return path.read_bytes()


def _tree(root: Path) -> dict[str, bytes]:
    """A plain tree of images at depths 0-3, plus what a walk must refuse; returns the usable images."""
    good = {p: _jpeg(root / p, i) for i, p in enumerate(["top.jpg", "a/one.jpg", "a/b/two.jpg", "a/b/c/three.jpg",
                                                         "z/four.jpg"])}
    _jpeg(root / ".hidden.jpg", 50)
    (root / "a" / "notes.txt").write_text("not an image")
    outside = root.parent / f"{root.name}-outside.jpg"
    _jpeg(outside, 51)
    os.symlink(outside, root / "a" / "escape.jpg")  # out of SRC: never followed
    return good


def _rows(url: str) -> list[dict]:
    return fmt.read_samples(fmt.resolve(url)).to_pylist()


def _rejects(url: str) -> dict[str, str]:
    import io

    import pyarrow.parquet as pq

    res = fmt.resolve(url)
    table = pq.read_table(io.BytesIO(res.storage().read_bytes(fmt.REJECTS)))
    return {r["src"].rsplit("/", 1)[-1]: r["reason"] for r in table.to_pylist()}


def _members(url: str) -> list[str]:
    res = fmt.resolve(url)
    names = []
    for r in fmt.read_index(res).to_pylist():
        with tarfile.open(Path(res.root_url) / r["shard"]) as tf:
            names += tf.getnames()
    return names


def _check_unlabelled(url: str) -> dict:
    """The format of an unlabelled dataset at ``url``; returns its manifest."""
    res = fmt.resolve(url)
    info = res.manifest
    assert info["num_classes"] == 0 and info["labelled"] is False and info["label_ext"] is None
    assert not fmt.is_labelled(info) and not info["multi_label"]
    assert fmt.read_classes(res) == []
    rows = _rows(url)
    assert rows and {r["label"] for r in rows} == {-1}
    assert all(n.endswith(".jpg") for n in _members(url)) and len(_members(url)) == len(rows)
    return info


def test_folder_tree_is_written_as_images_only(tmp_path: Path) -> None:
    """Images at any depth are kept byte for byte; hidden files, non-images and links out of SRC are rejects."""
    import webdataset as wds

    good = _tree(tmp_path / "src")
    url = str(tmp_path / "ds")
    write_shards_main([str(tmp_path / "src"), url, "--unlabelled", "--samples-per-shard", "2", "--workers", "1",
                       "--quiet"])
    info = _check_unlabelled(url)
    assert info["counts"] == {"train": 5}
    rows = _rows(url)
    by_src = {str(Path(r["src"]).relative_to(tmp_path / "src")): r for r in rows}
    assert set(by_src) == set(good)
    st = open_storage(fmt.resolve(url).root_url)
    for name, data in good.items():
        r = by_src[name]
        assert st.open_range(r["shard"], r["offset"], r["offset"] + r["size"]).read() == data
        assert r["sha256"] == hashlib.sha256(data).digest()
    assert _rejects(url) == {".hidden.jpg": "hidden", "notes.txt": "not_an_image", "escape.jpg": "symlink_outside_src"}
    # stock webdataset reads the shards: every sample is an image and nothing else
    shards = [str(Path(fmt.resolve(url).root_url) / r["shard"]) for r in fmt.read_index(fmt.resolve(url)).to_pylist()]
    seen = {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False)}
    assert {k: set(s) - {"__key__", "__url__", "__local_path__"} for k, s in seen.items()} == {
        r["key"]: {"jpg"} for r in rows}
    assert {seen[r["key"]]["jpg"] for r in rows} == set(good.values())


def test_labelled_folder_used_unlabelled_is_another_version(tmp_path: Path) -> None:
    """The same class folders written with --unlabelled: same images, no labels, a different version id."""
    from pipeline.demo_data import make_digits_folder

    src = make_digits_folder(tmp_path / "digits", image_size=IMAGE, limit=40)
    labelled = write_dataset(src, str(tmp_path / "labelled"), samples_per_shard=16, progress=False)
    unlabelled = write_dataset(src, str(tmp_path / "unlabelled"), samples_per_shard=16, unlabelled=True,
                               progress=False)
    assert labelled["num_classes"] == 10 and "labelled" not in labelled and labelled["label_ext"] == "cls"
    assert unlabelled["dataset_version"] != labelled["dataset_version"]
    _check_unlabelled(str(tmp_path / "unlabelled"))
    assert sorted(r["sha256"] for r in _rows(str(tmp_path / "unlabelled"))) == sorted(
        r["sha256"] for r in _rows(str(tmp_path / "labelled")))
    # the same DEST: the unlabelled write is other data, so it needs --overwrite like any other
    with pytest.raises(fmt.DatasetExists):
        write_dataset(src, str(tmp_path / "labelled"), samples_per_shard=16, unlabelled=True, progress=False)


def test_manifest_without_labels_is_unlabelled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No labels column: unlabelled without a flag. A labelled manifest with --unlabelled: the same dataset."""
    for i in range(6):
        _jpeg(tmp_path / "img" / f"{i}.jpg", i)
    lines = [f"img/{i}.jpg,{'val' if i == 5 else 'train'}" for i in range(6)] + ["img/0.jpg,train"]  # a repeat
    (tmp_path / "plain.csv").write_text("path,split\n" + "\n".join(lines) + "\n")
    (tmp_path / "labelled.csv").write_text("path,label,split\n" + "\n".join(
        f"{p},c{n % 2},{s}" for n, (p, s) in enumerate(x.split(",") for x in lines[:-1])) + "\n")
    plain = write_dataset(tmp_path / "plain.csv", str(tmp_path / "plain"), samples_per_shard=4, progress=False)
    _check_unlabelled(str(tmp_path / "plain"))
    assert plain["counts"] == {"train": 5, "val": 1}
    assert _rejects(str(tmp_path / "plain")) == {"0.jpg": "duplicate_row"}
    write_shards_main([str(tmp_path / "labelled.csv"), str(tmp_path / "ignored"), "--unlabelled",
                       "--samples-per-shard", "4", "--workers", "1", "--quiet"])
    assert "unlabelled (images only)" in capsys.readouterr().out
    assert fmt.resolve(str(tmp_path / "ignored")).version == plain["dataset_version"]
    assert fmt.read_index(fmt.resolve(str(tmp_path / "ignored"))).to_pylist() == fmt.read_index(
        fmt.resolve(str(tmp_path / "plain"))).to_pylist()
    labelled = write_dataset(tmp_path / "labelled.csv", str(tmp_path / "with-labels"), samples_per_shard=4,
                             progress=False)
    assert labelled["num_classes"] == 2 and labelled["dataset_version"] != plain["dataset_version"]


def test_contradicting_flags_are_one_line_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tree(tmp_path / "src")
    with pytest.raises(SystemExit) as exc:
        write_shards_main([str(tmp_path / "src"), str(tmp_path / "ds"), "--unlabelled", "--labels-column", "y",
                           "--multi-label", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 2 and all("contradicts --unlabelled" in ln for ln in err), err
    assert not (tmp_path / "ds").exists()


def test_release_tar_unlabelled(tmp_path: Path) -> None:
    """The ImageNet-21k release tar with --unlabelled: the same images, no synset labels."""
    from test_prepare import make_release_tar

    tar = make_release_tar(tmp_path / "release.tar")
    labelled = write_dataset(tar, str(tmp_path / "labelled"), samples_per_shard=5, progress=False)
    info = write_dataset(tar, str(tmp_path / "unlabelled"), samples_per_shard=5, unlabelled=True, progress=False)
    _check_unlabelled(str(tmp_path / "unlabelled"))
    assert info["counts"] == labelled["counts"] == {"train": 18}
    assert sorted(r["sha256"] for r in _rows(str(tmp_path / "unlabelled"))) == sorted(
        r["sha256"] for r in _rows(str(tmp_path / "labelled")))


def test_s3_folder_unlabelled(s3_bucket: str, tmp_path: Path) -> None:
    """An s3:// prefix of image keys at any depth, written with --unlabelled; hidden keys are rejects."""
    st = open_storage(f"s3://{s3_bucket}/raw")
    images = {k: _jpeg(tmp_path / f"{i}.jpg", i) for i, k in enumerate(["top.jpg", "a/one.jpg", "a/b/two.jpg"])}
    for key, data in images.items():
        st.write_bytes(key, data)
    st.write_bytes("a/.DS_Store", b"junk")
    st.write_bytes("a/readme.txt", b"text")
    url = f"s3://{s3_bucket}/ds"
    info = write_dataset(f"s3://{s3_bucket}/raw", url, samples_per_shard=2, unlabelled=True, progress=False)
    res = fmt.resolve(url)
    assert info["num_classes"] == 0 and info["labelled"] is False and fmt.read_classes(res) == []
    rows = fmt.read_samples(res).to_pylist()
    assert {r["label"] for r in rows} == {-1} and len(rows) == 3
    assert {r["src"].split("/raw/", 1)[1] for r in rows} == set(images)
    assert _rejects(url) == {".DS_Store": "hidden", "readme.txt": "not_an_image"}


@pytest.mark.integration
def test_prepare_on_ray_writes_what_write_shards_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """prepare.py --unlabelled (local Ray) = write_shards --unlabelled: same version, index and rows.
    Its audit counts the images as unlabelled, and its filtered copy is unlabelled too."""
    import ray

    from orchestration.audit import main as audit_main
    from orchestration.launch.cluster import connect_ray
    from orchestration.prepare import main as prepare_main

    _tree(tmp_path / "src")
    flags = ["--unlabelled", "--samples-per-shard", "2", "--val-fraction", "0.2", "--seed", "3"]
    write_shards_main([str(tmp_path / "src"), str(tmp_path / "single"), *flags, "--workers", "1", "--quiet"])
    capsys.readouterr()
    connect_ray()
    try:
        prepare_main([str(tmp_path / "src"), str(tmp_path / "ray"), *flags, "--tasks", "2", "--cpus-per-task", "0.5"])
        out = capsys.readouterr().out
        audit_main([str(tmp_path / "ray"), "--decode-fraction", "1", "--report", str(tmp_path / "report"),
                    "--write-filtered", str(tmp_path / "filtered"), "--tasks", "2", "--cpus-per-task", "0.5",
                    "--quiet"])
    finally:
        ray.shutdown()
    report = json.loads((tmp_path / "report" / "audit.json").read_text())
    assert report["classes"] == {"(unlabelled)": 5}
    _check_unlabelled(str(tmp_path / "filtered"))
    result = json.loads(out.strip().splitlines()[-1].split(" ", 1)[1])
    single, on_ray = fmt.resolve(str(tmp_path / "single")), fmt.resolve(str(tmp_path / "ray"))
    assert on_ray.version == single.version == result["dataset_version"]
    assert fmt.read_index(on_ray).to_pylist() == fmt.read_index(single).to_pylist()
    assert fmt.read_samples(on_ray).to_pylist() == fmt.read_samples(single).to_pylist()
    _check_unlabelled(str(tmp_path / "ray"))
    assert "unlabelled (images only)" in out


@pytest.fixture(scope="module")
def digits_unlabelled(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The digits demo as a plain folder (python -m pipeline.demo_data digits DST --unlabelled), written
    with --unlabelled: 160 train / 40 val images."""
    from pipeline.demo_data import main as demo_main

    tmp = tmp_path_factory.mktemp("digits_unlabelled")
    demo_main(["digits", str(tmp / "src"), "--unlabelled", "--limit", "200", "--image-size", str(IMAGE)])
    assert not [p for p in (tmp / "src").iterdir() if p.is_dir()]  # no class folders
    write_shards_main([str(tmp / "src"), str(tmp / "ds"), "--unlabelled", "--val-fraction", "0.2",
                       "--samples-per-shard", "100", "--workers", "1", "--quiet"])
    return str(tmp / "ds")


def test_supervised_run_on_unlabelled_data_fails_before_ray(digits_unlabelled: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """pretrain --dry-run: a classification recipe is refused in one line (exit 2); MAE needs no labels."""
    import ray

    from orchestration import pretrain

    storage = ["--storage", str(tmp_path / "runs")]
    rc = pretrain.main(["--recipe", "vit_mu_smoke", "--data", digits_unlabelled, "--dry-run", *storage])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"error: --data {digits_unlabelled}: dataset has no labels (written with --unlabelled): a "
                      "supervised recipe (train.objective.kind=classification) cannot train on it; use an objective "
                      "that needs none, e.g. --recipe mae_vit_mu_digits")
    assert not ray.is_initialized()
    rc = pretrain.main(["--recipe", "mae_vit_mu_digits", "--data", digits_unlabelled, "--dry-run", *storage])
    cap = capsys.readouterr()
    assert rc == 0 and cap.err == "", cap.err
    assert json.loads(cap.out)["data.source.url"] == digits_unlabelled


def test_fewshot_and_linear_on_unlabelled_data_are_refused(digits_unlabelled: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from model import create_model
    from orchestration.evaluate import main as evaluate_main
    from orchestration.evaluation import FewShotDataError, open_pool
    from orchestration.tracking import write_model_dir

    model = write_model_dir(create_model("mu/4", num_classes=3, image_size=IMAGE), tmp_path / "model")
    for cmd, extra in (("fewshot", ["--shots", "1"]), ("linear", [])):
        code = evaluate_main([cmd, "--model", str(model), "--data", digits_unlabelled, "--device", "cpu", *extra])
        cap = capsys.readouterr()
        assert code == 2 and cap.out == "", (cmd, cap.out)
        (line,) = cap.err.strip().splitlines()
        assert line.startswith(f"error: --data {digits_unlabelled}: dataset has no labels (written with "
                               "--unlabelled): few-shot and linear evaluation"), line
    with pytest.raises(FewShotDataError, match="no labels"):
        open_pool(digits_unlabelled)
