"""Writing a version's metadata files: index.parquet, rejects.parquet, classes.json, dataset.json.

The last step of every writer (:func:`pipeline.shards.finish_dataset`, the metadata-only
generator in :mod:`pipeline.demo_data`): the shards and their rows files are already written,
so this is O(shards + rejects), never O(samples). The layout is :mod:`pipeline.format`'s.
"""

from __future__ import annotations

import json
import time
from typing import Any

from . import format as fmt
from .storage import Storage


def write_metadata(vst: Storage, *, index: list[dict[str, Any]] | Any, rejects: list[dict[str, Any]],
                   classes: list[str], multi_label: bool, version: str, about: dict[str, Any],
                   labelled: bool = True) -> dict[str, Any]:
    """rejects/index parquet, classes.json, then the version's dataset.json (last), into ``vst``.

    ``index``: one row per shard (split, shard order; the shards and their rows files are
    already written), as dicts or a pyarrow Table of :func:`~pipeline.format.index_schema`;
    ``about``: the manifest's descriptive fields (source, seed, max_side). ``labelled=False``:
    images only, recorded as ``num_classes: 0``, ``labelled: false``, ``label_ext: null`` (readers
    that predate the flag see a dataset without classes). Returns the manifest.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = index if isinstance(index, pa.Table) else pa.Table.from_pylist(index, schema=fmt.index_schema())
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    files: dict[str, dict[str, Any]] = {}
    for name, data in (
        (fmt.REJECTS, fmt.parquet_bytes(rejects, fmt.rejects_schema())),
        (fmt.CLASSES, json.dumps(classes).encode()),
        (fmt.INDEX, buf.getvalue().to_pybytes()),
    ):
        vst.write_bytes(name, data)
        files[name] = fmt.file_entry(data)
    splits: dict[str, dict[str, int]] = {}
    for split, samples, nbytes in zip(*(table[c].to_pylist() for c in ("split", "samples", "bytes")), strict=True):
        s = splits.setdefault(split, {"samples": 0, "shards": 0, "bytes": 0})
        s["samples"] += samples
        s["shards"] += 1
        s["bytes"] += nbytes
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:  # a resumed version keeps its creation time, so its manifest bytes do not change
        created = json.loads(vst.read_bytes(fmt.MANIFEST)).get("created", created)
    except (FileNotFoundError, ValueError, AttributeError):
        pass
    info = {
        "format": fmt.FORMAT, "version": fmt.FORMAT_VERSION, "dataset_version": version,
        "num_classes": len(classes), "multi_label": multi_label, **({} if labelled else {"labelled": False}),
        "counts": {k: v["samples"] for k, v in splits.items()}, "splits": splits,
        **about, "image_ext": "jpg", "label_ext": None if not labelled else "json" if multi_label else "cls",
        "files": files, "created": created,
    }
    vst.write_bytes(fmt.MANIFEST, json.dumps(info, indent=2).encode())
    return info
