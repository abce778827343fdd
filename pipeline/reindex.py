"""Rewrite a format-2 dataset version's metadata as format 3; the shards (tars) stay as they are.

``python -m pipeline.reindex DEST [--version V]``

Format 2 kept every sample row of a version in one ``samples.parquet``, which every rank read
whole at start (O(samples) memory and reads per rank). This writes format 3's per-shard rows
files (``samples/{split}-NNNNNN.parquet``) from it, a format-3 ``index.parquet`` naming them by
size and sha256, and the version's manifest, then republishes the version (the same version id:
its content is unchanged). Nothing is re-encoded and no tar is read or written.

Memory is O(one shard + one batch of rows): ``samples.parquet`` is copied to a local temporary
file, checked against the manifest's sha256, and streamed; its rows come grouped by shard (as
every writer wrote them). ``samples.parquet`` itself is left in place (a job that loaded the old
metadata may still be running; delete it once none is). Run it while no job is *starting* on
DEST: a loader that read the old manifest just before ``index.parquet`` is replaced stops with
"index.parquet is damaged" and simply needs a restart. Format-1 datasets (no versions, no
per-sample sha256) must be rewritten with ``python -m pipeline.write_shards SRC DEST --overwrite``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import format as fmt
from .storage import Storage, StorageError, open_storage


class ReindexError(RuntimeError):
    """The dataset cannot be reindexed (wrong format, inconsistent metadata); the message says why."""


def reindex(url: str, version: str | None = None) -> dict[str, Any]:
    """Reindex ``version`` (default: the published one) of ``url`` as format 3; returns its new manifest."""
    root = open_storage(url)
    seen = fmt.published(root)
    res = fmt.resolve(url, version)
    have = fmt.format_of(res.manifest)
    if have >= 3:
        return res.manifest
    if have == 1:
        raise ReindexError(f"{url} is a format-1 dataset (no versions, no per-sample sha256): its metadata cannot "
                           f"be upgraded in place; {fmt.REWRITE_HINT}")
    st = res.storage()
    name = res.manifest.get("samples_file", fmt.SAMPLES)
    index = fmt.read_index(res).to_pylist()
    multi = bool(res.manifest.get("multi_label"))
    with tempfile.TemporaryDirectory(prefix="vitscale-reindex-") as tmp:
        local = Path(tmp) / "samples.parquet"
        st.download_file(name, local)
        _check_file(local, res.manifest["files"][name], st.url_for(name))
        written = _write_rows(st, local, index, multi, st.url_for(name))
    for r in index:
        r.update(written[r["shard"]])
    data = fmt.parquet_bytes(index, fmt.index_schema())
    st.write_bytes(fmt.INDEX, data)
    files = {k: v for k, v in res.manifest["files"].items() if k != name}
    files[fmt.INDEX] = fmt.file_entry(data)
    info = {k: v for k, v in res.manifest.items() if k != "samples_file"}
    info.update(version=fmt.FORMAT_VERSION, files=files)
    manifest = json.dumps(info, indent=2).encode()
    st.write_bytes(fmt.MANIFEST, manifest)
    if seen.version == res.version:
        fmt.publish(root, manifest, res.version, seen)
    return info


def _check_file(path: Path, want: dict[str, Any], where: str) -> None:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    if n != want["bytes"] or h.hexdigest() != want["sha256"]:
        raise fmt.DatasetFormatError(f"{where} is damaged: {n} bytes with sha256 {h.hexdigest()[:12]}..., but the "
                                     f"manifest records {want['bytes']} bytes, sha256 {want['sha256'][:12]}...; "
                                     f"{fmt.REWRITE_HINT}")


def _write_rows(st: Storage, local: Path, index: list[dict[str, Any]], multi: bool,
                where: str) -> dict[str, dict[str, int | str]]:
    """Every shard's rows file from the streamed samples table; ``{shard: {rows_bytes, rows_sha256}}``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = fmt.samples_schema(multi)
    want = {r["shard"]: int(r["samples"]) for r in index}
    out: dict[str, dict[str, int | str]] = {}
    cur: str | None = None
    parts: list[Any] = []

    def flush() -> None:
        if cur is None:
            return
        t = pa.concat_tables(parts).select(schema.names).cast(schema).sort_by("offset")
        if cur not in want or t.num_rows != want[cur]:
            raise ReindexError(f"{where} has {t.num_rows} rows of shard {cur}, index.parquet {want.get(cur)}; "
                               f"{fmt.REWRITE_HINT}")
        buf = pa.BufferOutputStream()
        pq.write_table(t, buf)
        data = buf.getvalue().to_pybytes()
        st.write_bytes(fmt.rows_key(cur), data)
        out[cur] = {"rows_bytes": len(data), "rows_sha256": fmt.sha256_hex(data)}

    for batch in pq.ParquetFile(local).iter_batches(batch_size=1 << 16):
        t = pa.Table.from_batches([batch])
        shards = t["shard"].to_numpy(zero_copy_only=False)
        cuts = np.concatenate([[0], np.flatnonzero(shards[1:] != shards[:-1]) + 1, [len(shards)]])
        for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
            name = str(shards[a])
            if name != cur:
                flush()
                if name in out:
                    raise ReindexError(f"{where}: the rows of shard {name} are not together (not written by "
                                       f"vitscale?); {fmt.REWRITE_HINT}")
                cur, parts = name, []
            parts.append(t.slice(a, b - a))
    flush()
    for name in want:  # shards whose every image was rejected: an empty rows file
        if name not in out:
            cur, parts = name, [schema.empty_table()]
            flush()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.reindex", description=__doc__.split("\n\n")[0])
    ap.add_argument("dest", help="the dataset (local folder, file:// or s3://bucket/prefix)")
    ap.add_argument("--version", default=None, help="the version to reindex (default: the published one)")
    a = ap.parse_args(argv)
    try:
        info = reindex(a.dest, a.version)
    except (ReindexError, fmt.DatasetFormatError, fmt.PublishConflict, StorageError) as exc:
        print(f"reindex: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"reindexed {a.dest}: version {info['dataset_version']} is format {info['version']} "
          f"({sum(s['shards'] for s in info['splits'].values())} shards, rows files under "
          f"{fmt.version_root(info['dataset_version'])}/{fmt.ROWS_DIR}/)")


if __name__ == "__main__":
    main()
