"""The peer libraries for ``bench/loader_peers.py``: writing each format, each loader, resume probes.

Stock webdataset and Ray Data are in the project's environment; MosaicML streaming and LitData are
in ``.venv-peers`` (``make peers-venv``: their pins conflict with ours, see the Makefile). Every
function here imports its library lazily, so a missing one is reported, not an ImportError.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
MODULES = {"webdataset": "webdataset", "mds": "streaming", "litdata": "litdata", "raydata": "ray"}


def have(lib: str) -> bool:
    return importlib.util.find_spec(MODULES[lib]) is not None


def available() -> list[str]:
    return ["ours"] + [lib for lib in MODULES if have(lib)]


# ---------------------------------------------------------------- writing
def write_mds(out: Path, samples: list[tuple[int, int, bytes]], shard_size: int) -> str:
    """MDS with the JPEG bytes unchanged (a ``bytes`` column), about ``shard_size`` samples a shard."""
    from streaming import MDSWriter

    per = sum(len(b) for *_, b in samples) / len(samples)
    with MDSWriter(out=str(out), columns={"id": "int", "cls": "int", "jpg": "bytes"},
                   size_limit=int(per * shard_size) + 1024, progress_bar=False) as w:
        for i, c, b in samples:
            w.write({"id": i, "cls": c, "jpg": b})
    return str(out)


def write_litdata(out: Path, samples: list[tuple[int, int, bytes]], shard_size: int) -> str:
    """LitData optimized chunks (``BinaryWriter``, what ``litdata.optimize`` writes with), bytes unchanged."""
    from litdata.streaming.writer import BinaryWriter

    out.mkdir(parents=True, exist_ok=True)
    w = BinaryWriter(str(out), chunk_size=shard_size)
    for k, (i, c, b) in enumerate(samples):
        w[k] = {"id": i, "cls": c, "jpg": b}
    w.done()
    w.merge()
    return str(out)


# ---------------------------------------------------------------- transforms
class Decode:
    """bytes -> (3, S, S) uint8: track A by ``native`` ("pil" / "tv"), track B by our decoder."""

    def __init__(self, track: str, native: str, size: int, seed: int) -> None:
        self.track, self.native, self.size, self.seed = track, native, size, seed
        self._tf: Any = None

    def __call__(self, data: bytes, key: int) -> torch.Tensor:
        if self.track == "B":
            from pipeline.decode import decode_train

            arr = decode_train(data, size=self.size, scale=SCALE, ratio=RATIO,
                               rng=random.Random(self.seed * 1_000_003 + key))
            return torch.from_numpy(arr).permute(2, 0, 1)  # (3, S, S) uint8, no copy
        if self._tf is None:
            from torchvision.transforms import v2

            self._tf = v2.Compose([v2.RandomResizedCrop(self.size, scale=SCALE, ratio=RATIO, antialias=True),
                                   v2.RandomHorizontalFlip()])
        if self.native == "pil":
            from PIL import Image
            from torchvision.transforms.v2 import functional as TF

            img = Image.open(io.BytesIO(data)).convert("RGB")
            return TF.pil_to_tensor(self._tf(img))  # crop + flip on the PIL image, then uint8 CHW
        from torchvision.io import ImageReadMode, decode_jpeg

        t = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return self._tf(t)  # (3, S, S) uint8


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


# ---------------------------------------------------------------- loaders
def loader_iter(lib: str, src: Any, *, track: str, size: int, batch: int, workers: int, epoch: int) -> Iterator[Any]:
    """An epoch of ``(images (B, 3, S, S) uint8, labels)`` from ``lib`` reading ``src``."""
    if lib == "webdataset":
        return _wds(src, track=track, size=size, batch=batch, workers=workers, epoch=epoch)
    if lib == "mds":
        return _mds_loader(src, track=track, size=size, batch=batch, workers=workers, seed=epoch)[1].__iter__()
    if lib == "litdata":
        return _lit_loader(src, track=track, size=size, batch=batch, workers=workers, seed=epoch)[1].__iter__()
    if lib == "raydata":
        return _ray_data(src, track=track, size=size, batch=batch, workers=workers, epoch=epoch)
    raise ValueError(f"unknown library {lib!r}")


def _wds(urls: list[str], *, track: str, size: int, batch: int, workers: int, epoch: int) -> Iterator[Any]:
    import webdataset as wds

    dec = Decode(track, "pil", size, epoch)
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=epoch, empty_check=False).shuffle(500)
          .to_tuple("jpg", "cls", "__key__")
          .map(lambda s: (dec(s[0], int(s[2].rsplit("-", 1)[1])), int(s[1]))))
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, worker_init_fn=_one_thread)
    return iter(dl)


@contextlib.contextmanager
def ray_instance() -> Iterator[None]:
    """A private local Ray instance (all cores, its state in a temp folder: orchestration.launch.cluster)
    for the Ray Data runs only, shut down after them: its processes (GCS, raylet, dashboard) would
    otherwise take CPU from the other libraries' runs."""
    import ray

    from orchestration.launch import cluster

    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob(cluster._PREFIX + "*"))
    saved = os.environ.pop("RAY_ADDRESS", None)  # never a cluster somebody else started
    try:
        cluster.connect_ray(None)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray.data.DataContext.get_current().print_on_execution_start = False
        ray.data.range(8, override_num_blocks=4).map_batches(lambda b: b).take_all()  # worker processes up
        yield
    finally:
        ray.shutdown()
        for folder in set(tmp.glob(cluster._PREFIX + "*")) - before:
            cluster.end_private(folder)
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


def _s3_filesystem() -> Any:
    """pyarrow's S3 filesystem on the endpoint the bench set (``AWS_ENDPOINT_URL``: the moto server)."""
    from urllib.parse import urlparse

    import pyarrow.fs

    ep = urlparse(os.environ["AWS_ENDPOINT_URL"])
    return pyarrow.fs.S3FileSystem(endpoint_override=ep.netloc, scheme=ep.scheme, region="us-east-1",
                                   access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
                                   secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"))


def _ray_data(paths: list[str], *, track: str, size: int, batch: int, workers: int, epoch: int) -> Iterator[Any]:
    """Ray Data on the same tars: ``read_webdataset`` (track A: its default decoder, PIL -> numpy, then
    torchvision v2 crop + flip; track B: raw bytes, our decoder) in Ray tasks on all cores, files
    shuffled per epoch, a 500-sample local shuffle buffer, ``iter_torch_batches``. ``workers`` is not
    a Ray Data knob: it schedules as many tasks as the instance has CPUs."""
    import ray
    from ray.data import FileShuffleConfig

    dec = Decode("B", "pil", size, epoch)
    tf: list[Any] = []

    def transform(b: dict[str, Any]) -> dict[str, Any]:
        if track == "B":
            imgs = [dec(bytes(x), int(str(k).rsplit("-", 1)[1])) for x, k in zip(b["jpg"], b["__key__"], strict=True)]
            labels = [int(bytes(c)) for c in b["cls"]]
        else:
            if not tf:
                from torchvision.transforms import v2

                tf.append(v2.Compose([v2.RandomResizedCrop(size, scale=SCALE, ratio=RATIO, antialias=True),
                                      v2.RandomHorizontalFlip()]))
            imgs = [tf[0](torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)) for x in b["jpg"]]  # read only
            labels = [int(c) for c in b["cls"]]
        return {"image": torch.stack(imgs).numpy(), "label": np.asarray(labels)}

    kw: dict[str, Any] = {"filesystem": _s3_filesystem()} if paths[0].startswith("s3://") else {}
    if kw:
        paths = [p.removeprefix("s3://") for p in paths]
    ds = ray.data.read_webdataset(paths, decoder=True if track == "A" else None, suffixes=["jpg", "cls"],
                                  shuffle=FileShuffleConfig(seed=epoch), **kw)
    ds = ds.map_batches(transform, batch_size=batch, batch_format="numpy")
    for b in ds.iter_torch_batches(batch_size=batch, local_shuffle_buffer_size=500, local_shuffle_seed=epoch,
                                   drop_last=True):
        yield b["image"], b["label"]


def _mds_loader(src: str, *, track: str, size: int, batch: int, workers: int, seed: int,
                ids_only: bool = False) -> tuple[Any, Any]:
    from streaming import StreamingDataLoader, StreamingDataset

    dec = Decode(track, "pil", size, seed)

    class DS(StreamingDataset):
        def __getitem__(self, idx: int) -> Any:
            s = super().__getitem__(idx)
            if ids_only:
                return s["id"]
            return dec(s["jpg"], s["id"]), s["cls"]

    if src.startswith("s3://"):  # a fresh cache per loader: every round downloads, as a new node would
        kw = {"remote": src, "local": tempfile.mkdtemp(prefix="mds_cache_")}
    else:
        kw = {"local": src}
    ds = DS(shuffle=True, shuffle_seed=1000 + seed, batch_size=batch, **kw)
    return ds, StreamingDataLoader(ds, batch_size=batch, num_workers=workers, worker_init_fn=_one_thread,
                                   persistent_workers=False)


def _lit_loader(src: str, *, track: str, size: int, batch: int, workers: int, seed: int,
                ids_only: bool = False) -> tuple[Any, Any]:
    from litdata import StreamingDataLoader, StreamingDataset

    dec = Decode(track, "tv", size, seed)

    class DS(StreamingDataset):
        def __getitem__(self, index: Any) -> Any:
            s = super().__getitem__(index)
            if ids_only:
                return s["id"]
            return dec(s["jpg"], s["id"]), s["cls"]

    kw: dict[str, Any] = {}
    if src.startswith("s3://"):
        kw = {"cache_dir": tempfile.mkdtemp(prefix="lit_cache_"),
              "storage_options": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    # drop_last explicit: its default differs between 1 and 2 ranks, and a state saved under one
    # value is refused under the other
    ds = DS(input_dir=src, shuffle=True, seed=1000 + seed, drop_last=True, **kw)
    return ds, StreamingDataLoader(ds, batch_size=batch, num_workers=workers, worker_init_fn=_one_thread)


# ---------------------------------------------------------------- resume probes (one process each)
def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank of one library: optionally load ``state``, serve batches of sample ids, stop after
    ``stop`` batches (then return the library's own state_dict) or at the epoch's end."""
    lib, world, rank = spec["lib"], int(spec["world"]), int(spec["rank"])
    stop, state = spec.get("stop"), spec.get("state")
    batches: list[list[int]] = []
    if lib == "webdataset":
        return {"unsupported": "no resume API (no state_dict): a restart begins the epoch again"}
    if lib == "raydata":
        return {"unsupported": "no resume API (Ray Data's iterators have no state_dict; Ray Train resumes "
                               "at epoch boundaries): a restart begins the epoch again"}
    if lib == "ours":
        from pipeline import DataConfig, IOConfig, SourceConfig, build_loader
        from pipeline.demo_data import decode_index

        cfg = DataConfig(source=SourceConfig(url=spec["src"]), image_size=16, batch_size=spec["batch"],
                         io=IOConfig(num_workers=spec["workers"], shuffle_buffer=64))
        with build_loader(cfg, rank=rank, world_size=world) as ld:
            if state is not None:
                ld.load_state_dict(state)
            for b in ld:
                batches.append(decode_index(b[0].numpy()).tolist())
                if stop and len(batches) == stop:
                    return {"batches": batches, "state": ld.state_dict()}
        return {"batches": batches}
    if lib == "mds":  # the ranks of one node (run at once by the caller: MDS joins them with gloo)
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                           "LOCAL_WORLD_SIZE": str(world)})
        _, dl = _mds_loader(spec["src"], track="B", size=16, batch=spec["batch"], workers=spec["workers"], seed=7,
                            ids_only=True)
    else:
        os.environ.update({"WORLD_SIZE": str(world), "GLOBAL_RANK": str(rank), "NNODES": "1"})
        _, dl = _lit_loader(spec["src"], track="B", size=16, batch=spec["batch"], workers=spec["workers"], seed=7,
                            ids_only=True)
    if state is not None:
        dl.load_state_dict(state)
    for b in dl:
        batches.append(np.asarray(b).reshape(-1).tolist())
        if stop and len(batches) == stop:
            return {"batches": batches, "state": _jsonable(dl.state_dict())}
    return {"batches": batches}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer | np.floating):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x
