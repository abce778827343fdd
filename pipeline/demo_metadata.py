"""Metadata-only datasets of any size: a shard table and per-sample rows, without a single image.

``python -m pipeline.demo_data metadata DEST --samples 14000000 --samples-per-shard 1000``

For planning, tests and benchmarks at ImageNet-21k / JFT-300M scale without 300M JPEGs. The
files are exactly what :mod:`pipeline.shards` writes (:mod:`pipeline.format`), with realistic
columns (keys, byte offsets and sizes of ~110 KB images, labels, ``src`` URIs, random sha256);
only the tars are missing, so a loader plans and reads shard rows but fails when it opens a tar.
The manifest says ``"metadata_only": true``.

* ``index_only=True`` writes the shard table alone (no rows files; ``rows_bytes`` 0): enough
  to load and plan; a loader that opens a shard fails naming the missing rows file.
* ``layout=2`` writes format 2 instead (one ``samples.parquet`` for the version): what
  datasets written before format 3 look like, for measuring that read path
  (``bench/metadata.py``) and testing ``pipeline.reindex``.

Memory is O(one shard) for the rows and O(shards) for the table, at any size.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import format as fmt
from .metadata import write_metadata
from .storage import Storage, open_storage, url_join

#: Mean size of a generated image (~ImageNet-21k's JPEGs at full resolution).
MEAN_IMAGE_BYTES = 110_000
BLOCK = 512


def _shard_rows(rng: np.random.Generator, split: str, first: int, n: int, shard: str, num_classes: int,
                multi_label: bool) -> tuple[Any, int]:
    """One shard's rows (as a writer would record them) and the size its tar would have."""
    import pyarrow as pa

    sizes = rng.integers(MEAN_IMAGE_BYTES // 5, MEAN_IMAGE_BYTES * 9 // 5, n)
    # each sample: a header, the padded image, the label member's header and padded data
    step = BLOCK + -(-sizes // BLOCK) * BLOCK + 2 * BLOCK
    offsets = BLOCK + np.concatenate([[0], np.cumsum(step)[:-1]])
    ids = np.arange(first, first + n)
    keys = [f"{split}-{i:09d}" for i in ids.tolist()]
    src = [f"s3://raw-images/{split}/{i // 10_000:05d}/img_{i:09d}.jpg" for i in ids.tolist()]
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    cols: dict[str, Any] = {
        "split": pa.array([split] * n, pa.string()), "shard": pa.array([shard] * n, pa.string()),
        "key": pa.array(keys, pa.string()), "offset": pa.array(offsets, pa.int64()), "size": pa.array(sizes, pa.int64()),
        "label": pa.array(np.full(n, -1, np.int32) if multi_label else labels, pa.int32()), "src": pa.array(src),
        "sha256": pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), n, [None, pa.py_buffer(rng.bytes(32 * n))]),
    }
    if multi_label:
        extra = rng.integers(0, num_classes, (n, 2))
        lens = rng.integers(1, 4, n)
        cols["labels"] = pa.array([[int(labels[k]), *extra[k, : lens[k] - 1].tolist()] for k in range(n)],
                                  pa.list_(pa.int32()))
    table = pa.table(cols, schema=fmt.samples_schema(multi_label))
    return table, int(step.sum()) + 2 * BLOCK  # + the end-of-archive blocks


def _parquet(table: Any) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


def make_metadata_dataset(dest: str | Path, *, samples: int, samples_per_shard: int = 1000,
                          val_fraction: float = 0.0, num_classes: int = 1000, multi_label: bool = False,
                          seed: int = 0, layout: int = fmt.FORMAT_VERSION, index_only: bool = False) -> dict[str, Any]:
    """Write and publish a metadata-only dataset at ``dest`` (see the module docstring); returns its manifest."""
    import pyarrow as pa

    if samples < 1 or samples_per_shard < 1 or layout not in (2, 3) or (index_only and layout != 3):
        raise ValueError(f"samples={samples} and samples_per_shard={samples_per_shard} must be >= 1, layout "
                         f"{layout} 2 or 3, index_only only with layout 3")
    params = {"samples": samples, "samples_per_shard": samples_per_shard, "val_fraction": val_fraction,
              "num_classes": num_classes, "multi_label": multi_label, "seed": seed, "layout": layout,
              "index_only": index_only}
    classes = [f"c{i:05d}" for i in range(num_classes)]
    version = fmt.version_id([hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()], classes,
                             {"metadata_only": True})
    root = open_storage(str(dest))
    seen = fmt.published(root)
    vst = open_storage(url_join(str(dest), fmt.version_root(version)))
    rng = np.random.default_rng(seed)
    n_val = round(samples * val_fraction)
    cols: dict[str, list[Any]] = {k: [] for k in fmt.index_schema().names}
    with tempfile.TemporaryDirectory(prefix="vitscale-demo-meta-") as tmp:
        whole = _Whole(Path(tmp) / fmt.SAMPLES, multi_label) if layout == 2 else None
        for split, total in (("train", samples - n_val), ("val", n_val)):
            for k, first in enumerate(range(0, total, samples_per_shard)):
                n = min(samples_per_shard, total - first)
                shard = f"{fmt.SHARDS_DIR}/{split}-{k:06d}.tar"
                rows_bytes, rows_sha = 0, fmt.sha256_hex(b"")
                if index_only:
                    tar_bytes = n * (MEAN_IMAGE_BYTES + 3 * BLOCK)
                else:
                    table, tar_bytes = _shard_rows(rng, split, first, n, shard, num_classes, multi_label)
                    if whole is not None:
                        whole.add(table)
                    else:
                        data = _parquet(table)
                        vst.write_bytes(fmt.rows_key(shard), data)
                        rows_bytes, rows_sha = len(data), fmt.sha256_hex(data)
                for key, v in zip(cols, (split, shard, n, tar_bytes, rng.bytes(32).hex(), rows_bytes, rows_sha),
                                  strict=True):
                    cols[key].append(v)
        about = {"source": "metadata-only (pipeline.demo_data metadata)", "seed": seed, "max_side": None,
                 "metadata_only": True, "index_only": index_only}
        index = pa.table(cols, schema=fmt.index_schema())
        info = write_metadata(vst, index=index, rejects=[], classes=classes, multi_label=multi_label,
                              version=version, about=about)
        if whole is not None:
            info = whole.finish(vst, info, index)
    fmt.publish(root, vst.read_bytes(fmt.MANIFEST), version, seen)
    return info


class _Whole:
    """Format 2's one samples.parquet, streamed to a local file in row groups of about 1M rows
    (what one ``pq.write_table`` of every row, format 2's writer, produced)."""

    GROUP = 1 << 20

    def __init__(self, path: Path, multi_label: bool) -> None:
        import pyarrow.parquet as pq

        self.path, self.parts, self.rows = path, [], 0
        self.writer = pq.ParquetWriter(path, fmt.samples_schema(multi_label))

    def add(self, table: Any) -> None:
        self.parts.append(table)
        self.rows += table.num_rows
        if self.rows >= self.GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.parts:
            self.writer.write_table(pa.concat_tables(self.parts), row_group_size=self.GROUP)
        self.parts, self.rows = [], 0

    def finish(self, vst: Storage, info: dict[str, Any], index: Any) -> dict[str, Any]:
        """Upload samples.parquet; rewrite the index (no rows columns) and the manifest as format 2."""
        self._flush()
        self.writer.close()
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        vst.upload_file(self.path, fmt.SAMPLES)
        data = _parquet(index.drop_columns(list(fmt.ROWS_COLUMNS)))
        vst.write_bytes(fmt.INDEX, data)
        info = {**info, "version": 2, "samples_file": fmt.SAMPLES}
        info["files"] = {**info["files"], fmt.INDEX: fmt.file_entry(data),
                         fmt.SAMPLES: {"bytes": self.path.stat().st_size, "sha256": h.hexdigest()}}
        vst.write_bytes(fmt.MANIFEST, json.dumps(info, indent=2).encode())
        return info
