"""``Meta``: a pinned dataset version's per-sample index of one split, read by ``load_meta``.

Flat numpy arrays (shard of each sample, byte offsets, sizes, labels, sha256), built once in
the main process and shared copy-on-write with the forked DataLoader workers. Every metadata
file is checked through :mod:`pipeline.format` first, so a damaged one fails here, naming it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import format as fmt
from ..storage import S3Settings, url_join

log = logging.getLogger(__name__)


@dataclass
class Meta:
    """The split's per-sample index as flat numpy arrays (shared copy-on-write with workers)."""

    shard_names: list[str]
    shard_start: np.ndarray  # (n_shards + 1,) first id of each shard
    shard_of: np.ndarray  # (T,) int32
    offsets: np.ndarray  # (T,) int64 byte offset of the image member's data
    sizes: np.ndarray  # (T,) int64
    labels: np.ndarray  # (T,) int32 single-label (-1: missing)
    ml_offsets: np.ndarray | None  # (T + 1,) CSR into ml_values for multi-label
    ml_values: np.ndarray | None
    keys: Any  # pyarrow string array (T,)
    info: dict[str, Any] = field(default_factory=dict)
    version: str = fmt.LEGACY_VERSION  # the pinned dataset version
    root_url: str = ""  # that version's folder; shard names are relative to it
    digests: np.ndarray | None = None  # (T, 32) uint8 sha256 of each image; None for format 1
    shard_samples: np.ndarray | None = None  # (n_shards,) samples of each whole shard (index.parquet)
    shard_bytes: np.ndarray | None = None  # (n_shards,) recorded size
    shard_sha256: list[str] = field(default_factory=list)  # (n_shards,) recorded sha256 hex

    @property
    def num_samples(self) -> int:
        return int(self.shard_start[-1])


def load_meta(url: str, split: str, limit: int | None = None, version: str | None = None, *,
              s3: S3Settings | None = None) -> Meta:
    """Pin a version (``version``, else the published one) and read the split's rows.

    Every metadata file is checked against the manifest's size and sha256 and validated
    through :mod:`pipeline.format`, so a damaged file fails here, naming it.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    res = fmt.resolve(url, version, s3=s3)
    info = res.manifest
    index = fmt.read_index(res)
    index = index.filter(pc.equal(index["split"], split))
    if index.num_rows == 0:
        raise ValueError(f"split {split!r} not in {url} (has {sorted(info.get('counts', {}))})")
    samples = fmt.read_samples(res)
    samples = samples.filter(pc.equal(samples["split"], split))
    names = index["shard"].to_pylist()
    shard_idx = pc.index_in(samples["shard"], value_set=index["shard"].combine_chunks())  # vectorised lookup
    if shard_idx.null_count:
        raise fmt.DatasetFormatError(f"{url_join(res.root_url, fmt.SAMPLES)} names shards missing from "
                                     f"{url_join(res.root_url, fmt.INDEX)}; {fmt.REWRITE_HINT}")
    shard_of = shard_idx.to_numpy(zero_copy_only=False).astype(np.int32)
    order = np.lexsort((samples["offset"].to_numpy(), shard_of))  # canonical: shard, then file order
    samples = samples.take(pa.array(order))
    shard_of = shard_of[order]
    counts = np.bincount(shard_of, minlength=len(names))
    if not np.array_equal(counts, index["samples"].to_numpy()):
        raise fmt.DatasetFormatError(f"{url_join(res.root_url, fmt.INDEX)} sample counts disagree with "
                                     f"{url_join(res.root_url, fmt.SAMPLES)}; {fmt.REWRITE_HINT}")
    shard_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if limit is not None and limit < shard_start[-1]:
        shard_start = np.minimum(shard_start, limit)
        keep = int(np.searchsorted(shard_start, limit, side="left")) + 1
        shard_start = shard_start[:keep]
        names = names[: keep - 1]
        samples = samples.slice(0, limit)
        shard_of = shard_of[:limit]
    ml_off = ml_val = None
    if info.get("multi_label"):
        col = samples["labels"].combine_chunks()
        ml_off = col.offsets.to_numpy().astype(np.int64)
        ml_off = ml_off - ml_off[0]
        ml_val = col.flatten().to_numpy().astype(np.int64)
    n = len(names)
    return Meta(
        shard_names=names, shard_start=shard_start, shard_of=shard_of,
        offsets=samples["offset"].to_numpy().astype(np.int64), sizes=samples["size"].to_numpy().astype(np.int64),
        labels=samples["label"].to_numpy().astype(np.int32), ml_offsets=ml_off, ml_values=ml_val,
        keys=samples["key"].combine_chunks(), info=info, version=res.version, root_url=res.root_url,
        digests=_digests(samples, url), shard_samples=index["samples"].to_numpy()[:n].astype(np.int64),
        shard_bytes=index["bytes"].to_numpy()[:n].astype(np.int64), shard_sha256=index["sha256"].to_pylist()[:n],
    )


def _digests(samples: Any, url: str) -> np.ndarray | None:
    """The ``(T, 32)`` uint8 per-sample sha256 (zero-copy view of the arrow column), if any."""
    if "sha256" not in samples.column_names:  # format 1 has no per-sample hashes
        log.warning("%s is a format-1 dataset without per-sample sha256: samples are not verified; %s",
                    url, fmt.REWRITE_HINT)
        return None
    col = samples["sha256"].combine_chunks()
    digests = np.frombuffer(col.buffers()[1], np.uint8)[col.offset * 32:(col.offset + len(col)) * 32]
    return digests.reshape(len(col), 32)
