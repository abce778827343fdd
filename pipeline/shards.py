"""The three steps of writing a dataset, as plain functions any scheduler can run.

1. :func:`plan_dataset` (driver): scan SRC, shuffle with the seed, cut the samples into
   :class:`ShardJob` s, name the version (a hash of the plan) and note what DEST publishes.
2. :func:`write_shard` (anywhere, once per job, independent of every other job): read, check and
   encode the job's images, upload the tar, its rows file (``samples/``: the shard's sample
   rows) and its marker; returns the shard's index row and its rejects -- never its sample
   rows, so the driver holds O(shards), whatever the number of samples. A shard already
   complete at DEST (marker plan + size + sha256 of the tar and the rows file) is verified and
   reused, not re-encoded. Its output depends only on the job and the options, so any
   scheduler (a process pool, Ray tasks on many nodes) writes the same bytes.
3. :func:`finish_dataset` (driver, last): index/rejects parquet, classes.json, the version
   manifest, then the one conditional PUT that publishes it.

``pipeline.write_shards`` runs 2. in a local process pool; ``orchestration/prepare.py`` runs it
as Ray tasks. Nothing here imports Ray.

An unlabelled source (``--unlabelled``, or a manifest without labels) is written the same way
with ``options["labelled"] = False`` (so its version differs from the labelled write of the same
images): tars hold only ``{key}.jpg`` members, rows have label -1, ``num_classes`` is 0.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import format as fmt
from .encode import Reject, prepare_image
from .format import CONTENT_VERSION
from .metadata import write_metadata
from .scan import scan_source
from .scratch import shard_tar_path, sweep_dest
from .sources import Item, Source, WriterError, printable, read_item_bytes, reject_note
from .storage import LocalStorage, Storage, open_storage, url_join


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


def _resumable(storage: Storage, marker_key: str, job: ShardJob, plan: str,
               multi: bool) -> dict[str, Any] | None:
    """The marker of ``job``'s shard if the shard (and its rows file) at DEST is complete, else None.

    A format-2 marker (sample rows inside it, no rows file) is upgraded: its rows file is written
    from the marker, the tar is kept.
    """
    if not (storage.exists(marker_key) and storage.exists(job.name)):
        return None
    try:
        marker = json.loads(storage.read_bytes(marker_key))
        shard = marker["shard"]
        if not (marker.get("plan") == plan and storage.size(job.name) == shard["bytes"]
                and _sha256_of(storage, job.name) == shard["sha256"]):
            return None
        if "rows_sha256" not in shard:  # written before rows files: keep the tar, write its rows
            shard.update(_put_rows(storage, job.name, marker.pop("samples"), multi))
            storage.write_bytes(marker_key, json.dumps(marker).encode())
            return marker
        key = fmt.rows_key(job.name)
        if storage.exists(key) and fmt.sha256_hex(storage.read_bytes(key)) == shard["rows_sha256"]:
            return marker
    except (ValueError, KeyError, OSError):
        pass  # an unreadable marker: rewrite the shard
    return None


def _put_rows(storage: Storage, shard: str, samples: list[dict[str, Any]], multi: bool) -> dict[str, Any]:
    """Upload ``shard``'s rows file; returns its ``rows_bytes`` / ``rows_sha256`` (index columns)."""
    rows = [{**r, "sha256": bytes.fromhex(r["sha256"])} for r in samples]
    data = fmt.parquet_bytes(rows, fmt.samples_schema(multi))
    storage.write_bytes(fmt.rows_key(shard), data)
    return {"rows_bytes": len(data), "rows_sha256": fmt.sha256_hex(data)}


def write_shard(job: ShardJob, dest: str, options: dict[str, Any]) -> dict[str, Any]:
    """Encode, tar, upload one shard, its rows file and its marker to ``dest`` (a version's
    folder); or reuse it when already complete.

    Returns ``{"shard": index row, "rejects": [rows], "plan": hash, "resumed": bool}``; the
    sample rows go to the rows file only (O(1 shard) here, nothing per sample to the driver).
    """
    # Checked again here, not only when scanning: a job may come from any caller (a Ray task's
    # argument), and a bad name would become a path outside the version folder or a broken tar.
    fmt.check_path_name(job.split, "split", f"shard job {job.index}")
    for key, it in job.members:
        fmt.check_path_name(key, "sample key", printable(it.src), max_len=fmt.MAX_KEY_LEN)
    storage = open_storage(dest)
    marker_key = f"{fmt.MARKERS_DIR}/{Path(job.name).name}.json"
    plan = job.plan_hash(options)
    multi = options["multi_label"]
    labelled = options.get("labelled", True)  # absent in labelled plans: their version ids stay as they were
    done = _resumable(storage, marker_key, job, plan, multi)
    if done is not None:
        return {**done, "resumed": True}
    samples: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    tmp_path = shard_tar_path(job.name)
    try:
        with tarfile.open(tmp_path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for key, it in job.members:
                try:
                    try:
                        raw = read_item_bytes(it)
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
                row: dict[str, Any] = {"split": job.split, "shard": job.name, "key": key, "offset": data_off,
                                       "size": len(jpg), "label": -1, "src": printable(it.src),
                                       "sha256": fmt.sha256_hex(jpg)}
                if labelled:  # unlabelled: no label member at all, so stock readers see images only
                    labels = it.labels or []
                    lab = json.dumps(labels).encode() if multi else str(labels[0]).encode()
                    tf.addfile(_tarinfo(f"{key}.{'json' if multi else 'cls'}", len(lab)), io.BytesIO(lab))
                    row.update({"labels": labels} if multi else {"label": labels[0]})
                samples.append(row)
        h = hashlib.sha256()
        with open(tmp_path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        nbytes = os.path.getsize(tmp_path)
        storage.upload_file(tmp_path, job.name)
    finally:
        tmp_path.unlink(missing_ok=True)
    shard = {"split": job.split, "shard": job.name, "samples": len(samples), "bytes": nbytes, "sha256": h.hexdigest(),
             **_put_rows(storage, job.name, samples, multi)}
    result = {"shard": shard, "rejects": rejects, "plan": plan}
    storage.write_bytes(marker_key, json.dumps(result).encode())  # last: the shard is complete
    return {**result, "resumed": False}



# ----------------------------------------------------------------------------- planning
def plan_shards(items: list[Item], *, seed: int, val_fraction: float, samples_per_shard: int | None,
                shard_bytes: int | None, val_split: str = "val") -> list[ShardJob]:
    """Shuffle across classes with ``seed``, split off validation, cut into shards.

    With ``shard_bytes`` shards are cut by source file size (an estimate: re-encoded images
    may come out smaller); otherwise by ``samples_per_shard``.
    """
    fmt.check_path_name(val_split, "split", "the validation split")
    for split in {it.split for it in items}:  # scanned sources checked theirs; one built in code may not
        if fmt.path_name_problem(split) is not None:
            fmt.check_path_name(split, "split", printable(next(it.src for it in items if it.split == split)))
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
            size = _src_size(m[1]) if shard_bytes else 0
            full = (len(cur) >= samples_per_shard) if samples_per_shard else (cur and cur_bytes + size > shard_bytes)
            if cur and full:
                jobs.append(ShardJob(split, sum(j.split == split for j in jobs), cur))
                cur, cur_bytes = [], 0
            cur.append(m)
            cur_bytes += size + 2 * tarfile.BLOCKSIZE
        if cur:
            jobs.append(ShardJob(split, sum(j.split == split for j in jobs), cur))
    return jobs


def _src_size(item: Item) -> int:
    if item.span is not None:
        return item.span[1]
    try:
        return os.path.getsize(item.src.removeprefix("file://"))
    except OSError:
        return 100_000  # remote sources: assume a typical ImageNet JPEG



# ----------------------------------------------------------------------------- plan / finish
@dataclass(frozen=True, kw_only=True)
class WriteSettings:
    """Everything besides SRC and DEST that decides a dataset's content (the writer CLI flags)."""

    samples_per_shard: int | None = 1000
    shard_bytes: int | None = None  # when set, shards are cut by size and samples_per_shard is ignored
    val_fraction: float = 0.0
    seed: int = 0
    max_side: int | None = None
    quality: int = 90
    path_column: str | None = None
    labels_column: str | None = None
    multi_label: bool | None = None
    unlabelled: bool = False  # images only: no labels, whatever SRC holds (a manifest without labels is anyway)


@dataclass(frozen=True, kw_only=True)
class DatasetPlan:
    """A planned write: the shard jobs, the version they make, and what DEST published at the start."""

    src: str
    dest: str
    settings: WriteSettings
    source: Source
    jobs: list[ShardJob]
    options: dict[str, Any]  # what write_shard needs besides the job (part of the version hash)
    version: str
    seen: fmt.Published  # DEST's published manifest when planning (the compare-and-swap token)
    started: float  # time.monotonic() when planning began

    @property
    def vdest(self) -> str:
        """URL of the version's folder: where the shards and metadata go."""
        return url_join(self.dest, fmt.version_root(self.version))


def plan_dataset(src: str | Path, dest: str, settings: WriteSettings, *, overwrite: bool = False) -> DatasetPlan:
    """Step 1: scan and plan. Raises :class:`~pipeline.format.DatasetExists` (before writing anything)
    when DEST publishes a different version and ``overwrite`` is false."""
    t0 = time.monotonic()
    source = scan_source(src, path_column=settings.path_column, labels_column=settings.labels_column,
                         multi_label=settings.multi_label, unlabelled=settings.unlabelled)
    return plan_from_source(source, str(src), dest, settings, overwrite=overwrite, started=t0)


def plan_from_source(source: Source, src: str, dest: str, settings: WriteSettings, *, overwrite: bool = False,
                     started: float | None = None) -> DatasetPlan:
    """:func:`plan_dataset` for an already scanned (or built) ``source``; ``src`` is what the manifest names."""
    t0 = time.monotonic() if started is None else started
    jobs = plan_shards(source.items, seed=settings.seed, val_fraction=settings.val_fraction,
                       samples_per_shard=None if settings.shard_bytes else settings.samples_per_shard,
                       shard_bytes=settings.shard_bytes)
    storage = open_storage(dest)
    storage.ensure_bucket()  # a missing bucket fails now, not after encoding every image
    if isinstance(storage, LocalStorage):  # a killed writer's half-written files (S3 has none to see)
        sweep_dest(storage.root)
    options: dict[str, Any] = {"max_side": settings.max_side, "quality": settings.quality,
                               "multi_label": source.multi_label, "version": CONTENT_VERSION}
    if not source.labelled:
        options["labelled"] = False
    version = fmt.version_id([j.plan_hash(options) for j in jobs], source.classes, options)
    seen = fmt.published(storage)
    if seen.version not in (None, version) and not overwrite:
        raise fmt.DatasetExists(
            f"{dest} already publishes dataset version {seen.version}; this write (different source, seed or "
            f"options) would be version {version}. Pass --overwrite (overwrite=True) to publish it as a new "
            "version (readers pinned to the old version keep reading it), or choose another DEST")
    return DatasetPlan(src=src, dest=dest, settings=settings, source=source, jobs=jobs, options=options,
                       version=version, seen=seen, started=t0)


def finish_dataset(plan: DatasetPlan, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Step 3: write the version's metadata from every job's result, then publish it (last).

    ``results`` holds one :func:`write_shard` result per job, in any order. Returns the
    manifest dict plus a ``summary``; raises :class:`~pipeline.format.PublishConflict` when
    another writer published meanwhile, :class:`WriterError` when no image could be written.
    """
    if len(results) != len(plan.jobs):
        raise RuntimeError(f"{len(results)} shard results for {len(plan.jobs)} planned shards: every shard must "
                           "be written before the version is finished")
    results = sorted(results, key=lambda r: (r["shard"]["split"], r["shard"]["shard"]))
    _require_samples(plan.src, plan.source, results)  # nothing to publish: a one-line error, exit 1
    vst = open_storage(plan.vdest)
    info = _write_metadata(vst, results, plan)
    fmt.publish(open_storage(plan.dest), vst.read_bytes(fmt.MANIFEST), plan.version, plan.seen)
    resumed = sum(r["resumed"] for r in results)
    reasons = Counter(r["reason"] for r in all_rejects(plan, results))
    info["summary"] = {"shards_written": len(results) - resumed, "shards_resumed": resumed,
                       "rejects": dict(reasons), "seconds": round(time.monotonic() - plan.started, 2)}
    return info


def all_rejects(plan: DatasetPlan, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rejects found while scanning SRC, then those of every shard."""
    return plan.source.rejects + [x for r in results for x in r["rejects"]]


def _require_samples(src: str, source: Source, results: list[dict[str, Any]]) -> None:
    """Refuse to publish a dataset without a single sample (every image rejected)."""
    if any(r["shard"]["samples"] for r in results):
        return
    rejects = source.rejects + [x for r in results for x in r["rejects"]]
    raise WriterError(f"none of the {len(source.items)} images of SRC {printable(src)} could be written, "
                      f"nothing published{reject_note(rejects)}", code=1)


def _write_metadata(vst: Storage, results: list[dict[str, Any]], plan: DatasetPlan) -> dict[str, Any]:
    about = {"source": str(plan.src), "seed": plan.settings.seed, "max_side": plan.settings.max_side}
    return write_metadata(vst, index=[r["shard"] for r in results], rejects=all_rejects(plan, results),
                          classes=plan.source.classes, multi_label=plan.source.multi_label, version=plan.version,
                          about=about, labelled=plan.source.labelled)
