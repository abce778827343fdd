"""The parquet schemas of a dataset's metadata files, and how a file is recorded in a manifest.

Part of the dataset layout (:mod:`pipeline.format` re-exports everything here).
"""

from __future__ import annotations

import hashlib
from typing import Any


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def index_schema(rows: bool = True) -> Any:
    """index.parquet's schema; ``rows=False``: format 2's (no rows file columns)."""
    import pyarrow as pa

    fields = [("split", pa.string()), ("shard", pa.string()), ("samples", pa.int64()), ("bytes", pa.int64()),
              ("sha256", pa.string())]
    if rows:
        fields += [("rows_bytes", pa.int64()), ("rows_sha256", pa.string())]
    return pa.schema(fields)


def samples_schema(multi_label: bool) -> Any:
    """The sample rows' schema: a shard's rows file (format 3), samples.parquet (format 2)."""
    import pyarrow as pa

    fields = [("split", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("offset", pa.int64()),
              ("size", pa.int64()), ("label", pa.int32()), ("src", pa.string()), ("sha256", pa.binary(32))]
    if multi_label:
        fields.append(("labels", pa.list_(pa.int32())))
    return pa.schema(fields)


def rejects_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("src", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


def parquet_bytes(rows: list[dict[str, Any]], schema: Any) -> bytes:
    """``rows`` as a parquet file with exactly ``schema``'s columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({f.name: [r[f.name] for r in rows] for f in schema}, schema=schema)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


def file_entry(data: bytes) -> dict[str, Any]:
    """The manifest's record of one metadata file."""
    return {"bytes": len(data), "sha256": sha256_hex(data)}
