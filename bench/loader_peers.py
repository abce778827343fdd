"""Our loader against its peers (stock WebDataset, MosaicML streaming MDS, LitData, Ray Data): speed and resume.

    make peers-venv && .venv-peers/bin/python bench/loader_peers.py      # what `make bench` runs
    .venv/bin/python bench/loader_peers.py --quick                        # ours + webdataset only, ~20 s
    .venv/bin/python bench/loader_peers.py --only ours,raydata            # ours + Ray Data (no .venv-peers needed)

The same ~500x375 photo JPEGs are written once in each library's format with the bytes
unchanged (read back out of our shards): our shards, which are plain WebDataset tars too, an MDS
dataset (``bytes`` column) and LitData optimized chunks (``BinaryWriter``, bytes item). Every
library gets the same work: random-resized crop 224 (scale 0.08-1, ratio 3/4-4/3), flip, uint8
``(B, 3, 224, 224)`` out, batch 64, 2 DataLoader workers, shuffling on, one torch thread per
worker. Two tracks:

* **A**, each library's native decode path: ours (JPEG header -> crop -> region decode of the
  crop, pipeline/_jpeg.c); webdataset ``.decode("pil")``; MDS ``PIL.Image.open`` (what its ``jpeg``
  column type does); LitData ``torchvision.io.decode_jpeg`` (what its JPEG serializer does); Ray
  Data ``read_webdataset``'s default decoder (PIL -> numpy); the peers then torchvision
  ``v2.RandomResizedCrop`` + ``RandomHorizontalFlip``.
* **B**, every library hands the raw bytes to our decoder (``pipeline.decode.decode_train``),
  which isolates the loader from the decode.

Ray Data reads our tars with ``read_webdataset`` in Ray tasks on all cores of a private Ray
instance (started before its runs, stopped after them; its rounds come after the others'), files
shuffled per epoch, a 500-sample local shuffle buffer, ``iter_torch_batches``; its tasks run ahead
of the consumer, so its comparable number is the epoch img/s column (see :data:`COLUMNS`); not in
``--quick``. Each on local disk and on S3 (a moto server started here on 127.0.0.1; MDS and LitData
download into a fresh cache dir per round, webdataset streams ``pipe:curl``, Ray Data reads through
pyarrow's S3 filesystem, ours ranged reads). Per
configuration: steady-state img/s (median over alternating rounds; from the arrival of the first
round of batches, one per worker, to the arrival of the last batch: the same window for every
library, shutdown excluded, see ``measure``), time to first batch, CPU-ms per image (whole epoch,
this process and its workers, not the S3 server) and R = img/s / decode limit, where the limit is
``cores / (decode-only seconds per image of our decoder)`` measured in the same run.

Resume: on an id-coded dataset (640 images, batch 16, 2 workers) each library's own
``state_dict`` is taken after 7 batches, a new loader resumes from it and the remaining sample ids
are compared with the same uninterrupted epoch's (exact order); then the same state is resumed on
2 ranks (each library's own rank variables; a subprocess per rank) and the union of what they
serve is compared with the ids the epoch had left (no repeats, nothing lost). Results go to
``--table`` (markdown) and ``--json``.

``--baseline`` adds "ours, PIL decode": our loader with every image decoded whole by PIL (what
Pillow alone gives; the same pixels as our region decoder), alternating with the others in the
same rounds, and that path's decode-only cost, so the decoder's share is one invocation.
``--only ours,litdata`` limits the libraries (speed and resume).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import loader_peer_libs as peers  # noqa: E402

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
RESUME_N, RESUME_BATCH, RESUME_AT = 640, 16, 7


# ---------------------------------------------------------------- measuring
def _cpu(exclude: set[int]) -> float:
    """CPU seconds of this process, its reaped children, and its live children (minus ``exclude``)."""
    import psutil

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    for c in psutil.Process().children(recursive=True):
        if c.pid in exclude:
            continue
        with contextlib.suppress(psutil.Error):
            t = c.cpu_times()
            total += t.user + t.system
    return total


def measure(make: Callable[[], Iterator[Any]], exclude: set[int], workers: int) -> dict[str, float]:
    """One epoch: time to first batch, steady img/s, CPU-ms per image (see :data:`COLUMNS`).

    The steady window is the same for every library: while every worker is busy. It opens at the
    arrival of batch ``workers - 1`` (the last worker's first batch: all workers are then past their
    start-up) and closes at the arrival of batch ``n - workers`` (the first of the final round: the
    batches after it come from workers whose slots ran out one by one, so fewer and fewer cores
    work; with 1,500 images, 23 batches on 2 workers, one worker makes the last batch alone, ~4 % of
    a short epoch), counting the images that arrived inside it. Shutdown is outside it too (our
    ``with ld:``, a torch DataLoader's own when its iterator is exhausted). Opening it at the first
    batch instead would count the other workers' first batches, finished within milliseconds of
    it, as if made inside the window. The epoch img/s column has everything (start-up, the final
    round); CPU covers the whole epoch, start-up and shutdown included.
    """
    c0, t0 = _cpu(exclude), time.perf_counter()
    it = make()
    arrivals: list[tuple[float, int]] = []  # (arrival time, images) of each batch
    for x, *_ in it:
        arrivals.append((time.perf_counter(), len(x)))
    c1 = _cpu(exclude)
    del it
    total, n, w = sum(k for _, k in arrivals), len(arrivals), max(1, workers)
    first = max(0, min(w, n - 1) - 1)  # the first round: one batch per worker
    last = n - w if n - w > first else n - 1  # the first batch of the final round (too few batches: the last)
    t_start, t_last = arrivals[first][0], arrivals[last][0]
    steady = sum(k for _, k in arrivals[first + 1: last + 1])
    img_s = steady / (t_last - t_start) if last > first else float("nan")  # one batch: no window
    return {"ttfb_s": arrivals[0][0] - t0, "img_s": img_s, "cpu_ms_img": 1e3 * (c1 - c0) / total,
            "epoch_img_s": total / (arrivals[-1][0] - t0), "images": total, "steady_images": steady}


#: What each column of the speed table means (printed above it and recorded in --json).
COLUMNS = {
    "img/s": "steady-state throughput while every worker is busy: the images that arrived after the first batch "
             "of every worker up to the first batch of the final round (one per worker), divided by the time "
             "between those two arrivals (the same window for every library: start-up, the final round, where "
             "workers run out one by one, and shutdown excluded); median over rounds",
    "R": "img/s divided by the decode limit (cores / decode-only seconds per image of our decoder, same run)",
    "epoch img/s": "all images of the epoch divided by the time from creating the loader to the last batch's "
                   "arrival (start-up included): the comparable number for Ray Data, whose tasks run ahead of "
                   "the consumer (much of the epoch is made before its first batch arrives, so its steady "
                   "window overstates it: shown in brackets, no R)",
    "first batch (s)": "from creating the loader to the first batch's arrival (worker start-up included)",
    "CPU-ms/img": "CPU time of this process and its workers over the whole epoch (start-up and shutdown included, "
                  "the S3 server excluded; for Ray Data every process of its instance) divided by all images "
                  "of the epoch",
}


#: Images the decode limit is measured on: spread evenly over the epoch's images.
LIMIT_IMAGES = 1000


def decode_limit(samples: list[bytes], size: int, repeat: int = 3, *, into_row: bool = True) -> tuple[float, float]:
    """(ms per image, img/s on all cores) of our train decode alone, one thread: the best of ``repeat``
    passes (other load on the machine only ever slows a pass down, so the limit errs high, R low).

    ``into_row``: every image is decoded into the same preallocated ``(3, S, S)`` row, as the loader
    decodes into its batch; without it the resize's own output is returned, so an unflipped image's
    pixels are never written anywhere (the method up to session 10, kept for comparison: it also ran
    on the first 300 images only, 12 MB that stay in L3 over the repeats and are ~2 % smaller than the
    epoch's average, so that limit sat ~5 % above the decode cost of the images a loader serves)."""
    from pipeline.decode import decode_train

    torch.set_num_threads(1)
    row = torch.empty(3, size, size, dtype=torch.uint8) if into_row else None
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for i, data in enumerate(samples):
            decode_train(data, size=size, scale=SCALE, ratio=RATIO, rng=random.Random(i), out=row)
        best = min(best, (time.perf_counter() - t0) / len(samples))
    cores = len(os.sched_getaffinity(0))
    return 1e3 * best, cores / best


def limit_sample(samples: list[bytes], n: int = LIMIT_IMAGES) -> list[bytes]:
    """``n`` of the epoch's images, evenly spread (all of them when there are fewer)."""
    step = max(1, len(samples) // n)
    return samples[::step][:n]


# ---------------------------------------------------------------- data
def _read_our_tars(shards: list[Path]) -> list[tuple[int, int, bytes]]:
    """(sample id, label, JPEG bytes) of every sample in our shards, in shard order."""
    out: dict[int, dict[str, Any]] = {}
    for p in shards:
        with tarfile.open(p) as tf:
            for m in tf:
                key, ext = m.name.rsplit(".", 1)
                f = tf.extractfile(m)
                assert f is not None
                out.setdefault(int(key.rsplit("-", 1)[1]), {})[ext] = f.read()
    return [(i, int(d["cls"]), d["jpg"]) for i, d in sorted(out.items())]


def prepare(root: Path, n: int, shard_size: int, *, index: bool) -> dict[str, Any]:
    """Our dataset + the same bytes as MDS and LitData (whichever is installed)."""
    from pipeline import write_dataset
    from pipeline.demo_data import make_index_folder, make_photo_folder
    from pipeline.format import resolve

    if index:
        src = make_index_folder(root / "src", n=n, num_classes=10)
    else:
        src = make_photo_folder(root / "src", n=n, num_classes=10)
    write_dataset(src, str(root / "ours"), samples_per_shard=shard_size, progress=False)
    vds = Path(resolve(str(root / "ours")).root_url)
    tars = sorted((vds / "shards").glob("*.tar"))
    samples = _read_our_tars(tars)
    d: dict[str, Any] = {"ours": str(root / "ours"), "tars": [str(t) for t in tars], "samples": samples}
    if peers.have("mds"):
        d["mds"] = peers.write_mds(root / "mds", samples, shard_size)
    if peers.have("litdata"):
        d["litdata"] = peers.write_litdata(root / "litdata", samples, shard_size)
    return d


# ---------------------------------------------------------------- S3 (moto)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server() -> Iterator[tuple[str, int]]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        ep = f"http://127.0.0.1:{port}"
        os.environ.update({"AWS_ENDPOINT_URL": ep, "S3_ENDPOINT_URL": ep, "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ALLOW_HTTP": "true"})  # LitData's obstore path refuses http:// otherwise
        yield ep, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def upload_tree(local: Path, bucket: str, prefix: str) -> str:
    import boto3

    client = boto3.client("s3")
    with contextlib.suppress(Exception):
        client.create_bucket(Bucket=bucket)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def _presigned(key: str) -> str:
    """A GET URL for webdataset's ``pipe:curl`` (moto checks signatures, as S3 does)."""
    import boto3

    return boto3.client("s3").generate_presigned_url("get_object", Params={"Bucket": "bench", "Key": key},
                                                     ExpiresIn=3600)


# ---------------------------------------------------------------- the runs
def ours_iter(url: str, *, size: int, batch: int, workers: int, epoch: int, seed: int = 0) -> Iterator[Any]:
    from pipeline import AugmentConfig, DataConfig, IOConfig, SourceConfig, build_loader

    cfg = DataConfig(source=SourceConfig(url=url), image_size=size, batch_size=batch, output="uint8", seed=seed,
                     io=IOConfig(num_workers=workers, shuffle_buffer=500), augment=AugmentConfig(crop_scale=SCALE))
    ld = build_loader(cfg, rank=0, world_size=1, epoch=epoch)

    def gen() -> Iterator[Any]:
        with ld:
            yield from ld
    return gen()


@contextlib.contextmanager
def pil_decode_path() -> Iterator[None]:
    """Our loader with every image through PIL (``--baseline``): a full decode (DCT-scaled by PIL's
    ``draft`` when the crop is large), crop, the same torch resize; what Pillow alone gives, against
    our region decoder (pipeline/_jpeg.c). Patched in this process before the loader forks its
    workers; the same pixels either way (tests/test_pipeline.py)."""
    from pipeline import decode

    saved = decode._jpeg_header
    decode._jpeg_header = lambda *a: None  # type: ignore[assignment]
    try:
        yield
    finally:
        decode._jpeg_header = saved  # type: ignore[assignment]


def _maker(lib: str, track: str, where: str, data: dict[str, Any], s3: dict[str, Any],
           kw: dict[str, int]) -> Callable[[], Iterator[Any]]:
    if lib in ("ours", "ours_before"):
        url = data["ours"] if where == "local" else s3["ours"]
        if lib == "ours":
            return lambda: ours_iter(url, **kw)

        def before() -> Iterator[Any]:
            with pil_decode_path():
                yield from ours_iter(url, **kw)
        return before
    src = (data["tars"] if lib in ("webdataset", "raydata") else data[lib]) if where == "local" else s3[lib]
    return lambda: peers.loader_iter(lib, src, track=track, **kw)


def speed(a: argparse.Namespace, data: dict[str, Any], s3: dict[str, str], exclude: set[int]) -> dict[str, Any]:
    libs = ["ours"] + (["ours_before"] if a.baseline else []) + ["webdataset"] + \
        [p for p in ("mds", "litdata") if p in data] + (["raydata"] if peers.have("raydata") and not a.quick else [])
    if a.only:
        libs = [lib for lib in libs if lib in a.only.split(",") or lib == "ours_before"]
    configs = [(lib, track, where) for where in (["local"] + (["s3"] if s3 else []))
               for track in ("A", "B") for lib in libs if not (lib.startswith("ours") and track == "B")]
    runs: dict[str, list[dict[str, float]]] = {}
    errors: dict[str, str] = {}
    torch.set_num_threads(1)
    print("columns: " + "; ".join(f"{k}: {v}" for k, v in COLUMNS.items()), flush=True)
    # The other libraries alternate in rounds; Ray Data's rounds come after them, all in one Ray instance
    # started before its first run (not measured: a Ray Data user has a cluster up already; its first run
    # still pays its workers' imports, as every library's first batch does) and stopped after its last, so
    # that Ray's processes never take CPU from the other libraries' runs.
    plain = [c for c in configs if c[0] != "raydata"]
    on_ray = [c for c in configs if c[0] == "raydata"]

    def one(r: int, lib: str, track: str, where: str) -> None:
        kw = {"size": a.size, "batch": a.batch, "workers": a.workers, "epoch": r}
        make = _maker(lib, track, where, data, s3, kw)
        try:
            m = measure(make, exclude, a.workers)
        except Exception as exc:  # noqa: BLE001 - a peer failing on a track is a result to write down
            msg = str(exc).splitlines()[0][:200] if str(exc) else ""
            errors[f"{lib}|{track}|{where}"] = f"{type(exc).__name__}: {msg}"
            print(f"  round {r} {lib:10s} track {track} {where:5s}: FAILED {errors[f'{lib}|{track}|{where}']}")
            return
        runs.setdefault(f"{lib}|{track}|{where}", []).append(m)
        print(f"  round {r} {lib:10s} track {track} {where:5s}: {m['img_s']:7.0f} img/s  first batch "
              f"{m['ttfb_s']:5.2f} s  {m['cpu_ms_img']:5.2f} CPU-ms/img", flush=True)

    for r in range(a.rounds):
        for c in plain:
            one(r, *c)
    if on_ray:
        with peers.ray_instance():
            for r in range(a.rounds):
                for c in on_ray:
                    one(r, *c)
    out: dict[str, Any] = {k: {f: statistics.median(x[f] for x in v) for f in v[0]} for k, v in runs.items()}
    return out | {k: {"error": e} for k, e in errors.items() if k not in out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--baseline", action="store_true",
                    help="also run our loader with every image decoded whole by PIL (no region decode; the same "
                         "pixels), alternating with the others, and that path's decode-only cost")
    ap.add_argument("--only", default="", help="comma-separated libraries to measure (default: all installed)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 128 images, 64 px, 1 round, no S3")
    ap.add_argument("--table", type=Path, default=ROOT / "bench" / "out" / "loader_peers.md")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--probe", help=argparse.SUPPRESS)  # internal: one resume probe (a rank), JSON in/out
    a = ap.parse_args()
    if a.probe:
        print("PROBE " + json.dumps(peers.probe(json.loads(a.probe))), flush=True)
        return
    if a.quick:
        a.images, a.shard_size, a.size, a.batch, a.rounds, a.skip_s3 = 128, 32, 64, 16, 1, True
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        data = prepare(Path(tmp) / "photos", a.images, a.shard_size, index=False)
        mb = sum(len(b) for *_, b in data["samples"]) / 1e6
        images = [b for *_, b in data["samples"]]
        ms, limit = decode_limit(limit_sample(images), a.size)
        ms_hot300, _ = decode_limit(images[:300], a.size, 5, into_row=False)  # the method up to session 10
        ms_before = None
        if a.baseline:
            with pil_decode_path():
                ms_before, _ = decode_limit(limit_sample(images), a.size)
        print(f"data: {a.images} photo JPEGs ({mb:.1f} MB), libraries {peers.available()}; decode-only "
              f"{ms:.3f} ms/img -> limit {limit:.0f} img/s on {len(os.sched_getaffinity(0))} cores (previous method: "
              f"{ms_hot300:.3f} ms/img)", flush=True)
        with contextlib.ExitStack() as stack:
            s3: dict[str, str] = {}
            exclude: set[int] = set()
            if not a.skip_s3:
                ep, pid = stack.enter_context(moto_server())
                exclude.add(pid)
                s3["ours"] = upload_tree(Path(data["ours"]), "bench", "ours")
                keys = ["ours/" + Path(t).relative_to(data["ours"]).as_posix() for t in data["tars"]]
                s3["webdataset"] = [f"pipe:curl -s -f '{_presigned(k)}'" for k in keys]
                s3["raydata"] = [f"s3://bench/{k}" for k in keys]  # pyarrow's S3 filesystem on the endpoint
                for lib in ("mds", "litdata"):
                    if lib in data:
                        s3[lib] = upload_tree(Path(data[lib]), "bench", lib)
            res = speed(a, data, s3, exclude)
        resume = resume_checks(Path(tmp) / "ids", a.workers, 256 if a.quick else RESUME_N,
                               only=a.only.split(",") if a.only else None)
    out = {"machine": machine(), "args": vars(a) | {"table": str(a.table), "json": str(a.json)},
           "decode_ms_img": ms, "decode_ms_img_hot300": ms_hot300, "decode_ms_img_before": ms_before,
           "decode_limit_img_s": limit, "speed": res,
           "resume": resume, "columns": COLUMNS,
           "libraries": peers.available(), "wall_s": time.perf_counter() - t_start}
    table = render(out)
    print(table)
    a.table.parent.mkdir(parents=True, exist_ok=True)
    a.table.write_text(table)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, default=str))
    best_peer = max((v["img_s"] for k, v in res.items()
                     if k.endswith("|A|local") and not k.startswith("ours") and "img_s" in v
                     and k.split("|")[0] not in AHEAD), default=float("nan"))
    ours = res["ours|A|local"]["img_s"]
    vs_peer = f"{ours / best_peer:.2f}x the fastest peer in track A" if best_peer == best_peer else "no peer measured"
    cores = len(os.sched_getaffinity(0))
    print(f"loader_peers: ours {ours:.0f} img/s = R {ours / limit:.2f} of the decode limit (goal >= 0.9; "
          f"{ours / (cores * 1e3 / ms_hot300):.2f} by the previous method); "
          f"{vs_peer} (goal >= 1.3); wrote {a.table}")


# ---------------------------------------------------------------- resume
def resume_checks(root: Path, workers: int, n: int = RESUME_N,
                  only: list[str] | None = None) -> dict[str, dict[str, str]]:
    """Per library: same-layout resume (exact order) and a 1 -> 2 rank resume (no repeat, no loss)."""
    data = prepare(root, n, 64, index=True)
    out: dict[str, dict[str, str]] = {}
    for lib in ["ours", "webdataset"] + [p for p in ("mds", "litdata") if p in data] + \
            (["raydata"] if peers.have("raydata") else []):
        if only and lib not in only:
            continue
        src = data["tars"] if lib in ("webdataset", "raydata") else data[lib]
        base = {"lib": lib, "src": src, "batch": RESUME_BATCH, "workers": workers, "cache": str(root / "cache")}
        try:
            out[lib] = _resume_one(base)
        except Exception as exc:  # noqa: BLE001 - a peer failing is a result to write down
            out[lib] = {"same": f"error: {type(exc).__name__}: {str(exc)[:160]}", "elastic": "not checked"}
        print(f"  resume {lib}: {out[lib]}", flush=True)
    return out


def _run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    return _run_probes([spec])[0]


def _run_probes(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Peer probes, each in a fresh process, all at once (the ranks of one job: MDS joins them in a
    gloo process group); ours takes its rank as an argument and runs here."""
    if specs[0]["lib"] in ("ours", "webdataset", "raydata"):
        return [peers.probe(json.loads(json.dumps(s))) for s in specs]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, __file__, "--probe", json.dumps(s)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for s in specs]
    out = []
    for spec, p in zip(specs, procs, strict=True):
        stdout, stderr = p.communicate(timeout=600)
        got = [json.loads(line[6:]) for line in stdout.splitlines() if line.startswith("PROBE ")]
        if not got:
            raise RuntimeError(f"probe {spec['lib']} rank {spec.get('rank')} failed: {(stderr or stdout)[-300:]}")
        out.append(got[0])
    return out


def _resume_one(base: dict[str, Any]) -> dict[str, str]:
    full = _run_probe(base | {"world": 1, "rank": 0})
    if full.get("unsupported"):
        return {"same": full["unsupported"], "elastic": full["unsupported"]}
    ids = [i for b in full["batches"] for i in b]
    if len(set(ids)) != len(ids):
        return {"same": "uninterrupted epoch repeats samples", "elastic": "not checked"}
    head = _run_probe(base | {"world": 1, "rank": 0, "stop": RESUME_AT})
    consumed = [i for b in head["batches"] for i in b]
    tail = _run_probe(base | {"world": 1, "rank": 0, "state": head["state"]})
    rest = [i for b in tail["batches"] for i in b]
    want = ids[len(consumed):]
    if consumed != ids[: len(consumed)]:
        same = "not reproducible: the interrupted run's first batches differ from the uninterrupted run's"
    elif rest == want:
        same = f"exact ({len(rest)} remaining ids, same order)"
    else:
        lost, extra = len(set(want) - set(rest)), len(rest) - len(set(rest) & set(want))
        same = (f"NOT exact: {len(rest)} served vs {len(want)} expected; {lost} lost, {extra} repeated/extra; "
                f"same set: {set(rest) == set(want)}")
    try:
        parts = _run_probes([base | {"world": 2, "rank": r, "state": head["state"]} for r in (0, 1)])
    except RuntimeError as exc:
        return {"same": same, "elastic": f"error: {str(exc)[-200:]}"}
    if any(p.get("unsupported") for p in parts):
        return {"same": same, "elastic": next(p["unsupported"] for p in parts if p.get("unsupported"))}
    served = [i for p in parts for b in p["batches"] for i in b]
    left = set(ids) - set(consumed)
    rep = len(served) - len(set(served)) + len(set(served) & set(consumed))
    lost = len(left - set(served))
    elastic = (f"no repeats, {lost} of {len(left)} left unserved (the new layout's dropped remainder)"
               if rep == 0 and lost < 2 * 2 * RESUME_BATCH else f"{rep} repeated, {lost} of {len(left)} lost")
    return {"same": same, "elastic": elastic}


# ---------------------------------------------------------------- report
def machine() -> str:
    cpu = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return (f"{len(os.sched_getaffinity(0))} cores ({cpu}), Python {platform.python_version()}, torch "
            f"{torch.__version__}, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at the end")


#: Libraries whose steady window overstates them: their tasks make much of the epoch before the first batch arrives.
AHEAD = {"raydata"}
NAMES = {"ours": "ours (vitscale)", "ours_before": "ours, PIL decode (whole image, no region decode)", "webdataset": "webdataset", "raydata": "Ray Data", "mds": "MosaicML streaming (MDS)",
         "litdata": "LitData"}


def render(out: dict[str, Any]) -> str:
    lim, res = out["decode_limit_img_s"], out["speed"]
    a = out["args"]
    lines = [f"Machine: {out['machine']}. Data: {a['images']} photo JPEGs (~500x375), {a['shard_size']} per shard; "
             f"{a['size']} px, batch {a['batch']}, {a['workers']} workers, {a['rounds']} alternating rounds (median). "
             f"Decode limit: {out['decode_ms_img']:.3f} ms/img decode-only ({LIMIT_IMAGES} of the images, each into a "
             f"batch row, best of 3) -> **{lim:.0f} img/s**"
             + (f"; by the method up to session 10 (first 300 images, no output row, best of 5) "
                f"{out['decode_ms_img_hot300']:.3f} ms/img" if out.get("decode_ms_img_hot300") else "")
             + (f" (PIL's whole-image decode: {out['decode_ms_img_before']:.2f} ms/img). "
                if out.get("decode_ms_img_before") else ". ") +
             f"Libraries: {out['libraries']}.", "",
             "Columns: " + "; ".join(f"**{k}**: {v}" for k, v in COLUMNS.items()) + ".", "",
             "| library | track | storage | img/s | R (of limit) | epoch img/s | first batch (s) | CPU-ms/img |",
             "|---|---|---|---|---|---|---|---|"]
    for key, m in res.items():
        lib, track, where = key.split("|")
        if "error" in m:
            lines.append(f"| {NAMES[lib]} | {track} | {where} | failed: {m['error']} | | | | |")
            continue
        steady = (f"({m['img_s']:.0f})", "-") if lib in AHEAD else (f"{m['img_s']:.0f}", f"{m['img_s'] / lim:.2f}")
        epoch = f"{m['epoch_img_s']:.0f}" if "epoch_img_s" in m else "-"
        lines.append(f"| {NAMES[lib]} | {track} | {where} | {steady[0]} | {steady[1]} | {epoch} | "
                     f"{m['ttfb_s']:.2f} | {m['cpu_ms_img']:.2f} |")
    lines += ["", "| library | resume, same layout (own state_dict) | resume on 2 ranks from a 1-rank state |",
              "|---|---|---|"]
    for lib, r in out["resume"].items():
        lines.append(f"| {NAMES[lib]} | {r['same']} | {r['elastic']} |")
    missing = [NAMES[p] for p in ("mds", "litdata") if p not in out["libraries"]]
    if missing:
        lines += ["", f"Not installed here (`make peers-venv`, then run with `.venv-peers/bin/python`): "
                  f"{', '.join(missing)}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
