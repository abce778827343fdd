"""Write an image collection as WebDataset tar shards plus per-shard sample rows and a shard index.

``python -m pipeline.write_shards SRC DEST [options]``

SRC is an ImageNet-21k-style folder (``SRC/<synset>/<image>``, local or ``s3://bucket/prefix``;
one label per image, classes = sorted sub-folder names), the ImageNet-21k release tar (a tar of
``<synset>.tar`` files, local or ``s3://``, read by streaming: :mod:`pipeline.synset_tars`) or a
JFT-style manifest (``.parquet`` or ``.csv``) with an image path/URI column (local, ``s3://``)
and a labels column holding one or several labels per image (multi-label), or no labels column
(unlabelled). ``--unlabelled`` writes images only: a folder SRC is then a plain tree of images at
any depth (its folders are not classes), a manifest's labels and a release tar's synsets are
ignored; the dataset has ``num_classes`` 0 (docs/data.md, "Unlabelled data"). DEST is a local
folder, ``file://`` or ``s3://bucket/prefix``. The steps (plan, write one shard, finish) are
the functions of :mod:`pipeline.shards`; ``orchestration/prepare.py`` runs the same steps as
Ray tasks over a cluster and writes byte-identical shards.

Layout written at DEST (defined in :mod:`pipeline.format`)::

    versions/<version>/shards/{split}-NNNNNN.tar   plain tar, members {key}.jpg + {key}.cls (int)
                                or {key}.json (list of ints, multi-label), or {key}.jpg alone
                                (unlabelled); stock webdataset reads it
    versions/<version>/samples/{split}-NNNNNN.parquet   the shard's rows, one per sample: split,
                                shard, key, offset, size (byte range of the JPEG member inside the
                                tar), label(s), src, sha256 -- read by a loader when it opens the shard
    versions/<version>/markers/{shard}.json   per-shard completion marker (plan, the shard's index row)
    versions/<version>/index.parquet   one row per shard: counts, sizes and sha256 of tar and rows file
    versions/<version>/{classes.json, rejects.parquet, dataset.json}
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
FIFO, a hidden file, a symlink leading out of SRC or out of its class folder), are skipped and
listed in ``rejects.parquet`` with the reason. File names need not be UTF-8. Integer manifest
labels are class indices; a manifest split that is not a safe name (``pipeline.format``) or a
label that cannot be a class index stops the writer naming the row (docs/data.md, "Hostile input"). The CLI exits 2 with one line for a missing SRC or bucket and 1 when nothing could be
written (no images, or all rejected); images above ``pipeline.decode.DEFAULT_MAX_PIXELS`` (the
loader's limit too) are rejected as ``too_many_pixels``.
"""


from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import format as fmt
from .encode import WRITER_MAX_PIXELS, Reject, prepare_image
from .scan import scan_source
from .shards import (
    DatasetPlan,
    ShardJob,
    WriteSettings,
    finish_dataset,
    plan_dataset,
    plan_shards,
    write_shard,
)
from .sources import Item, Source, WriterError, printable
from .storage import StorageError

__all__ = ["WRITER_MAX_PIXELS", "DatasetPlan", "Item", "Reject", "ShardJob", "Source", "WriteSettings", "WriterError",
           "add_write_arguments", "main", "plan_shards", "prepare_image", "printable", "scan_source",
           "settings_from_args", "write_dataset", "write_shard"]


def write_dataset(src: str | Path, dest: str, *, samples_per_shard: int | None = 1000, shard_bytes: int | None = None,
                  val_fraction: float = 0.0, seed: int = 0, max_side: int | None = None, quality: int = 90,
                  workers: int = 1, path_column: str | None = None, labels_column: str | None = None,
                  multi_label: bool | None = None, unlabelled: bool = False, progress: bool = True,
                  overwrite: bool = False) -> dict[str, Any]:
    """Write SRC as a new version at DEST and publish it (see module docstring).

    Returns the manifest (dataset.json) dict plus a ``summary``. Raises
    :class:`~pipeline.format.DatasetExists` when DEST publishes a different version and
    ``overwrite`` is false (before writing anything), and
    :class:`~pipeline.format.PublishConflict` when another writer published meanwhile.
    """
    settings = WriteSettings(samples_per_shard=samples_per_shard, shard_bytes=shard_bytes, val_fraction=val_fraction,
                             seed=seed, max_side=max_side, quality=quality, path_column=path_column,
                             labels_column=labels_column, multi_label=multi_label, unlabelled=unlabelled)
    plan = plan_dataset(src, dest, settings, overwrite=overwrite)
    results = _write_shards(plan.jobs, plan.vdest, plan.options, workers=workers, progress=progress)
    return finish_dataset(plan, results)


def _write_shard_star(args: tuple[ShardJob, str, dict[str, Any]]) -> dict[str, Any]:
    return write_shard(*args)  # looked up here at call time, so tests can slow it down


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



def summary_lines(info: dict[str, Any], dest: str) -> Iterable[str]:
    labels = (f"{info['num_classes']} classes, multi_label={info['multi_label']}" if fmt.is_labelled(info)
              else "unlabelled (images only)")
    yield f"wrote {dest}: version {info['dataset_version']} (published), {labels}"
    for split, s in info["splits"].items():
        yield f"  {split}: {s['samples']} samples in {s['shards']} shards, {s['bytes'] / 1e6:.1f} MB"
    sm = info["summary"]
    yield (f"  shards written {sm['shards_written']}, resumed (already complete) {sm['shards_resumed']}, "
           f"{sm['seconds']}s")
    rej = sm["rejects"]
    yield f"  rejects: {sum(rej.values())}" + (f" ({', '.join(f'{k}={v}' for k, v in sorted(rej.items()))})"
                                               if rej else "")


def argument_problems(a: argparse.Namespace) -> list[str]:
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
    if getattr(a, "workers", 1) < 1:
        p.append(f"--workers {a.workers} must be >= 1")
    if a.unlabelled:
        p += [f"{flag} contradicts --unlabelled (which writes no labels); drop one of them"
              for flag, v in (("--labels-column", a.labels_column), ("--multi-label", a.multi_label)) if v]
    return p


def add_write_arguments(ap: argparse.ArgumentParser) -> None:
    """SRC, DEST and the flags that decide the dataset's content (shared with orchestration/prepare.py)."""
    ap.add_argument("src", help="folder SRC/<class>/<img> (local or s3://), the ImageNet-21k release .tar "
                    "(tar of <synset>.tar) or a .parquet/.csv manifest")
    ap.add_argument("dest", help="local folder, file:// or s3://bucket/prefix")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--samples-per-shard", type=int, default=1000)
    g.add_argument("--shard-bytes", type=float, default=None, help="target shard size in bytes (e.g. 1e9)")
    ap.add_argument("--val-fraction", type=float, default=0.0, help="fraction held out as split 'val'")
    ap.add_argument("--seed", type=int, default=0, help="shuffle/split seed")
    ap.add_argument("--max-side", type=int, default=None, help="resize so the longer side is at most this")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality for re-encoded images")
    ap.add_argument("--path-column", default=None)
    ap.add_argument("--labels-column", default=None)
    ap.add_argument("--multi-label", action=argparse.BooleanOptionalAction, default=None,
                    help="force (or forbid) multi-label targets for a manifest")
    ap.add_argument("--unlabelled", action="store_true",
                    help="images only, no labels: a folder SRC is a plain tree of images at any depth (not "
                    "class folders); a manifest's labels column or a release tar's synsets are ignored")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--overwrite", action="store_true",
                    help="DEST already publishes a different dataset: publish this one as a new version")


def settings_from_args(a: argparse.Namespace) -> WriteSettings:
    return WriteSettings(samples_per_shard=a.samples_per_shard, shard_bytes=int(a.shard_bytes) if a.shard_bytes else None,
                         val_fraction=a.val_fraction, seed=a.seed, max_side=a.max_side, quality=a.quality,
                         path_column=a.path_column, labels_column=a.labels_column, multi_label=a.multi_label,
                         unlabelled=a.unlabelled)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.write_shards", description=__doc__.split("\n\n")[0])
    add_write_arguments(ap)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    a = ap.parse_args(argv)
    problems = argument_problems(a)
    if problems:  # one line each, before any source is read or anything is written
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2)
    try:
        info = write_dataset(a.src, a.dest, samples_per_shard=a.samples_per_shard,
                             shard_bytes=int(a.shard_bytes) if a.shard_bytes else None, val_fraction=a.val_fraction,
                             seed=a.seed, max_side=a.max_side, quality=a.quality, workers=a.workers,
                             path_column=a.path_column, labels_column=a.labels_column, multi_label=a.multi_label,
                             unlabelled=a.unlabelled, progress=not a.quiet, overwrite=a.overwrite)
    except (fmt.DatasetExists, fmt.PublishConflict) as exc:  # another dataset is published there
        print(f"write_shards: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except (WriterError, StorageError) as exc:  # expected problems: one line, no traceback
        print(f"write_shards: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(exc.code if isinstance(exc, WriterError) else 2) from None
    for line in summary_lines(info, a.dest):
        print(line)


if __name__ == "__main__":
    main()
