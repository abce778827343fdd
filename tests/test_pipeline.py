"""pipeline/: writer, plan, loader, decode - against local folders (S3 in test_pipeline_s3.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import (
    BadDataError,
    DataConfig,
    IOConfig,
    PreprocessConfig,
    SourceConfig,
    build_loader,
    open_storage,
    write_dataset,
)
from pipeline.decode import BadSample, decode_eval, decode_train
from pipeline.demo_data import decode_index, make_digits_folder, make_digits_manifest, make_index_folder
from pipeline.format import read_samples, reseal, resolve
from pipeline.plan import EpochPlan, consumed_ids, epoch_order

N_IDS = 500
MEAN = STD = (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def id_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """500 index-coded images in deliberately uneven shards (13 x 37 + 1 x 19), plus val."""
    root = tmp_path_factory.mktemp("ids")
    make_index_folder(root / "src", n=N_IDS, num_classes=10)
    write_dataset(root / "src", str(root / "ds"), samples_per_shard=37, progress=False)
    return root / "ds"


@pytest.fixture(scope="module")
def digits_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    make_digits_folder(root / "src", image_size=24, limit=300)
    write_dataset(root / "src", str(root / "ds"), samples_per_shard=50, val_fraction=0.2, seed=1,
                  workers=2, progress=False)
    return root / "ds"


def vdir(ds: Path) -> Path:
    """The folder of the published version of the dataset at ``ds`` (pipeline.format layout)."""
    return Path(resolve(str(ds)).root_url)


def sample_rows(ds: Path) -> list[dict]:
    """Every sample row of the published version (from its per-shard rows files)."""
    return read_samples(resolve(str(ds))).to_pylist()


def src_index(ds: Path, split: str = "train") -> np.ndarray:
    """Source index (from the file name) of each dataset sample id, canonical order."""
    rows = [r for r in sample_rows(ds) if r["split"] == split]
    names = pq.read_table(vdir(ds) / "index.parquet").to_pylist()
    pos = {r["shard"]: i for i, r in enumerate(n for n in names if n["split"] == split)}
    rows.sort(key=lambda r: (pos[r["shard"]], r["offset"]))
    return np.asarray([int(Path(r["src"]).stem) for r in rows])


def run_ids(loader, limit: int | None = None) -> list[np.ndarray]:
    """Source indices of every batch of one pass (optionally the first ``limit`` batches)."""
    out = []
    for n, batch in enumerate(loader):
        out.append(decode_index(batch[0].numpy(), MEAN, STD))
        if limit is not None and n + 1 >= limit:
            break
    return out


# ----------------------------------------------------------------------------- writer
def test_roundtrip_local_bytes_and_labels(digits_ds: Path) -> None:
    import webdataset as wds

    info = json.loads((digits_ds / "dataset.json").read_text())
    classes = json.loads((vdir(digits_ds) / "classes.json").read_text())
    assert info["num_classes"] == 10 and classes == [str(i) for i in range(10)]
    assert info["counts"] == {"train": 240, "val": 60}
    index = pq.read_table(vdir(digits_ds) / "index.parquet").to_pylist()
    assert {r["shard"] for r in index} == {f"shards/{p.name}" for p in (vdir(digits_ds) / "shards").iterdir()}
    st = open_storage(vdir(digits_ds))
    samples = sample_rows(digits_ds)
    for r in samples:  # byte ranges in the index are exactly the source files
        src = Path(r["src"])
        assert st.open_range(r["shard"], r["offset"], r["offset"] + r["size"]).read() == src.read_bytes()
        assert classes[r["label"]] == src.parent.name
    # stock webdataset reads the same shards: same keys, bytes and labels
    by_key = {r["key"]: r for r in samples}
    urls = [str(vdir(digits_ds) / r["shard"]) for r in index]
    seen = 0
    for s in wds.WebDataset(urls, shardshuffle=False):
        r = by_key[s["__key__"]]
        assert s["jpg"] == Path(r["src"]).read_bytes() and int(s["cls"]) == r["label"]
        seen += 1
    assert seen == 300
    # shuffled across classes: the first shard is not one class
    assert len({r["label"] for r in samples[:50]}) > 5


def test_writer_rejects_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.write_shards import main

    src = make_digits_folder(tmp_path / "src", image_size=16, limit=60)
    (src / "3" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "4" / "notes.txt").write_text("hello")
    Image.new("RGBA", (20, 10), (255, 0, 0, 128)).save(src / "5" / "alpha.png")  # re-encoded to JPEG
    dest = tmp_path / "ds"
    main([str(src), str(dest), "--samples-per-shard", "16", "--workers", "2", "--quiet"])
    out = capsys.readouterr().out
    assert "rejects: 2" in out and "undecodable=1" in out and "not_an_image=1" in out
    rej = pq.read_table(vdir(dest) / "rejects.parquet").to_pylist()
    assert sorted(r["reason"] for r in rej) == ["not_an_image", "undecodable"]
    info = json.loads((dest / "dataset.json").read_text())
    assert info["counts"]["train"] == 61
    png_row = next(r for r in sample_rows(dest) if r["src"].endswith(".png"))
    data = open_storage(vdir(dest)).open_range(png_row["shard"], png_row["offset"], png_row["offset"] + png_row["size"]).read()
    assert Image.open(io.BytesIO(data)).format == "JPEG"

    shards = sorted((vdir(dest) / "shards").iterdir())
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    main([str(src), str(dest), "--samples-per-shard", "16", "--workers", "2", "--quiet"])
    assert "shards written 0, resumed (already complete) 4" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in shards} == mtimes
    # a damaged shard fails its sha256 check and is rewritten; the others are kept
    victim = shards[1]
    raw = bytearray(victim.read_bytes())
    raw[1000:1100] = b"\x01" * 100
    victim.write_bytes(bytes(raw))
    main([str(src), str(dest), "--samples-per-shard", "16", "--workers", "1", "--quiet"])
    assert "shards written 1, resumed (already complete) 3" in capsys.readouterr().out
    got = {r["shard"]: r["sha256"] for r in pq.read_table(vdir(dest) / "index.parquet").to_pylist()}
    import hashlib

    assert got[f"shards/{victim.name}"] == hashlib.sha256(victim.read_bytes()).hexdigest()


def test_max_side_resizes(tmp_path: Path) -> None:
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    Image.new("RGB", (400, 100), (10, 200, 30)).save(src / "big.jpg")
    write_dataset(tmp_path / "src", str(tmp_path / "ds"), max_side=64, progress=False)
    r = sample_rows(tmp_path / "ds")[0]
    data = open_storage(vdir(tmp_path / "ds")).open_range(r["shard"], r["offset"], r["offset"] + r["size"]).read()
    assert Image.open(io.BytesIO(data)).size == (64, 16)


# ----------------------------------------------------------------------------- plan
@pytest.mark.parametrize("world,workers,batch", [(2, 2, 8), (3, 1, 5), (1, 3, 16)])
def test_plan_exactly_once_equal_lengths(world: int, workers: int, batch: int) -> None:
    sizes = [37, 3, 90, 1, 55, 20, 64, 11]  # deliberately uneven shards
    start = np.concatenate([[0], np.cumsum(sizes)])
    T = int(start[-1])
    drops = []
    for epoch in range(3):
        p = EpochPlan(epoch_order(start, seed=7, epoch=epoch, train=True), world, workers, batch, True, 7, epoch,
                      0, 16)
        em = [p.slot_emission(s) for s in range(p.num_slots)]
        assert {len(e) for e in em} == {p.slot_len} and p.slot_len % batch == 0
        ids = np.concatenate(em)
        assert len(ids) == len(set(ids.tolist()))
        assert T - len(ids) == p.dropped < world * workers * batch
        # slots read stream segments; the shuffle buffer only reorders within a slot
        for s in range(p.num_slots):
            assert sorted(em[s].tolist()) == sorted(p.slot_stream(s).tolist())
        drops.append(frozenset(set(range(T)) - set(ids.tolist())))
    assert len(set(drops)) > 1  # a different remainder each epoch


def test_plan_eval_pads_and_covers() -> None:
    start = np.array([0, 10, 13, 40])
    p = EpochPlan(epoch_order(start, seed=0, epoch=0, train=False), 3, 2, 4, False, 0, 0)
    em = np.concatenate([p.slot_emission(s) for s in range(6)])
    assert sorted(em[em >= 0].tolist()) == list(range(40))
    assert p.batches_per_slot == 2 and len(em) == 6 * 8


def test_consumed_ids_matches_round_robin() -> None:
    start = np.array([0, 50, 100])
    p = EpochPlan(epoch_order(start, seed=0, epoch=0, train=True), 1, 2, 5, True, 0, 0, 0, 8)
    # 3 batches on a 2-worker rank: worker 0 gave batches 0 and 2, worker 1 gave batch 1
    want = np.concatenate([p.slot_emission(0)[:10], p.slot_emission(1)[:5]])
    assert sorted(consumed_ids(p, 3).tolist()) == sorted(want.tolist())


# ----------------------------------------------------------------------------- loader (in-process)
def cfg_for(ds: Path, **kw) -> DataConfig:
    base = DataConfig(source=SourceConfig(url=str(ds)), image_size=16, batch_size=8,
                      io=IOConfig(num_workers=0, shuffle_buffer=32), preprocess=PreprocessConfig(mean=MEAN, std=STD))
    return base.replace(**kw)


def test_deterministic_per_seed_and_differs_across_epochs(id_ds: Path) -> None:
    a = build_loader(cfg_for(id_ds, seed=3), rank=0, world_size=1)
    b = build_loader(cfg_for(id_ds, seed=3), rank=0, world_size=1)
    ea0 = np.concatenate(run_ids(a))
    assert a.epoch == 1
    ea1 = np.concatenate(run_ids(a))
    eb0 = np.concatenate(run_ids(b))
    assert np.array_equal(ea0, eb0)
    assert not np.array_equal(ea0, ea1)
    assert len(ea0) == len(a) * 8 == (N_IDS // 8) * 8
    c = build_loader(cfg_for(id_ds, seed=4), rank=0, world_size=1)
    assert not np.array_equal(ea0, np.concatenate(run_ids(c)))
    assert len(set(ea0.tolist())) == len(ea0)


def test_targets_match_labels_and_shapes(digits_ds: Path) -> None:
    ld = build_loader(cfg_for(digits_ds, batch_size=16, image_size=24, train=False, **{"source.split": "val"}), rank=0,
                      world_size=1)
    x, y, valid = next(iter(ld))
    assert x.shape == (16, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert valid.dtype == torch.bool and ld.num_classes == 10 and not ld.multi_label
    tr = build_loader(cfg_for(digits_ds, batch_size=16, image_size=24, **{"augment.mixup_alpha": 0.8, "augment.cutmix_alpha": 1.0}),
                      rank=0, world_size=1)
    x, y = next(iter(tr))
    assert y.shape == (16, 10) and y.dtype == torch.float32
    torch.testing.assert_close(y.sum(1), torch.ones(16))
    ra = build_loader(cfg_for(digits_ds, batch_size=4, image_size=24, **{"augment.randaugment": (2, 9)}), rank=0, world_size=1)
    assert next(iter(ra))[0].shape == (4, 3, 24, 24)


def test_eval_exactly_once_with_mask(id_ds: Path) -> None:
    world = 3
    got, lens = [], []
    for rank in range(world):
        ld = build_loader(cfg_for(id_ds, train=False, batch_size=16), rank=rank, world_size=world)
        lens.append(len(ld))
        n = 0
        for x, _y, valid in ld:
            got.append(decode_index(x.numpy(), MEAN, STD)[valid.numpy()])
            n += 1
        assert n == len(ld)
    assert len(set(lens)) == 1
    ids = np.concatenate(got)
    assert sorted(ids.tolist()) == list(range(N_IDS))


def test_limit_samples(id_ds: Path) -> None:
    ld = build_loader(cfg_for(id_ds, train=False, **{"source.limit_samples": 45}), rank=0, world_size=1)
    ids = np.concatenate([decode_index(x.numpy())[v.numpy()] for x, _, v in ld])
    assert sorted(ids.tolist()) == sorted(src_index(id_ds)[:45].tolist())


def test_multilabel_targets(tmp_path: Path) -> None:
    man = make_digits_manifest(tmp_path / "src", image_size=16, limit=64)
    write_dataset(man, str(tmp_path / "ds"), samples_per_shard=20, progress=False)
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    classes = json.loads((vdir(tmp_path / "ds") / "classes.json").read_text())
    assert info["multi_label"] and info["num_classes"] == 13 and "even" in classes
    ld = build_loader(cfg_for(tmp_path / "ds", train=False, batch_size=64), rank=0, world_size=1)
    assert ld.multi_label
    _, y, valid = next(iter(ld))
    assert y.shape == (64, 13) and y.dtype == torch.float32 and valid.all()
    rows = sample_rows(tmp_path / "ds")
    want = {tuple(sorted(classes[i] for i in r["labels"])) for r in rows}
    got = {tuple(sorted(classes[i] for i in np.flatnonzero(v.numpy()))) for v in y}
    assert got == want and set(y.sum(1).tolist()) <= {2.0, 3.0}
    tr = build_loader(cfg_for(tmp_path / "ds", batch_size=16), rank=0, world_size=1)
    assert next(iter(tr))[1].shape == (16, 13)
    # the stock webdataset view carries the labels as .json
    import webdataset as wds

    s = next(iter(wds.WebDataset(str(vdir(tmp_path / "ds") / "shards" / "train-000000.tar"), shardshuffle=False)))
    assert isinstance(json.loads(s["json"]), list)


# ----------------------------------------------------------------------------- bad data
def _corrupt(url: Path) -> dict[str, int]:
    """Damage a written dataset in place: garbage JPEGs, bad labels, a truncated shard; then
    re-record its checksums, as if the data had been bad when written (unsealed edits are
    caught as tampering: tests/test_dataset_integrity.py)."""
    ds = vdir(url)
    rows = sample_rows(url)
    train = [r for r in rows if r["split"] == "train"]
    for r in train[:3]:  # corrupt image bytes, same length
        p = ds / r["shard"]
        b = bytearray(p.read_bytes())
        b[r["offset"]: r["offset"] + r["size"]] = b"\x00" * r["size"]
        p.write_bytes(bytes(b))
    train[3]["label"] = -1
    train[4]["label"] = 99
    last_shard = max(r["shard"] for r in train)
    last = [r for r in train if r["shard"] == last_shard]
    cut = last[-2]["offset"] + 10  # last two members of the last shard are cut off
    (ds / last_shard).write_bytes((ds / last_shard).read_bytes()[:cut])
    reseal(str(url), samples=rows)
    return {"skipped_corrupt_image": 3, "skipped_missing_label": 1, "skipped_label_out_of_range": 1,
            "skipped_truncated": 2}


def test_corrupt_samples_skipped_counted_and_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_index_folder(tmp_path / "src", n=240)
    write_dataset(tmp_path / "src", str(tmp_path / "ds"), samples_per_shard=40, progress=False)
    want = _corrupt(tmp_path / "ds")
    ev = build_loader(cfg_for(tmp_path / "ds", train=False, batch_size=16, **{"io.max_bad_fraction": 0.05}), rank=0,
                      world_size=1)
    n_valid = sum(int(v.sum()) for _, _, v in ev)
    st = ev.stats()
    assert {k: st[k] for k in want} == want and st["skipped"] == 7
    assert n_valid == st["samples"] == 240 - 7
    assert "skipping bad sample: shard shards/train-" in caplog.text
    tr = build_loader(cfg_for(tmp_path / "ds", batch_size=16, **{"io.max_bad_fraction": 0.05}), rank=0, world_size=1)
    batches = list(tr)
    assert len(batches) == 15 and all(b[0].shape[0] == 16 for b in batches)  # bad rows filled, not dropped
    assert tr.stats()["filled"] == tr.stats()["skipped"] <= 7
    strict = build_loader(cfg_for(tmp_path / "ds", train=False, batch_size=16, **{"io.max_bad_fraction": 0.01}), rank=0,
                          world_size=1)
    with pytest.raises(BadDataError, match=r"worst shards: shards/train-00000\d\.tar"):
        list(strict)


def _jpeg(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    im = Image.new("RGB", size, (200, 30, 60)).convert(mode)
    im.save(buf, format="JPEG")
    return buf.getvalue()


def test_decode_modes_draft_and_caps() -> None:
    import random

    for mode in ("RGB", "L", "CMYK"):
        out = decode_train(_jpeg((120, 90), mode), size=32, rng=random.Random(0))
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert decode_eval(_jpeg((640, 480)), size=64).shape == (64, 64, 3)
    buf = io.BytesIO()
    Image.new("RGBA", (50, 40), (1, 2, 3, 4)).save(buf, format="PNG")
    assert decode_eval(buf.getvalue(), size=16).shape == (16, 16, 3)
    with pytest.raises(BadSample) as e:
        decode_train(_jpeg((300, 300)), size=32, rng=random.Random(0), max_pixels=10_000)
    assert e.value.reason == "too_many_pixels"
    with pytest.raises(BadSample) as e:
        decode_eval(_jpeg((64, 64))[:200], size=16)
    assert e.value.reason == "corrupt_image"
    # draft: a full-image crop of a 1600x1200 JPEG to 64 px decodes at 1/8 scale
    from pipeline import decode as dec

    seen = []
    orig = dec._jpeg_crop
    dec._jpeg_crop = lambda data, w, h, m, *rest: seen.append((w * m // 8, h * m // 8)) or orig(data, w, h, m, *rest)
    try:
        decode_train(_jpeg((1600, 1200)), size=64, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), rng=random.Random(0))
        decode_train(_jpeg((1600, 1200)), size=64, scale=(0.04, 0.04), ratio=(4 / 3, 4 / 3), rng=random.Random(0))
    finally:
        dec._jpeg_crop = orig  # type: ignore[assignment]
    assert seen == [(200, 150), (800, 600)]  # a 320x240 crop: PIL draft's rule takes 1/2


def test_csv_manifest_and_shard_bytes(tmp_path: Path) -> None:
    make_digits_folder(tmp_path / "src", image_size=16, limit=40)
    files = sorted((tmp_path / "src").rglob("*.jpg"))
    lines = ["path,labels"] + [f"{p.relative_to(tmp_path)},{p.parent.name}|{'even' if int(p.parent.name) % 2 == 0 else 'odd'}"
                               for p in files] + ["src/0/missing.jpg,", "src/0/gone.jpg,odd"]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    limit = 8 * 1024
    info = write_dataset(tmp_path / "m.csv", str(tmp_path / "ds"), shard_bytes=limit, progress=False)
    assert info["multi_label"] and info["counts"]["train"] == 40
    assert info["summary"]["rejects"] == {"missing_label": 1, "unreadable": 1}
    index = pq.read_table(vdir(tmp_path / "ds") / "index.parquet").to_pylist()
    assert len(index) > 3 and all(r["bytes"] <= limit + 10240 + 2048 for r in index)
    ld = build_loader(cfg_for(tmp_path / "ds", train=False, batch_size=40), rank=0, world_size=1)
    _, y, _ = next(iter(ld))
    assert y.shape == (40, 12) and (y.sum(1) == 2).all()


def test_two_layout_changes_in_one_epoch_no_repeats(id_ds: Path) -> None:
    """world 2 -> 3 (batch 8 -> 5) -> 1 inside one epoch: nothing repeats, little is left out."""
    seen: list[np.ndarray] = []
    state = None
    for world, batch, k in ((2, 8, 6), (3, 5, 7), (1, 8, None)):
        states = []
        for rank in range(world):
            ld = build_loader(cfg_for(id_ds, batch_size=batch), rank=rank, world_size=world)
            if state is not None:
                ld.load_state_dict(state)
            seen += run_ids(ld, k)
            states.append(ld.state_dict())
        state = states[0]
    assert state["epoch"] == 1 and state["batches"] == 0
    ids = np.concatenate(seen)
    assert len(ids) == len(set(ids.tolist()))
    assert N_IDS - len(ids) < 2 * 8 + 3 * 5 + 1 * 8


# ----------------------------------------------------------------------------- region decode, uint8 output
def _pil_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import decode as dec

    monkeypatch.setattr(dec, "_jpeg_header", lambda *a: None)  # PIL's own full decode, for every image


def _outcome(fn, *args, **kw) -> np.ndarray | str:
    try:
        return fn(*args, **kw)
    except BadSample as exc:
        return exc.reason


def test_region_decode_equals_pil_full_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our decoder (pipeline/_jpeg.c) decodes only the crop (rows above skipped, columns beside it cropped, nothing
    below); the pixels are PIL's full decode (+ draft for the scale) cropped, for every layout, and
    truncated or damaged data gets the same verdict, except that damage wholly below the crop is
    never read (valid pixels) and damage PIL only warns about is refused (see test_jpeg_decoder)."""
    import random

    from pipeline import decode as dec
    from pipeline.demo_data import make_photos

    photos = list(make_photos(12, size=(500, 375), seed=3, quality=90))
    photos.append(_jpeg((333, 517), "L"))  # grayscale, odd size
    photos.append(_jpeg((640, 480), "CMYK"))  # PIL's path in both runs
    for kw in ({"progressive": True}, {"subsampling": 0}, {"restart_marker_blocks": 4}):  # other JPEG layouts
        buf = io.BytesIO()
        Image.open(io.BytesIO(photos[0])).save(buf, format="JPEG", quality=85, **kw)
        photos.append(buf.getvalue())
    cases = []
    for k, data in enumerate(photos):
        for size, scale in ((224, (0.08, 1.0)), (64, (0.3, 1.0))):  # 64 px: DCT scaling too
            cases.append((data, size, scale, k))
    damaged = []
    for data in photos[:4]:
        n = len(data)
        damaged += [data[: n // 3], data[: n - 50], data[:300]]
    cases += [(d, 224, (0.08, 1.0), 100 + i) for i, d in enumerate(damaged)]

    calls = {"region": 0}
    orig = dec._jpeg_crop

    def counting(*a):
        calls["region"] += 1
        return orig(*a)

    monkeypatch.setattr(dec, "_jpeg_crop", counting)
    region = [[_outcome(decode_train, d, size=s, scale=sc, rng=random.Random(i)) for i in range(6)]
              for d, s, sc, _ in cases]
    assert calls["region"] > 4 * len(cases)  # the C decoder ran for (nearly) every crop
    _pil_only(monkeypatch)
    for (d, s, sc, k), got in zip(cases, region, strict=True):
        for i, g in enumerate(got):
            want = _outcome(decode_train, d, size=s, scale=sc, rng=random.Random(i))
            if isinstance(want, str) and not isinstance(g, str):
                assert k >= 100, f"case {k}: the region decode accepted an image the full decode rejects"
                continue  # damage below the crop: the rows we need are intact
            assert type(g) is type(want), f"case {k} crop {i}: {g if isinstance(g, str) else 'pixels'} vs {want}"
            if isinstance(g, str):
                assert g == want
            else:
                assert np.array_equal(g, want), f"case {k} crop {i}: pixels differ"
    monkeypatch.undo()
    for data in photos:  # eval: resize + center crop, also a region decode
        want_eval = None
        with monkeypatch.context() as mp:
            mp.setattr(dec, "_jpeg_header", lambda *a: None)
            want_eval = decode_eval(data, size=96, crop_pct=0.6)
        assert np.array_equal(decode_eval(data, size=96, crop_pct=0.6), want_eval)


def test_uint8_output_normalizes_to_float_output(digits_ds: Path) -> None:
    for workers in (0, 2):
        for train in (True, False):
            kw = {"io.num_workers": workers, "train": train, "batch_size": 20, "preprocess.mean": (0.4, 0.5, 0.6),
                  "preprocess.std": (0.2, 0.3, 0.4)}
            f = build_loader(cfg_for(digits_ds, **kw), rank=0, world_size=1)
            u = build_loader(cfg_for(digits_ds, output="uint8", **kw), rank=0, world_size=1)
            n = 0
            for bf, bu in zip(f, u, strict=True):
                assert bf[0].dtype == torch.float32 and bu[0].dtype == torch.uint8
                assert torch.allclose(u.normalize(bu[0]), bf[0], atol=1e-6)
                assert torch.equal(bf[1], bu[1])
                assert u.normalize(bf[0]) is bf[0]  # float passes through
                n += 1
            assert n == len(f) > 0
    with pytest.raises(ValueError, match="output"):
        cfg_for(digits_ds, output="fp16")


def test_batch_memory_reuses_only_unreferenced_mappings() -> None:
    import gc

    from pipeline.transforms import BatchMemory

    mem = BatchMemory(keep=3)
    shape = (16, 3, 224, 224)  # 9.6 MB: above LARGE_BATCH_BYTES
    a = mem.empty(shape)
    a.fill_(1.0)
    b = mem.empty(shape)
    assert a.data_ptr() != b.data_ptr()
    pa, view = a.data_ptr(), a[3:5]
    del a
    c = mem.empty(shape)
    assert c.data_ptr() not in (pa, b.data_ptr()), "a view of the first batch is alive: no reuse"
    del view
    gc.collect()
    d = mem.empty(shape)
    assert d.data_ptr() == pa, "every view died: the mapping is reused"
    arr, pd = d.numpy(), d.data_ptr()
    del d
    assert mem.empty(shape).data_ptr() != pd, "a numpy view is alive: no reuse"
    del arr
    assert mem.empty(shape).data_ptr() == pd
    assert len(mem._maps) <= 3
    small = mem.empty((2, 3, 8, 8))  # small tensors are plain torch.empty
    assert small.shape == (2, 3, 8, 8) and small.dtype == torch.float32
