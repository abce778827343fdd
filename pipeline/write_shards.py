"""Write an image collection as WebDataset tar shards plus a per-sample index.

``python -m pipeline.write_shards SRC DEST [options]``

SRC is either an ImageNet-21k-style folder (``SRC/<synset>/<image>``; one label per image,
classes = sorted sub-folder names) or a JFT-style manifest (``.parquet`` or ``.csv``) with an
image path/URL column and a labels column holding one or several labels per image
(multi-label). DEST is a local folder, ``file://`` or ``s3://bucket/prefix``.

Layout written at DEST (defined in :mod:`pipeline.format`)::

    versions/<version>/shards/{split}-NNNNNN.tar   plain tar, members {key}.jpg + {key}.cls (int)
                                or {key}.json (list of ints, multi-label); stock webdataset reads it
    versions/<version>/markers/{shard}.json   per-shard completion marker (sha256, plan, rows)
    versions/<version>/samples.parquet   one row per sample: split, shard, key, offset, size (byte
                                range of the JPEG member inside the tar), label(s), src, sha256
    versions/<version>/{index.parquet, classes.json, rejects.parquet, dataset.json}
    dataset.json                the published manifest, a copy of one version's dataset.json --
                                written LAST with one atomic conditional PUT, so a reader never
                                sees a half-written or mixed dataset

``<version>`` is a hash of the plan (sources, labels, seed, options). A version is never
changed once published; writing other data to a DEST that already publishes a version needs
``--overwrite`` and publishes a new version (readers pinned to the old one keep reading it).
Of two writers racing on one DEST, the one that publishes second fails with a clear message.

Samples are shuffled across classes with ``--seed`` before being cut into shards. Original
JPEG bytes are kept unless ``--max-side`` asks for a resize; other formats are re-encoded.
Re-running with the same arguments resumes the same version: a shard whose marker matches the plan and whose
stored bytes hash to the recorded sha256 is not re-encoded. Images that cannot be read or
decoded, and every entry of SRC the walk cannot use (an unreadable folder, a broken link, a
FIFO), are skipped and listed in ``rejects.parquet`` with the reason. File names need not be
UTF-8. The CLI exits 2 with one line for a missing SRC or bucket and 1 when nothing could be
written (no images, or all rejected); images above ``pipeline.decode.DEFAULT_MAX_PIXELS`` (the
loader's limit too) are rejected as ``too_many_pixels``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import stat
import sys
import tarfile
import tempfile
import time
import urllib.request
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import format as fmt
from .decode import DEFAULT_MAX_PIXELS
from .format import FORMAT_VERSION
from .storage import Storage, StorageError, open_storage, url_join

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
#: Images above this many pixels are rejected: the loader's limit (one constant, pipeline.decode),
#: so an image the writer stores is never one the loader skips as too big.
WRITER_MAX_PIXELS = DEFAULT_MAX_PIXELS


class WriterError(Exception):
    """A problem with SRC or DEST that stops the writer; ``code`` is the CLI exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def printable(path: str) -> str:
    """``path`` as valid UTF-8 text: bytes that are not UTF-8 become ``\\xNN`` escapes.

    File names are bytes on POSIX; Python hands undecodable ones over as lone surrogates,
    which parquet, JSON-as-UTF-8 and hashing reject. The item keeps the real name (to open
    the file); everything written uses this form.
    """
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class Item:
    """One source image: where it lives, its labels (class ids) and its planned split."""

    src: str
    labels: list[int] | None
    split: str = "train"


@dataclass
class Source:
    """A scanned SRC: items, the class vocabulary and whether labels are multi-label."""

    items: list[Item]
    classes: list[str]
    multi_label: bool
    rejects: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading SRC
def _reject(path: str, reason: str, exc: BaseException | str) -> dict[str, Any]:
    detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"
    return {"src": printable(path), "reason": reason, "detail": printable(detail)}


def _stat_problem(path: str) -> tuple[str, str] | None:
    """Why ``path`` can't be read as an image file or a folder (None: it can)."""
    try:
        st = os.stat(path)  # follows symlinks: a broken link or a loop fails here
    except OSError as exc:
        return "unreadable", f"{type(exc).__name__}: {exc.strerror}"
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return "not_a_regular_file", f"mode {stat.filemode(st.st_mode)}"  # a FIFO would block the reader
    return None


def _walk_class(folder: str, rejects: list[dict[str, Any]], seen: set[tuple[int, int]]) -> list[str]:
    """Image files under ``folder`` (recursive, sorted); everything unreadable becomes a reject."""
    try:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # a symlink cycle, or a second link to a walked folder
            rejects.append(_reject(folder, "duplicate_folder", "already walked (symlink cycle or second link)"))
            return []
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:  # e.g. permission denied: the whole folder is listed as a reject
        rejects.append(_reject(folder, "unreadable_folder", exc))
        return []
    files: list[str] = []
    for e in entries:
        if e.name.startswith("."):
            continue
        problem = _stat_problem(e.path)
        if problem is not None:
            rejects.append(_reject(e.path, *problem))
        elif os.path.isdir(e.path):
            files += _walk_class(e.path, rejects, seen)
        elif os.path.splitext(e.name)[1].lower() not in IMAGE_EXTS:
            rejects.append(_reject(e.path, "not_an_image", os.path.splitext(e.name)[1]))
        else:
            files.append(e.path)
    return files


def scan_folder(root: Path) -> Source:
    """An I21k-style folder: ``root/<class>/<file>``; classes are the sorted sub-folders.

    Every entry the walk cannot use is a reject with its reason, never silently dropped: an
    unreadable class folder (``unreadable_folder``), a broken symlink (``unreadable``), a FIFO
    or device (``not_a_regular_file``), a file outside any class folder. Names need not be
    UTF-8 (see :func:`printable`).
    """
    try:
        with os.scandir(root) as it:
            top = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise WriterError(f"cannot list SRC {printable(str(root))}: {exc.strerror}") from exc
    rejects: list[dict[str, Any]] = []
    class_dirs: list[os.DirEntry[str]] = []
    for e in top:
        problem = _stat_problem(e.path)
        if problem is not None:
            rejects.append(_reject(e.path, problem[0] + ("_folder" if problem[0] == "unreadable" else ""),
                                   problem[1]))
        elif os.path.isdir(e.path):
            class_dirs.append(e)
        else:
            rejects.append(_reject(e.path, "outside_class_folder", "files must be in SRC/<class>/"))
    if not class_dirs:
        raise WriterError(f"SRC {printable(str(root))} has no class sub-folders (expected "
                          f"SRC/<synset>/<image>.JPEG){_reject_note(rejects)}")
    items: list[Item] = []
    seen: set[tuple[int, int]] = set()
    for ci, d in enumerate(class_dirs):
        items += [Item(f, [ci]) for f in _walk_class(d.path, rejects, seen)]
    return Source(items, [printable(d.name) for d in class_dirs], multi_label=False, rejects=rejects)


def _reject_note(rejects: list[dict[str, Any]]) -> str:
    if not rejects:
        return ""
    reasons = Counter(r["reason"] for r in rejects)
    first = rejects[0]
    return (f"; {len(rejects)} rejected ({', '.join(f'{k}={v}' for k, v in sorted(reasons.items()))}), "
            f"e.g. {first['src']}: {first['reason']} {first['detail']}")


def _parse_label_cell(v: Any) -> list[Any] | None:
    if v is None:
        return None
    if isinstance(v, float) and np.isnan(v):
        return None
    if isinstance(v, list | tuple | np.ndarray):
        return [x for x in v if x is not None and str(x) != ""]
    s = str(v).strip()
    if not s:
        return None
    if s.startswith("["):
        return list(json.loads(s))
    for sep in ("|", ";", ","):
        if sep in s:
            return [x.strip() for x in s.split(sep) if x.strip()]
    return [s]


def scan_manifest(path: Path, *, path_column: str | None = None, labels_column: str | None = None,
                  multi_label: bool | None = None) -> Source:
    """A JFT-style manifest (parquet or csv): an image path/URL column and a labels column.

    Labels may be lists or scalars, strings (class names; vocabulary = sorted names) or ints
    (class ids; ``num_classes = max + 1``). Relative paths are relative to the manifest.
    An optional ``split`` column assigns splits explicitly.
    """
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pq.read_table(path) if path.suffix == ".parquet" else pcsv.read_csv(path)
    cols = table.column_names
    pc = path_column or next((c for c in ("path", "image", "image_path", "url", "file", "filename") if c in cols), None)
    lc = labels_column or next((c for c in ("labels", "label", "classes", "class") if c in cols), None)
    if pc is None or lc is None:
        raise ValueError(f"{path}: need an image path column and a labels column; found {cols} "
                         "(use --path-column / --labels-column)")
    paths = table.column(pc).to_pylist()
    raw = [_parse_label_cell(v) for v in table.column(lc).to_pylist()]
    splits = table.column("split").to_pylist() if "split" in cols else None
    flat = [x for r in raw if r for x in r]
    if flat and all(isinstance(x, int | np.integer) or (isinstance(x, str) and x.isdigit()) for x in flat) \
            and not any(isinstance(x, str) for x in flat):
        classes = [str(i) for i in range(max(int(x) for x in flat) + 1)]
        to_id = {str(i): i for i in range(len(classes))}
    else:
        classes = sorted({str(x) for x in flat})
        to_id = {c: i for i, c in enumerate(classes)}
    ml = multi_label if multi_label is not None else any(r is not None and len(r) != 1 for r in raw)
    items, rejects = [], []
    for i, (p, r) in enumerate(zip(paths, raw, strict=True)):
        src = str(p)
        if "://" not in src and not os.path.isabs(src):
            src = str(path.parent / src)
        if not r:
            rejects.append({"src": src, "reason": "missing_label", "detail": ""})
            continue
        ids = sorted({to_id[str(x)] for x in r})
        if not ml and len(ids) != 1:
            rejects.append({"src": src, "reason": "multiple_labels", "detail": str(r)})
            continue
        items.append(Item(src, ids, split=str(splits[i]) if splits else "train"))
    return Source(items, classes, multi_label=ml, rejects=rejects)


def read_source_bytes(src: str) -> bytes:
    """Bytes of one source image: a local path, ``s3://`` or ``http(s)://`` URL."""
    if src.startswith("s3://"):
        bucket_end = src.index("/", 5)
        return open_storage(src[:bucket_end]).read_bytes(src[bucket_end + 1:])
    if src.startswith(("http://", "https://")):
        with urllib.request.urlopen(src, timeout=60) as r:  # noqa: S310 - user-provided manifest URL
            return r.read()
    path = src.removeprefix("file://")
    # O_NONBLOCK: opening a FIFO without a writer would block before we could check its type.
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # reading a FIFO or a device would block
            raise OSError(f"not a regular file: {printable(path)}")
        return f.read()


# ----------------------------------------------------------------------------- encoding
class Reject(Exception):
    """A source image that will not be written; ``reason`` is the rejects.parquet category."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def prepare_image(data: bytes, *, max_side: int | None, quality: int) -> bytes:
    """Validate ``data`` and return JPEG bytes (original bytes when already a JPEG that fits)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked just below
            im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > WRITER_MAX_PIXELS:
            raise Reject("too_many_pixels", f"{w}x{h}")
        resize = max_side is not None and max(w, h) > max_side
        if im.format == "JPEG" and not resize:
            # A 1/8-scale DCT decode is enough to catch truncated or corrupt entropy data.
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            im.load()
            return data
        if resize:
            s = max_side / max(w, h)  # type: ignore[operator]
            tw, th = max(1, round(w * s)), max(1, round(h * s))
            if im.format == "JPEG":
                im.draft("RGB", (tw, th))
            im = im.convert("RGB").resize((tw, th), Image.BICUBIC, reducing_gap=3.0)
        else:
            im = im.convert("RGB")
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()
    except Reject:
        raise
    except Image.DecompressionBombError as exc:
        raise Reject("too_many_pixels", str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a reject, not a crash
        raise Reject("undecodable", f"{type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------------------- shards
@dataclass
class ShardJob:
    """One shard to write: its name and the (key, item) pairs in order."""

    split: str
    index: int
    members: list[tuple[str, Item]]

    @property
    def name(self) -> str:
        return f"{fmt.SHARDS_DIR}/{self.split}-{self.index:06d}.tar"

    def plan_hash(self, options: dict[str, Any]) -> str:
        h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
        for key, it in self.members:
            h.update(f"{key}\t{it.src}\t{it.labels}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


def _sha256_of(storage: Storage, key: str) -> str:
    h = hashlib.sha256()
    with storage.open_range(key) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_shard(job: ShardJob, dest: str, options: dict[str, Any]) -> dict[str, Any]:
    """Encode, tar, upload one shard and its marker to ``dest`` (a version's folder); or reuse
    it when already complete.

    Returns ``{"shard": index row, "samples": [rows], "rejects": [rows], "resumed": bool}``.
    """
    storage = open_storage(dest)
    marker_key = f"{fmt.MARKERS_DIR}/{Path(job.name).name}.json"
    plan = job.plan_hash(options)
    if storage.exists(marker_key) and storage.exists(job.name):
        try:
            marker = json.loads(storage.read_bytes(marker_key))
            if (marker.get("plan") == plan and storage.size(job.name) == marker["shard"]["bytes"]
                    and _sha256_of(storage, job.name) == marker["shard"]["sha256"]):
                return {**marker, "resumed": True}
        except (ValueError, KeyError, OSError):
            pass  # an unreadable marker: rewrite the shard
    multi = options["multi_label"]
    samples: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    with tempfile.NamedTemporaryFile(suffix=".tar", delete=False) as tmp:
        tmp_path = tmp.name
    try:
        with tarfile.open(tmp_path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for key, it in job.members:
                try:
                    try:
                        raw = read_source_bytes(it.src)
                    except Exception as exc:  # noqa: BLE001 - unreadable source is a reject
                        raise Reject("unreadable", f"{type(exc).__name__}: {exc}") from exc
                    jpg = prepare_image(raw, max_side=options["max_side"], quality=options["quality"])
                except Reject as r:
                    rejects.append({"src": printable(it.src), "reason": r.reason,
                                    "detail": printable(r.detail[:500])})
                    continue
                start = tf.offset
                tf.addfile(_tarinfo(f"{key}.jpg", len(jpg)), io.BytesIO(jpg))
                data_off = start + tarfile.BLOCKSIZE  # USTAR, short names: one 512-byte header
                assert tf.offset == data_off + -(-len(jpg) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                labels = it.labels or []
                lab = json.dumps(labels).encode() if multi else str(labels[0]).encode()
                tf.addfile(_tarinfo(f"{key}.{'json' if multi else 'cls'}", len(lab)), io.BytesIO(lab))
                row: dict[str, Any] = {"split": job.split, "shard": job.name, "key": key, "offset": data_off,
                                       "size": len(jpg), "label": -1 if multi else labels[0],
                                       "src": printable(it.src), "sha256": fmt.sha256_hex(jpg)}
                if multi:
                    row["labels"] = labels
                samples.append(row)
        h = hashlib.sha256()
        with open(tmp_path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        nbytes = os.path.getsize(tmp_path)
        storage.upload_file(tmp_path, job.name)
    finally:
        os.unlink(tmp_path)
    shard = {"split": job.split, "shard": job.name, "samples": len(samples), "bytes": nbytes, "sha256": h.hexdigest()}
    result = {"shard": shard, "samples": samples, "rejects": rejects, "plan": plan}
    storage.write_bytes(marker_key, json.dumps(result).encode())
    return {**result, "resumed": False}


def _write_shard_star(args: tuple[ShardJob, str, dict[str, Any]]) -> dict[str, Any]:
    return write_shard(*args)


# ----------------------------------------------------------------------------- planning
def plan_shards(items: list[Item], *, seed: int, val_fraction: float, samples_per_shard: int | None,
                shard_bytes: int | None, val_split: str = "val") -> list[ShardJob]:
    """Shuffle across classes with ``seed``, split off validation, cut into shards.

    With ``shard_bytes`` shards are cut by source file size (an estimate: re-encoded images
    may come out smaller); otherwise by ``samples_per_shard``.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    items = [items[i] for i in order]
    if val_fraction > 0:
        n_val = round(len(items) * val_fraction)
        for it in items[:n_val]:
            it.split = val_split
    by_split: dict[str, list[Item]] = {}
    for it in items:
        by_split.setdefault(it.split, []).append(it)
    jobs: list[ShardJob] = []
    for split in sorted(by_split):
        members = [(f"{split}-{n:09d}", it) for n, it in enumerate(by_split[split])]
        cur: list[tuple[str, Item]] = []
        cur_bytes = 0
        for m in members:
            size = _src_size(m[1].src) if shard_bytes else 0
            full = (len(cur) >= samples_per_shard) if samples_per_shard else (cur and cur_bytes + size > shard_bytes)
            if cur and full:
                jobs.append(ShardJob(split, sum(j.split == split for j in jobs), cur))
                cur, cur_bytes = [], 0
            cur.append(m)
            cur_bytes += size + 2 * tarfile.BLOCKSIZE
        if cur:
            jobs.append(ShardJob(split, sum(j.split == split for j in jobs), cur))
    return jobs


def _src_size(src: str) -> int:
    try:
        return os.path.getsize(src.removeprefix("file://"))
    except OSError:
        return 100_000  # remote sources: assume a typical ImageNet JPEG


# ----------------------------------------------------------------------------- driver
def scan_source(src: str | Path, *, path_column: str | None = None, labels_column: str | None = None,
                multi_label: bool | None = None) -> Source:
    """Scan SRC (class folder or manifest); a SRC with nothing to write is a :class:`WriterError`."""
    srcp = Path(str(src).removeprefix("file://"))
    shown = printable(str(src))
    if not os.path.lexists(srcp):
        raise WriterError(f"SRC {shown} does not exist: give an image folder SRC/<class>/<image> or a "
                          ".parquet/.csv manifest")
    if srcp.is_dir():
        source = scan_folder(srcp)
    elif srcp.suffix in {".parquet", ".csv"}:
        try:
            source = scan_manifest(srcp, path_column=path_column, labels_column=labels_column,
                                   multi_label=multi_label)
        except (ValueError, OSError) as exc:  # pyarrow's parse errors are ValueErrors
            raise WriterError(f"cannot read manifest {shown}: {' '.join(str(exc).split())}") from exc
    else:
        raise WriterError(f"SRC {shown} is a file but not a .parquet/.csv manifest (or an image folder)")
    if not source.items:
        raise WriterError(f"SRC {shown} holds no images to write{_reject_note(source.rejects)}", code=1)
    return source


def _require_samples(src: str | Path, source: Source, results: list[dict[str, Any]]) -> None:
    """Refuse to publish a dataset without a single sample (every image rejected)."""
    if any(r["shard"]["samples"] for r in results):
        return
    rejects = source.rejects + [x for r in results for x in r["rejects"]]
    raise WriterError(f"none of the {len(source.items)} images of SRC {printable(str(src))} could be written, "
                      f"nothing published{_reject_note(rejects)}", code=1)


def write_dataset(src: str | Path, dest: str, *, samples_per_shard: int | None = 1000, shard_bytes: int | None = None,
                  val_fraction: float = 0.0, seed: int = 0, max_side: int | None = None, quality: int = 90,
                  workers: int = 1, path_column: str | None = None, labels_column: str | None = None,
                  multi_label: bool | None = None, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Write SRC as a new version at DEST and publish it (see module docstring).

    Returns the manifest (dataset.json) dict plus a ``summary``. Raises
    :class:`~pipeline.format.DatasetExists` when DEST publishes a different version and
    ``overwrite`` is false (before writing anything), and
    :class:`~pipeline.format.PublishConflict` when another writer published meanwhile.
    """
    t0 = time.monotonic()
    source = scan_source(src, path_column=path_column, labels_column=labels_column, multi_label=multi_label)
    open_storage(dest).ensure_bucket()  # a missing bucket fails now, not after encoding every image
    if shard_bytes:
        samples_per_shard = None
    jobs = plan_shards(source.items, seed=seed, val_fraction=val_fraction, samples_per_shard=samples_per_shard,
                       shard_bytes=shard_bytes)
    options = {"max_side": max_side, "quality": quality, "multi_label": source.multi_label,
               "version": FORMAT_VERSION}
    version = fmt.version_id([j.plan_hash(options) for j in jobs], source.classes, options)
    storage = open_storage(dest)
    seen = fmt.published(storage)  # what publishing will compare against (compare-and-swap)
    if seen.version not in (None, version) and not overwrite:
        raise fmt.DatasetExists(
            f"{dest} already publishes dataset version {seen.version}; this write (different source, seed or "
            f"options) would be version {version}. Pass --overwrite (overwrite=True) to publish it as a new "
            "version (readers pinned to the old version keep reading it), or choose another DEST")
    vdest = url_join(dest, fmt.version_root(version))
    results = _write_shards(jobs, vdest, options, workers=workers, progress=progress)
    _require_samples(src, source, results)  # nothing to publish: a one-line error, exit 1
    info = _write_metadata(open_storage(vdest), results, source, version=version, src=src, seed=seed,
                           max_side=max_side)
    manifest = open_storage(vdest).read_bytes(fmt.MANIFEST)
    fmt.publish(storage, manifest, version, seen)  # last: the version is now what readers get

    resumed = sum(r["resumed"] for r in results)
    rejects = source.rejects + [x for r in results for x in r["rejects"]]
    reasons = Counter(r["reason"] for r in rejects)
    info["summary"] = {"shards_written": len(results) - resumed, "shards_resumed": resumed,
                       "rejects": dict(reasons), "seconds": round(time.monotonic() - t0, 2)}
    return info


def _write_shards(jobs: list[ShardJob], vdest: str, options: dict[str, Any], *, workers: int,
                  progress: bool) -> list[dict[str, Any]]:
    """Write (or resume) every shard of the plan into the version folder ``vdest``."""
    results: list[dict[str, Any]] = []
    tasks = [(j, vdest, options) for j in jobs]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None  # type: ignore[assignment]
    bar = tqdm(total=len(jobs), unit="shard", desc="write_shards", disable=not progress, file=sys.stderr) \
        if tqdm else None
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            for r in pool.imap_unordered(_write_shard_star, tasks):
                results.append(r)
                if bar:
                    bar.update(1)
    else:
        for t in tasks:
            results.append(_write_shard_star(t))
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    results.sort(key=lambda r: (r["shard"]["split"], r["shard"]["shard"]))
    return results


def _write_metadata(vst: Storage, results: list[dict[str, Any]], source: Source, *, version: str,
                    src: str | Path, seed: int, max_side: int | None) -> dict[str, Any]:
    """samples/rejects/index parquet, classes.json, then the version's dataset.json (last)."""
    rows = [{**s, "sha256": bytes.fromhex(s["sha256"])} for r in results for s in r["samples"]]
    rejects = source.rejects + [x for r in results for x in r["rejects"]]
    files: dict[str, dict[str, Any]] = {}
    for name, data in (
        (fmt.SAMPLES, fmt.parquet_bytes(rows, fmt.samples_schema(source.multi_label))),
        (fmt.REJECTS, fmt.parquet_bytes(rejects, fmt.rejects_schema())),
        (fmt.CLASSES, json.dumps(source.classes).encode()),
        (fmt.INDEX, fmt.parquet_bytes([r["shard"] for r in results], fmt.index_schema())),
    ):
        vst.write_bytes(name, data)
        files[name] = fmt.file_entry(data)
    splits: dict[str, dict[str, int]] = {}
    for r in results:
        s = splits.setdefault(r["shard"]["split"], {"samples": 0, "shards": 0, "bytes": 0})
        s["samples"] += r["shard"]["samples"]
        s["shards"] += 1
        s["bytes"] += r["shard"]["bytes"]
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:  # a resumed version keeps its creation time, so its manifest bytes do not change
        created = json.loads(vst.read_bytes(fmt.MANIFEST)).get("created", created)
    except (FileNotFoundError, ValueError, AttributeError):
        pass
    info = {
        "format": fmt.FORMAT, "version": FORMAT_VERSION, "dataset_version": version,
        "num_classes": len(source.classes), "multi_label": source.multi_label,
        "counts": {k: v["samples"] for k, v in splits.items()}, "splits": splits,
        "source": str(src), "seed": seed, "max_side": max_side, "image_ext": "jpg",
        "label_ext": "json" if source.multi_label else "cls", "samples_file": fmt.SAMPLES,
        "files": files, "created": created,
    }
    vst.write_bytes(fmt.MANIFEST, json.dumps(info, indent=2).encode())
    return info


def _summary_lines(info: dict[str, Any], dest: str) -> Iterable[str]:
    yield (f"wrote {dest}: version {info['dataset_version']} (published), {info['num_classes']} classes, "
           f"multi_label={info['multi_label']}")
    for split, s in info["splits"].items():
        yield f"  {split}: {s['samples']} samples in {s['shards']} shards, {s['bytes'] / 1e6:.1f} MB"
    sm = info["summary"]
    yield (f"  shards written {sm['shards_written']}, resumed (already complete) {sm['shards_resumed']}, "
           f"{sm['seconds']}s")
    rej = sm["rejects"]
    yield f"  rejects: {sum(rej.values())}" + (f" ({', '.join(f'{k}={v}' for k, v in sorted(rej.items()))})"
                                               if rej else "")


def _argument_problems(a: argparse.Namespace) -> list[str]:
    """Out-of-range CLI arguments, one line each (flag, value, allowed range)."""
    p: list[str] = []
    if a.samples_per_shard is not None and a.samples_per_shard < 1:
        p.append(f"--samples-per-shard {a.samples_per_shard} must be >= 1")
    if a.shard_bytes is not None and not (math.isfinite(a.shard_bytes) and a.shard_bytes >= 1):
        p.append(f"--shard-bytes {a.shard_bytes} must be a finite number >= 1")
    if not 0.0 <= a.val_fraction < 1.0:  # also false for nan
        p.append(f"--val-fraction {a.val_fraction} must be in [0, 1)")
    if a.max_side is not None and a.max_side < 1:
        p.append(f"--max-side {a.max_side} must be >= 1")
    if not 1 <= a.quality <= 100:
        p.append(f"--quality {a.quality} must be in [1, 100] (JPEG quality)")
    if a.workers < 1:
        p.append(f"--workers {a.workers} must be >= 1")
    return p


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.write_shards", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="I21k-style folder SRC/<class>/<img> or a .parquet/.csv manifest")
    ap.add_argument("dest", help="local folder, file:// or s3://bucket/prefix")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--samples-per-shard", type=int, default=1000)
    g.add_argument("--shard-bytes", type=float, default=None, help="target shard size in bytes (e.g. 1e9)")
    ap.add_argument("--val-fraction", type=float, default=0.0, help="fraction held out as split 'val'")
    ap.add_argument("--seed", type=int, default=0, help="shuffle/split seed")
    ap.add_argument("--max-side", type=int, default=None, help="resize so the longer side is at most this")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality for re-encoded images")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--path-column", default=None)
    ap.add_argument("--labels-column", default=None)
    ap.add_argument("--multi-label", action=argparse.BooleanOptionalAction, default=None,
                    help="force (or forbid) multi-label targets for a manifest")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--overwrite", action="store_true",
                    help="DEST already publishes a different dataset: publish this one as a new version")
    a = ap.parse_args(argv)
    problems = _argument_problems(a)
    if problems:  # one line each, before any source is read or anything is written
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2)
    try:
        info = write_dataset(a.src, a.dest, samples_per_shard=a.samples_per_shard,
                             shard_bytes=int(a.shard_bytes) if a.shard_bytes else None, val_fraction=a.val_fraction,
                             seed=a.seed, max_side=a.max_side, quality=a.quality, workers=a.workers,
                             path_column=a.path_column, labels_column=a.labels_column, multi_label=a.multi_label,
                             progress=not a.quiet, overwrite=a.overwrite)
    except (fmt.DatasetExists, fmt.PublishConflict) as exc:  # another dataset is published there
        print(f"write_shards: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except (WriterError, StorageError) as exc:  # expected problems: one line, no traceback
        print(f"write_shards: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(exc.code if isinstance(exc, WriterError) else 2) from None
    for line in _summary_lines(info, a.dest):
        print(line)


if __name__ == "__main__":
    main()
