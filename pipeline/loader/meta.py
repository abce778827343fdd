"""``Meta``: a pinned dataset version's shard table for one split, read by ``load_meta``.

What a rank holds is O(shards): per shard its name, first sample id, sample count, size and
sha256, and the size and sha256 of its rows file (``index.parquet``, read once per node through
the :class:`~pipeline.cache.ContentCache` for remote datasets). That is all planning needs
(:mod:`pipeline.plan`). A shard's sample rows (byte offsets, sizes, labels, keys, sha256) are
read when the shard is opened (:meth:`Meta.rows`, in the reader thread), checked against the
``rows_sha256`` of its index row, used, and dropped with the shard's run.

Older datasets (format 1 and 2: one samples table for the whole version) still load, with
every row of the split read here, as before (O(samples) per rank; a warning says how to
rewrite the metadata). Whole-split tools (few-shot pools) use :attr:`Meta.samples`, which reads
every row; the loader never does.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import format as fmt
from ..cache import ContentCache
from ..storage import S3Settings, Storage, open_storage, url_join

log = logging.getLogger(__name__)

#: The columns of a rows file the loader uses (``src``, ``split`` and ``shard`` are not read).
_READ = ["key", "offset", "size", "label", "sha256"]


class ShardNames(Sequence[str]):
    """Shard keys as one arrow string array (no Python object per shard until one is asked for)."""

    def __init__(self, names: Any) -> None:
        self._names = names

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        return str(self._names[int(i)].as_py())

    def __iter__(self) -> Iterator[str]:
        return (str(x) for x in self._names.to_pylist())


@dataclass(frozen=True, eq=False)
class ShardRows:
    """Sample rows (one shard's, or a whole split's) in file order, as flat arrays."""

    offsets: np.ndarray  # (n,) int64 byte offset of the image member's data
    sizes: np.ndarray  # (n,) int64
    labels: np.ndarray  # (n,) int32 single-label (-1: missing)
    keys: Any  # pyarrow string array (n,)
    digests: np.ndarray | None  # (n, 32) uint8 sha256 of each image; None for format 1
    ml_offsets: np.ndarray | None = None  # (n + 1,) CSR into ml_values for multi-label
    ml_values: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def key(self, k: int) -> str:
        return str(self.keys[int(k)].as_py())

    @staticmethod
    def from_table(t: Any) -> ShardRows:
        ml_off = ml_val = None
        if "labels" in t.column_names:
            col = t["labels"].combine_chunks()
            ml_off = col.offsets.to_numpy().astype(np.int64)
            ml_off = ml_off - ml_off[0]
            ml_val = col.flatten().to_numpy().astype(np.int64)
        digests = None
        if "sha256" in t.column_names:  # a zero-copy view of the fixed-size binary column
            col = t["sha256"].combine_chunks()
            digests = np.frombuffer(col.buffers()[1], np.uint8)[col.offset * 32:(col.offset + len(col)) * 32]
            digests = digests.reshape(len(col), 32)
        return ShardRows(offsets=t["offset"].to_numpy().astype(np.int64), sizes=t["size"].to_numpy().astype(np.int64),
                         labels=t["label"].to_numpy().astype(np.int32), keys=t["key"].combine_chunks(),
                         digests=digests, ml_offsets=ml_off, ml_values=ml_val)

    def slice(self, a: int, b: int) -> ShardRows:
        ml_off = None if self.ml_offsets is None else self.ml_offsets[a:b + 1]
        return ShardRows(offsets=self.offsets[a:b], sizes=self.sizes[a:b], labels=self.labels[a:b],
                         keys=self.keys.slice(a, b - a), digests=None if self.digests is None else self.digests[a:b],
                         ml_offsets=ml_off, ml_values=self.ml_values)


@dataclass(frozen=True, eq=False)
class SplitSamples:
    """Every sample row of a split (O(samples)): for whole-split tools, never the loader."""

    rows: ShardRows
    shard_of: np.ndarray  # (T,) int32


@dataclass(eq=False)
class Meta:
    """A split's shard table (O(shards)); sample rows come per shard from :meth:`rows`."""

    shard_names: ShardNames
    shard_start: np.ndarray  # (n_shards + 1,) first id of each shard (cut at ``limit``)
    info: dict[str, Any] = field(default_factory=dict)
    version: str = fmt.LEGACY_VERSION  # the pinned dataset version
    root_url: str = ""  # that version's folder; shard names are relative to it
    shard_samples: np.ndarray | None = None  # (n_shards,) samples of each whole shard (index.parquet)
    shard_bytes: np.ndarray | None = None  # (n_shards,) recorded size; None: shards are not checked
    shard_sha256: np.ndarray | None = None  # (n_shards, 32) uint8 recorded sha256
    rows_bytes: np.ndarray | None = None  # (n_shards,) format 3: size of each shard's rows file
    rows_sha256: np.ndarray | None = None  # (n_shards, 32) uint8 format 3: its sha256
    verify_samples: bool = True  # check each image against its recorded sha256 (bench/verify.py turns it off)
    s3: S3Settings | None = None
    whole: SplitSamples | None = None  # formats 1-2: every row of the split, read at start

    @property
    def num_samples(self) -> int:
        return int(self.shard_start[-1])

    def shard_of_id(self, i: int) -> int:
        return int(np.searchsorted(self.shard_start, i, "right")) - 1

    def shard_sha256_hex(self, s: int) -> str | None:
        return None if self.shard_sha256 is None else bytes(self.shard_sha256[s]).hex()

    def rows(self, s: int, storage: Storage) -> ShardRows:
        """Shard ``s``'s sample rows (file order): its rows file, checked against ``index.parquet``."""
        if self.whole is not None:
            return self.whole.rows.slice(int(self.shard_start[s]), int(self.shard_start[s + 1]))
        assert self.rows_bytes is not None and self.rows_sha256 is not None and self.shard_samples is not None
        name = self.shard_names[s]
        read = _READ + (["labels"] if self.info.get("multi_label") else [])
        t = fmt.read_rows(storage, name, int(self.rows_bytes[s]), bytes(self.rows_sha256[s]).hex(), tuple(read), read)
        rows = ShardRows.from_table(t)
        if len(rows) != self.shard_samples[s] or (len(rows) > 1 and not (np.diff(rows.offsets) > 0).all()):
            raise fmt.DatasetFormatError(
                f"{storage.url_for(fmt.rows_key(name))} does not match its shard: {len(rows)} rows (index.parquet "
                f"says {int(self.shard_samples[s])}), offsets must ascend; {fmt.REWRITE_HINT}")
        return rows

    @functools.cached_property
    def samples(self) -> SplitSamples:
        """Every row of the split (reads every rows file: O(samples)); whole-split tools only."""
        if self.whole is not None:
            return self.whole
        st = open_storage(self.root_url, s3=self.s3)
        counts = np.diff(self.shard_start)
        parts = [self.rows(s, st).slice(0, int(counts[s])) for s in range(len(self.shard_names))]
        return SplitSamples(rows=_concat(parts), shard_of=np.repeat(np.arange(len(parts), dtype=np.int32), counts))

    # Whole-split arrays (O(samples), read on first use): the few-shot pools' view.
    @property
    def labels(self) -> np.ndarray:
        return self.samples.rows.labels

    @property
    def keys(self) -> Any:
        return self.samples.rows.keys

    @property
    def offsets(self) -> np.ndarray:
        return self.samples.rows.offsets

    @property
    def sizes(self) -> np.ndarray:
        return self.samples.rows.sizes

    @property
    def digests(self) -> np.ndarray | None:
        return self.samples.rows.digests

    @property
    def shard_of(self) -> np.ndarray:
        return self.samples.shard_of


def _concat(parts: list[ShardRows]) -> ShardRows:
    import pyarrow as pa

    ml_off = ml_val = None
    if parts and parts[0].ml_offsets is not None:
        vals = [p.ml_values[p.ml_offsets[0]:p.ml_offsets[-1]] for p in parts]  # type: ignore[index]
        lens = np.concatenate([np.diff(p.ml_offsets) for p in parts])  # type: ignore[arg-type]
        ml_off, ml_val = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), np.concatenate(vals)
    digests = None if not parts or parts[0].digests is None else np.concatenate([p.digests for p in parts])
    def cat(xs: list[np.ndarray], dt: type) -> np.ndarray:
        return np.concatenate(xs) if xs else np.zeros(0, dt)

    return ShardRows(offsets=cat([p.offsets for p in parts], np.int64), sizes=cat([p.sizes for p in parts], np.int64),
                     labels=cat([p.labels for p in parts], np.int32),
                     keys=pa.concat_arrays([p.keys for p in parts]) if parts else pa.array([], pa.string()),
                     digests=digests, ml_offsets=ml_off, ml_values=ml_val)


def _unhex(col: Any, where: str) -> np.ndarray:
    """A column of sha256 hex strings as ``(n, 32)`` uint8, without a Python object per row."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    width = np.int64 if col.type == "large_string" else np.int32
    offs = np.frombuffer(col.buffers()[1], width)[col.offset: col.offset + len(col) + 1]
    if col.null_count or not (np.diff(offs) == 64).all():
        raise fmt.DatasetFormatError(f"{where} is damaged: a sha256 that is not 64 hex digits; {fmt.REWRITE_HINT}")
    raw = np.frombuffer(col.buffers()[2], np.uint8)[offs[0]:offs[-1]].reshape(len(col), 64)
    lut = np.full(256, 255, np.uint8)
    lut[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
    lut[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
    v = lut[raw]
    if (v == 255).any():
        raise fmt.DatasetFormatError(f"{where} is damaged: a sha256 with a non-hex digit; {fmt.REWRITE_HINT}")
    return (v[:, 0::2] << 4) | v[:, 1::2]


def load_meta(url: str, split: str, limit: int | None = None, version: str | None = None, *,
              s3: S3Settings | None = None, cache: bool = True) -> Meta:
    """Pin a version (``version``, else the published one) and read the split's shard table.

    Every metadata file is checked against the manifest's size and sha256 and validated
    through :mod:`pipeline.format`, so a damaged file fails here, naming it. ``cache``: read
    the shard table of a remote dataset through the node's cache (one download per node).
    """
    import pyarrow.compute as pc

    res = fmt.resolve(url, version, s3=s3)
    info = res.manifest
    if fmt.format_of(info) < 3:
        index = fmt.read_index(res)
        index = index.filter(pc.equal(index["split"], split))
        if index.num_rows == 0:
            raise ValueError(f"split {split!r} not in {url} (has {sorted(info.get('counts', {}))})")
        return _load_whole(res, index, split, limit)
    node_cache = ContentCache.default() if cache and res.root_url.startswith("s3://") else None
    t = _shard_table(res, split, node_cache)
    counts = t["samples"]
    if len(counts) == 0:
        raise ValueError(f"split {split!r} not in {url} (has {sorted(info.get('counts', {}))})")
    shard_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = len(counts)
    if limit is not None and limit < shard_start[-1]:
        n = int(np.searchsorted(shard_start, limit, side="left"))
        shard_start = np.minimum(shard_start[: n + 1], limit)
    return Meta(shard_names=ShardNames(t["shard"].slice(0, n)), shard_start=shard_start, info=info,
                version=res.version, root_url=res.root_url, shard_samples=counts[:n], shard_bytes=t["bytes"][:n],
                shard_sha256=t["sha256"][:n], rows_bytes=t["rows_bytes"][:n], rows_sha256=t["rows_sha256"][:n],
                s3=s3)


def _shard_table(res: fmt.Resolved, split: str, cache: ContentCache | None) -> dict[str, Any]:
    """The split's rows of index.parquet (checked) as compact arrays, decoded a batch at a time
    into arrays allocated once (the hex digests become ``(n, 32)`` uint8 as they arrive), so the
    peak stays near the file plus the result."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    data = fmt.read_checked(res, fmt.INDEX, cache=cache)
    where = url_join(res.root_url, fmt.INDEX)
    try:
        total = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise fmt.DatasetFormatError(f"{where} is damaged (not a readable parquet file: {exc}); "
                                     f"{fmt.REWRITE_HINT}") from exc
    out: dict[str, Any] = {k: np.zeros(total, np.int64) for k in ("samples", "bytes", "rows_bytes")}
    out |= {k: np.zeros((total, 32), np.uint8) for k in ("sha256", "rows_sha256")}
    names, n = [], 0
    for batch in fmt.iter_parquet(data, where, fmt.INDEX_COLUMNS + fmt.ROWS_COLUMNS):
        b = batch.filter(pc.equal(batch.column("split"), split))
        m = b.num_rows
        if not m:
            continue
        names.append(b.column("shard"))
        for k in ("samples", "bytes", "rows_bytes"):
            out[k][n:n + m] = b.column(k).to_numpy()
        for k in ("sha256", "rows_sha256"):
            out[k][n:n + m] = _unhex(b.column(k), where)
        n += m
    del data
    out = {k: v[:n].copy() if n < total else v for k, v in out.items()}  # a split of a bigger table: own its rows
    out["shard"] = pa.concat_arrays(names) if names else pa.array([], pa.string())
    pa.default_memory_pool().release_unused()  # decoding buffers back to the OS, not kept for the run
    return out


def _load_whole(res: fmt.Resolved, index: Any, split: str, limit: int | None) -> Meta:
    """Formats 1-2: every sample row of the split, read and sorted here (O(samples) per rank)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    hint = fmt.REINDEX_HINT.format(url=res.url) if res.version != fmt.LEGACY_VERSION else fmt.REWRITE_HINT
    log.warning("%s is a format-%d dataset: every rank reads all of its sample rows at start (memory and start-up "
                "grow with the number of samples%s); %s", res.url, fmt.format_of(res.manifest),
                ", and samples are not verified" if res.version == fmt.LEGACY_VERSION else "", hint)
    samples = fmt.read_samples(res)
    samples = samples.filter(pc.equal(samples["split"], split))
    names = index["shard"].combine_chunks()
    shard_idx = pc.index_in(samples["shard"], value_set=names)  # vectorised lookup
    if shard_idx.null_count:
        raise fmt.DatasetFormatError(f"{url_join(res.root_url, fmt.SAMPLES)} names shards missing from "
                                     f"{url_join(res.root_url, fmt.INDEX)}; {fmt.REWRITE_HINT}")
    shard_of = shard_idx.to_numpy(zero_copy_only=False).astype(np.int32)
    order = np.lexsort((samples["offset"].to_numpy(), shard_of))  # canonical: shard, then file order
    samples = samples.take(pa.array(order))
    shard_of = shard_of[order]
    full = index["samples"].to_numpy().astype(np.int64)
    counts = np.bincount(shard_of, minlength=len(names))
    if not np.array_equal(counts, full):
        raise fmt.DatasetFormatError(f"{url_join(res.root_url, fmt.INDEX)} sample counts disagree with "
                                     f"{url_join(res.root_url, fmt.SAMPLES)}; {fmt.REWRITE_HINT}")
    shard_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = len(names)
    if limit is not None and limit < shard_start[-1]:
        n = int(np.searchsorted(shard_start, limit, side="left"))
        shard_start = np.minimum(shard_start[: n + 1], limit)
        samples, shard_of = samples.slice(0, limit), shard_of[:limit]
    return Meta(shard_names=ShardNames(names.slice(0, n)), shard_start=shard_start, info=res.manifest,
                version=res.version, root_url=res.root_url, shard_samples=full[:n],
                shard_bytes=index["bytes"].to_numpy()[:n].astype(np.int64),
                shard_sha256=_unhex(index["sha256"], url_join(res.root_url, fmt.INDEX))[:n], s3=res.s3,
                whole=SplitSamples(rows=ShardRows.from_table(samples), shard_of=shard_of))
