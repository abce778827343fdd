"""prepare.py and audit.py on one local Ray instance (in this process, started once).

prepare: byte-identical to write_shards, a re-run verifies and keeps every shard. audit:
planted exact and near duplicates, a planted corrupt shard. The datasets are real photographs (crops, pipeline.demo_data) written by the real writer from a
manifest with explicit splits; the plants are made the way they happen in real data: the same
file twice, a test image re-saved smaller at another JPEG quality, one flipped byte in a shard.
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from pipeline import format as fmt
from pipeline import write_dataset
from pipeline.shard_audit import NearIndex, hamming, phash

pytestmark = pytest.mark.integration


def _distinct_photos(n: int, seed: int) -> list[bytes]:
    """``n`` photo crops, pairwise more than 16 pHash bits apart (no accidental near-duplicates:
    make_photos crops a few photographs, so two crops can overlap almost entirely)."""
    from pipeline.demo_data import make_photos

    out: list[bytes] = []
    for p in make_photos(4 * n, size=(128, 96), seed=seed):
        if all(hamming(phash(p), phash(q)) > 16 for q in out):
            out.append(p)
        if len(out) == n:
            return out
    raise AssertionError("test setup: not enough distinct photos")


def _reencode(data: bytes, scale: float, quality: int) -> bytes:
    im = Image.open(io.BytesIO(data))
    buf = io.BytesIO()
    im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _write(root: Path, files: list[tuple[str, bytes, str, str]], per_shard: int = 4) -> str:
    """Write (name, bytes, label, split) files + a manifest, then a dataset at root/ds."""
    (root / "img").mkdir(parents=True)
    lines = ["path,label,split"]
    for name, data, label, split in files:
        (root / "img" / name).write_bytes(data)
        lines.append(f"img/{name},{label},{split}")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    write_dataset(root / "m.csv", str(root / "ds"), samples_per_shard=per_shard, progress=False)
    return str(root / "ds")


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    from orchestration.launch.cluster import connect_ray

    connect_ray()  # a private local Ray (its own auth token, nothing under ~/.ray)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    photos = _distinct_photos(24, seed=5)
    train, val, evals = photos[:14], photos[14:18], photos[18:22]
    files = [(f"t{i}.jpg", p, f"c{i % 3}", "train") for i, p in enumerate(train)]
    files += [(f"v{i}.jpg", p, f"c{i % 3}", "val") for i, p in enumerate(val)]
    files += [("t_copy_of_t0.jpg", train[0], "c0", "train"),  # exact duplicate within train
              ("t_copy_of_v0.jpg", val[0], "c1", "train"),  # exact duplicate across splits
              ("t_near_v1.jpg", _reencode(val[1], 0.7, 60), "c2", "train"),  # re-encoded + resized
              ("t_near_e2.jpg", _reencode(evals[2], 1.5, 75), "c0", "train")]  # copy of a downstream test image
    tmp = tmp_path_factory.mktemp("audit")
    main = _write(tmp / "main", files)
    ev = _write(tmp / "eval", [(f"e{i}.jpg", p, "c0", "test") for i, p in enumerate(evals)])
    return {"main": main, "eval": ev, "tmp": str(tmp)}



def _prepare(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    from orchestration.prepare import main

    main(list(args))
    cap = capsys.readouterr()
    assert "images/s" in cap.err and "ETA" in cap.err and "rejects" in cap.err, cap.err[-2000:]
    return json.loads(cap.out.strip().splitlines()[-1].split(" ", 1)[1])


def test_prepare_is_byte_identical_to_write_shards_and_resumes(ray_local: None, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Same flags -> the same version and the same shard sha256s as write_shards; a re-run keeps them."""
    from test_prepare import make_release_tar

    from pipeline.write_shards import main as write_shards_main

    tar = make_release_tar(tmp_path / "release.tar")
    flags = ["--samples-per-shard", "4", "--val-fraction", "0.25", "--seed", "3", "--max-side", "16"]
    write_shards_main([str(tar), str(tmp_path / "single"), *flags, "--workers", "1", "--quiet"])
    capsys.readouterr()
    first = _prepare(capsys, str(tar), str(tmp_path / "ray"), *flags, "--tasks", "3", "--cpus-per-task", "0.5")
    single, on_ray = fmt.resolve(str(tmp_path / "single")), fmt.resolve(str(tmp_path / "ray"))
    assert on_ray.version == single.version == first["dataset_version"]
    assert fmt.read_index(on_ray).to_pylist() == fmt.read_index(single).to_pylist()
    assert fmt.read_samples(on_ray).to_pylist() == fmt.read_samples(single).to_pylist()
    assert first["summary"]["shards_written"] == len(fmt.read_index(single)) and first["summary"]["rejects"] == {
        "undecodable": 1, "not_an_image": 1, "unreadable_tar_member": 1}
    again = _prepare(capsys, str(tar), str(tmp_path / "ray"), *flags, "--tasks", "2", "--cpus-per-task", "0.5")
    assert again["summary"]["shards_written"] == 0
    assert again["summary"]["shards_resumed"] == first["summary"]["shards_written"]

def _key(url: str, name: str) -> str:
    """``split/key`` of the sample written from image file ``name``."""
    for r in fmt.read_samples(fmt.resolve(url)).to_pylist():
        if r["src"].endswith(f"/{name}"):
            return f"{r['split']}/{r['key']}"
    raise AssertionError(name)


def test_near_index_finds_exactly_the_hashes_within_t() -> None:
    import random

    rng = random.Random(0)
    refs = [rng.getrandbits(64) for _ in range(500)]
    idx = NearIndex(6)
    for i, h in enumerate(refs):
        idx.add(h, i)
    for q in refs[:50] + [refs[7] ^ 0b1011, refs[9] ^ (0b111111 << 40), refs[11] ^ 0b1111111]:
        want = sorted(i for i, h in enumerate(refs) if hamming(q, h) <= 6)
        assert sorted(p for _, p in idx.query(q)) == want


def test_audit_finds_planted_duplicates_and_writes_a_filtered_dataset(
        planted: dict[str, str], ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestration.audit import main

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root lands here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    url, filtered = planted["main"], str(tmp_path / "filtered")
    main([url, "--against", planted["eval"], "--write-filtered", filtered, "--report", str(tmp_path / "rep"),
          "--quiet", "--tasks", "2", "--cpus-per-task", "0.5"])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "rep" / "audit.json").read_text())
    assert report["shards"]["ok"] == report["shards"]["total"] and not report["shards"]["bad"]
    k = {n: _key(url, n) for n in ("t0.jpg", "t_copy_of_t0.jpg", "v0.jpg", "t_copy_of_v0.jpg", "v1.jpg",
                                    "t_near_v1.jpg", "t_near_e2.jpg")}
    ex = report["exact_duplicates"]
    assert [sorted(g["samples"]) for g in ex["within_split"]] == [sorted([k["t0.jpg"], k["t_copy_of_t0.jpg"]])]
    assert [sorted(g["samples"]) for g in ex["across_splits"]] == [sorted([k["v0.jpg"], k["t_copy_of_v0.jpg"]])]
    near = {(n["split"] + "/" + n["key"], n["match"]) for n in report["near_duplicates"]["across_splits"]}
    assert near == {(k["t_near_v1.jpg"], k["v1.jpg"]), (k["t_copy_of_v0.jpg"], k["v0.jpg"])}
    against = report["near_duplicates"]["against"][planted["eval"]]
    assert [(f"{n['split']}/{n['key']}", n["match"]) for n in against] == [
        (k["t_near_e2.jpg"], _key(planted["eval"], "e2.jpg"))]
    assert report["classes"] == {"c0": 9, "c1": 7, "c2": 6} and report["image_size"]["decoded"] == 22
    # The filtered dataset: the same images minus the three train copies of eval/test images.
    res = fmt.resolve(filtered)
    kept = {r["src"].rsplit("#", 1)[1] for r in fmt.read_samples(res).to_pylist()}
    gone = {k[n].split("/", 1)[1] for n in ("t_copy_of_v0.jpg", "t_near_v1.jpg", "t_near_e2.jpg")}
    assert len(kept) == 19 and not kept & gone and fmt.read_classes(res) == ["c0", "c1", "c2"]
    assert "near duplicates of" in out and "exact duplicates: 1 groups within a split, 1 across" in out
    import mlflow

    runs = mlflow.search_runs(experiment_names=["dataset-audit"])
    assert len(runs) == 1 and runs["metrics.near_duplicates_against"][0] == 1
    art = mlflow.artifacts.download_artifacts(run_id=runs["run_id"][0], artifact_path="audit",
                                              dst_path=str(tmp_path / "art"))
    assert json.loads(Path(art, "audit.json").read_text())["exact_duplicates"] == ex


def test_audit_names_a_corrupt_shard_and_exits_1(planted: dict[str, str], ray_local: None, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from orchestration.audit import main

    url = str(tmp_path / "ds")
    shutil.copytree(planted["main"], url)
    res = fmt.resolve(url)
    shard = fmt.read_index(res).to_pylist()[1]["shard"]
    path = Path(res.root_url) / shard
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # one flipped bit pattern inside the first image of the shard
    path.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as e:
        main([url, "--decode-fraction", "0.5", "--quiet", "--tasks", "2", "--cpus-per-task", "0.5"])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert f"BAD shard {shard}" in out and "sha256" in out
    result = json.loads(out.strip().splitlines()[-1].split(" ", 1)[1])
    assert result["bad_shards"] == 1 and result["samples"] == 22
    # Everything else is still audited: 22 samples, the other shards pass.
    assert f"{len(fmt.read_index(res)) - 1}/{len(fmt.read_index(res))} match" in out


def test_phash_is_stable_under_reencoding_and_far_between_photos() -> None:
    photos = _distinct_photos(6, seed=9)
    for p in photos:
        assert hamming(phash(p), phash(_reencode(p, 0.6, 50))) <= 4
        assert hamming(phash(p), phash(_reencode(p, 2.0, 95))) <= 4
    assert min(hamming(phash(a), phash(b)) for a, b in itertools.combinations(photos, 2)) > 16


def test_run_tasks_keeps_item_order_and_reports_a_stall(ray_local: None, capsys: pytest.CaptureFixture[str]) -> None:
    import time

    from orchestration.data.distribute import TaskSettings, run_tasks

    def slow_double(x: int, delay: float) -> int:
        time.sleep(delay * x)
        return 2 * x

    seen: list[int] = []
    out = run_tasks(slow_double, [3, 1, 2], (0.6,), TaskSettings(max_in_flight=2, cpus_per_task=0.5, stall_s=0.3),
                    on_result=seen.append)
    assert out == [6, 2, 4] and sorted(seen) == [2, 4, 6] and seen[0] == 2  # results in item order
    assert "no task finished in 0.3s; 2 in flight" in capsys.readouterr().err
