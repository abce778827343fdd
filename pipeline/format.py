"""The one definition of the dataset layout on storage: keys, schemas, manifest, versions.

``pipeline.write_shards`` writes this layout and ``pipeline.loader`` reads it; both go through
the names and functions here, so the layout is defined once. At ``DEST``::

    dataset.json                  the PUBLISHED manifest: a byte copy of one version's manifest,
                                  written last with a single conditional PUT (atomic); readers
                                  start here and pin the version it names
    versions/<version>/           one immutable version of the dataset
        shards/{split}-NNNNNN.tar plain tars, members {key}.jpg + {key}.cls | {key}.json
        samples/{split}-NNNNNN.parquet   the shard's sample rows, in file order: split, shard,
                                  key, offset, size, label(s), src, sha256 (of the image bytes)
        markers/{shard}.json      writer resume markers (plan hash, the shard's index row)
        index.parquet             one row per shard: split, shard, samples, bytes, sha256 (of
                                  the tar), rows_bytes, rows_sha256 (of its samples/ file)
        classes.json, rejects.parquet
        dataset.json              this version's manifest: counts, num_classes, ...,
                                  ``dataset_version`` and ``files`` (bytes + sha256 of
                                  index.parquet, classes.json and rejects.parquet)

Every byte a reader uses chains to the manifest: ``dataset.json`` -> ``index.parquet`` (sha256
in ``files``) -> a shard's ``samples/`` file (``rows_sha256``) -> each image (``sha256`` row) and
the whole tar (``sha256``). A reader needs ``index.parquet`` (O(shards)) to plan an epoch and a
shard's rows file only when it opens that shard, so start-up cost does not grow with samples.

``<version>`` is a hash of the write plan (source items, labels, seed, options), so re-running
the writer with the same arguments resumes the same version, and any other arguments write a
different one: two writers never write into each other's files. Publishing swaps
``dataset.json`` only if it is still what the writer saw when it started (S3 ``If-Match`` /
``If-None-Match``, locally an ``flock``), so of two racing writers the second fails clearly.

Older formats still load, reading every sample row at start (O(samples) per rank; the loader
logs it): format 2 (one ``samples.parquet`` for the whole version; ``python -m pipeline.reindex
DEST`` rewrites its metadata as format 3, the shards stay) and format 1 (written before
versions: metadata at ``DEST`` itself, no ``dataset_version``, no per-sample sha256), as
version :data:`LEGACY_VERSION`, with shard size/sha256 checks but without per-sample checks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .cache import ContentCache
from .keys import (  # noqa: F401 - part of the layout, re-exported
    CLASSES,
    INDEX,
    LEGACY_VERSION,
    MANIFEST,
    MARKERS_DIR,
    MAX_CLASS_NAME_LEN,
    MAX_KEY_LEN,
    MAX_SPLIT_LEN,
    PATH_NAME_RULE,
    REJECTS,
    ROWS_DIR,
    SAMPLES,
    SHARDS_DIR,
    VERSIONS_DIR,
    UnsafeName,
    check_path_name,
    class_name_problem,
    path_name_problem,
    rows_key,
    version_root,
)
from .publish import PublishConflict, Published, publish, published  # noqa: F401 - re-exported
from .schemas import (  # noqa: F401 - part of the layout, re-exported
    file_entry,
    index_schema,
    parquet_bytes,
    rejects_schema,
    samples_schema,
    sha256_hex,
)
from .storage import S3Settings, Storage, open_storage, url_join

FORMAT = "vitscale-webdataset"
FORMAT_VERSION = 3
#: What decides a shard's bytes and its sample rows; part of every version id and shard plan
#: hash. Format 3 changed only where the rows are stored, so it keeps format 2's value: a format-2
#: write resumes as format 3, and ``pipeline.reindex`` upgrades a version in place under its id.
CONTENT_VERSION = 2
#: Files whose size and sha256 the manifest records (and readers check), by format.
CHECKED_FILES = {2: (INDEX, SAMPLES, CLASSES), 3: (INDEX, CLASSES)}
#: Manifest fields every format has; format 2 adds ``dataset_version`` and ``files``.
MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str, "version": int, "num_classes": int, "multi_label": bool, "counts": dict, "splits": dict,
}
INDEX_COLUMNS = ("split", "shard", "samples", "bytes", "sha256")
#: Format 3's index columns naming each shard's rows file (``samples/``) by size and sha256.
ROWS_COLUMNS = ("rows_bytes", "rows_sha256")
SAMPLE_COLUMNS = ("split", "shard", "key", "offset", "size", "label", "src", "sha256")
REWRITE_HINT = "rewrite it with python -m pipeline.write_shards SRC DEST --overwrite"
REINDEX_HINT = "python -m pipeline.reindex {url} rewrites its metadata as format 3 (the shards stay)"


class DatasetFormatError(ValueError):
    """A metadata file is missing, unreadable or inconsistent; the message names the file."""


class IntegrityError(RuntimeError):
    """Stored bytes differ from the size/sha256 recorded at write time; names shard (and key)."""


class DatasetExists(RuntimeError):
    """DEST already publishes a different version and ``--overwrite`` was not given."""


def format_of(manifest: dict[str, Any]) -> int:
    """The layout a manifest describes: 1 (no versions), 2 (one samples.parquet) or 3 (rows per shard)."""
    return int(manifest["version"]) if "dataset_version" in manifest else 1


def is_labelled(manifest: dict[str, Any]) -> bool:
    """False for a dataset of images only (written with ``--unlabelled``, or from a manifest without
    labels): ``num_classes`` 0, every row's label -1, no label members in its tars."""
    return bool(manifest.get("labelled", True)) and int(manifest.get("num_classes", 0)) > 0


def version_id(plan_hashes: list[str], classes: list[str], options: dict[str, Any]) -> str:
    """The version name: a hash of everything that decides the dataset's content."""
    h = hashlib.sha256(json.dumps({"format": CONTENT_VERSION, "options": options, "classes": classes},
                                  sort_keys=True).encode())
    for p in plan_hashes:
        h.update(p.encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- reading
@dataclass(frozen=True, kw_only=True)
class Resolved:
    """One pinned version of a dataset: where its files are and its manifest."""

    url: str  # the dataset root (what users pass as DEST / --data)
    version: str  # a version id, or LEGACY_VERSION
    manifest: dict[str, Any]
    s3: S3Settings | None = None  # timeouts for reading the metadata (DataConfig's)

    @property
    def root_url(self) -> str:
        """URL of the version's own folder (shard keys in the metadata are relative to it)."""
        return url_join(self.url, version_root(self.version))

    def storage(self) -> Storage:
        return open_storage(self.root_url, s3=self.s3)


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """Validate a ``dataset.json`` (published or per-version); errors name ``where``."""
    try:
        info = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{where} is damaged (not JSON: {exc}); {REWRITE_HINT}") from exc
    if not isinstance(info, dict):
        raise DatasetFormatError(f"{where} is damaged (a JSON {type(info).__name__}, not an object); {REWRITE_HINT}")
    bad = [f"{k} (want {t.__name__ if isinstance(t, type) else t})" for k, t in MANIFEST_FIELDS.items()
           if not isinstance(info.get(k), t)]
    if info.get("format", FORMAT) != FORMAT:
        bad.append(f"format {info.get('format')!r} (want {FORMAT!r})")
    if "dataset_version" in info and isinstance(info.get("version"), int):
        if info["version"] > FORMAT_VERSION:
            raise DatasetFormatError(f"{where} is format {info['version']}, newer than this reader's "
                                     f"{FORMAT_VERSION}: update vitscale to read it")
        need = CHECKED_FILES[max(2, info["version"])]
        files = info.get("files")
        if not isinstance(info["dataset_version"], str) or not isinstance(files, dict) or any(
                not isinstance(files.get(f), dict) or not isinstance(files[f].get("sha256"), str)
                or not isinstance(files[f].get("bytes"), int) for f in need):
            bad.append(f"dataset_version/files (want a version id and bytes+sha256 of {', '.join(need)})")
    if bad:
        raise DatasetFormatError(f"{where} is damaged: missing or wrong fields {', '.join(bad)}; {REWRITE_HINT}")
    return info


def _read(st: Storage, key: str, what: str) -> bytes:
    try:
        return st.read_bytes(key)
    except FileNotFoundError as exc:
        raise DatasetFormatError(f"{st.url_for(key)} not found: {what}") from exc


def resolve(url: str, version: str | None = None, *, s3: S3Settings | None = None) -> Resolved:
    """Pin a version of the dataset at ``url``: ``version``, else the published one.

    A dataset without a published manifest but with a root ``index.parquet`` is format 1
    (:data:`LEGACY_VERSION`).
    """
    st = open_storage(url, s3=s3)
    if version is None:
        if not st.exists(MANIFEST):
            raise DatasetFormatError(
                f"{st.url_for(MANIFEST)} not found: not a dataset, or its writer has not finished publishing "
                "(run python -m pipeline.write_shards SRC DEST)")
        info = parse_manifest(_read(st, MANIFEST, "no published manifest"), st.url_for(MANIFEST))
        version = info.get("dataset_version", LEGACY_VERSION)
        if version == LEGACY_VERSION and not st.exists(INDEX):
            raise DatasetFormatError(f"{st.url_for(INDEX)} not found: a format-1 dataset whose writer has not "
                                     f"finished; {REWRITE_HINT}")
        return Resolved(url=url, version=str(version), manifest=info, s3=s3)
    key = url_join(version_root(version), MANIFEST)
    if version == LEGACY_VERSION and st.exists(key):
        info = parse_manifest(st.read_bytes(key), st.url_for(key))
        if "dataset_version" in info:
            raise DatasetFormatError(
                f"the pinned format-1 dataset at {url} was replaced by version {info['dataset_version']}; start a "
                "fresh run on the published version")
        return Resolved(url=url, version=version, manifest=info, s3=s3)
    if not st.exists(key):
        current = "none"
        if st.exists(MANIFEST):
            current = json.loads(st.read_bytes(MANIFEST)).get("dataset_version", LEGACY_VERSION)
        raise DatasetFormatError(
            f"{st.url_for(key)} not found: the pinned dataset version {version} of {url} was deleted (the published "
            f"version is now {current}); restore it, or start a fresh run on the published version")
    return Resolved(url=url, version=version, manifest=parse_manifest(st.read_bytes(key), st.url_for(key)), s3=s3)


def check_bytes(data: bytes, want_bytes: int, want_sha256: str, where: str, recorded_in: str) -> None:
    """Raise :class:`DatasetFormatError` naming ``where`` unless ``data`` has the recorded size and sha256."""
    got = sha256_hex(data)
    if len(data) != want_bytes or got != want_sha256:
        raise DatasetFormatError(
            f"{where} is damaged: {len(data)} bytes with sha256 {got[:12]}..., but {recorded_in} records "
            f"{want_bytes} bytes, sha256 {want_sha256[:12]}...; {REWRITE_HINT}")


def read_checked(res: Resolved, name: str, *, cache: ContentCache | None = None) -> bytes:
    """A metadata file of ``res``, checked against the manifest's size and sha256.

    ``cache``: the node's :class:`~pipeline.cache.ContentCache` (one download per node).
    """
    st = res.storage()
    want = res.manifest.get("files", {}).get(name)

    def download() -> bytes:
        data = _read(st, name, f"dataset version {res.version} is incomplete; {REWRITE_HINT}")
        if want is not None:
            check_bytes(data, want["bytes"], want["sha256"], st.url_for(name), url_join(res.root_url, MANIFEST))
        return data

    if cache is None or want is None:
        return download()
    return cache.fetch(want["sha256"], download)


def parse_parquet(data: bytes, where: str, columns: tuple[str, ...], read: list[str] | None = None) -> Any:
    """Checked parquet bytes as a pyarrow Table with at least ``columns`` (only ``read``, if given)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(pa.BufferReader(data))
        missing = [c for c in columns if c not in f.schema_arrow.names]
        table = None if missing else f.read(columns=read)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetFormatError(f"{where} is damaged (not a readable parquet file: {exc}); {REWRITE_HINT}") from exc
    if missing:
        raise DatasetFormatError(f"{where} is damaged: missing columns {missing} (has {f.schema_arrow.names}); "
                                 f"{REWRITE_HINT}")
    return table


def iter_parquet(data: bytes, where: str, columns: tuple[str, ...], rows: int = 1 << 16) -> Iterator[Any]:
    """Checked parquet bytes as record batches of ``columns`` (at most ``rows`` rows each): decoded a
    batch at a time, so a large table never exists twice in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(pa.BufferReader(data))
        missing = [c for c in columns if c not in f.schema_arrow.names]
        if missing:
            raise DatasetFormatError(f"{where} is damaged: missing columns {missing} (has {f.schema_arrow.names}); "
                                     f"{REWRITE_HINT}")
        yield from f.iter_batches(batch_size=rows, columns=list(columns), use_threads=False)
    except (pa.ArrowException, OSError, ValueError) as exc:
        if isinstance(exc, DatasetFormatError):
            raise
        raise DatasetFormatError(f"{where} is damaged (not a readable parquet file: {exc}); {REWRITE_HINT}") from exc


def read_parquet(res: Resolved, name: str, columns: tuple[str, ...], *, cache: ContentCache | None = None) -> Any:
    """A checked parquet metadata file as a pyarrow Table with at least ``columns``."""
    return parse_parquet(read_checked(res, name, cache=cache), url_join(res.root_url, name), columns)


def read_index(res: Resolved, *, cache: ContentCache | None = None) -> Any:
    """index.parquet: one row per shard (format 3 adds the rows file's ``rows_bytes``, ``rows_sha256``)."""
    cols = INDEX_COLUMNS + (ROWS_COLUMNS if format_of(res.manifest) >= 3 else ())
    return read_parquet(res, INDEX, cols, cache=cache)


def sample_columns(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The sample-row columns a dataset has (format 1: no ``sha256``; multi-label: ``labels``)."""
    cols = SAMPLE_COLUMNS if format_of(manifest) >= 2 else SAMPLE_COLUMNS[:-1]
    return (*cols, "labels") if manifest.get("multi_label") else cols


def read_rows(st: Storage, shard: str, nbytes: int, sha256: str, columns: tuple[str, ...],
              read: list[str] | None = None) -> Any:
    """The rows file of ``shard`` (format 3), checked against its ``index.parquet`` size and sha256."""
    key = rows_key(shard)
    data = _read(st, key, f"the rows of shard {shard} are missing; {REWRITE_HINT}")
    check_bytes(data, nbytes, sha256, st.url_for(key), f"{st.url_for(INDEX)} (shard {shard})")
    return parse_parquet(data, st.url_for(key), columns, read)


def read_samples(res: Resolved, *, check: bool = True) -> Any:
    """Every sample row of ``res`` as one Table, in index order (shard, then file order).

    O(samples): for tools and tests on whole datasets (audits, few-shot pools); the loader reads
    one shard's rows at a time. Format 1 has no ``sha256`` column. ``check=False`` skips the
    checksums (:func:`reseal`).
    """
    import pyarrow as pa

    cols = sample_columns(res.manifest)
    if format_of(res.manifest) < 3:
        return read_parquet(res, res.manifest.get("samples_file", SAMPLES), cols)
    index = read_index(res).to_pylist()
    st = res.storage()
    parts = []
    for r in index:
        if check:
            parts.append(read_rows(st, r["shard"], r["rows_bytes"], r["rows_sha256"], cols))
        else:
            key = rows_key(r["shard"])
            parts.append(parse_parquet(_read(st, key, "a rows file is missing"), st.url_for(key), cols))
    return pa.concat_tables(parts) if parts else samples_schema(bool(res.manifest.get("multi_label"))).empty_table()


def read_classes(res: Resolved, *, cache: ContentCache | None = None) -> list[str]:
    where = url_join(res.root_url, CLASSES)
    try:
        classes = json.loads(read_checked(res, CLASSES, cache=cache))
    except ValueError as exc:
        raise DatasetFormatError(f"{where} is damaged (not JSON: {exc}); {REWRITE_HINT}") from exc
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DatasetFormatError(f"{where} is damaged (want a JSON list of class names); {REWRITE_HINT}")
    return classes


# ----------------------------------------------------------------------------- repair (tests)
def reseal(url: str, samples: list[dict[str, Any]] | None = None) -> None:
    """Re-record the checksums of the published version after a DELIBERATE in-place edit.

    For tests that simulate data which was bad when written (a corrupt JPEG, a truncated
    member, a wrong label): without this, such edits are caught as tampering
    (:class:`IntegrityError`). ``samples``: edited sample rows (:func:`read_samples`' form) to
    record instead of the stored ones. Reads whole shards: small test datasets only.
    """
    import pyarrow as pa

    res = resolve(url)
    edited = Resolved(url=url, version=res.version, manifest={k: v for k, v in res.manifest.items() if k != "files"})
    st = res.storage()
    multi = bool(res.manifest.get("multi_label"))
    rows = samples if samples is not None else read_samples(edited, check=False).to_pylist()
    shard_bytes: dict[str, bytes] = {}
    for r in rows:
        data = shard_bytes.setdefault(r["shard"], st.read_bytes(r["shard"]))
        r["sha256"] = hashlib.sha256(data[r["offset"]: r["offset"] + r["size"]]).digest()
    index = read_index(edited).to_pylist()
    fmt3 = format_of(res.manifest) >= 3
    for r in index:
        data = st.read_bytes(r["shard"])
        r["bytes"], r["sha256"] = len(data), sha256_hex(data)
        if fmt3:
            part = parquet_bytes([x for x in rows if x["shard"] == r["shard"]], samples_schema(multi))
            st.write_bytes(rows_key(r["shard"]), part)
            r["rows_bytes"], r["rows_sha256"] = len(part), sha256_hex(part)
    files = dict(res.manifest.get("files", {}))
    rewrite = [(INDEX, index, index_schema(fmt3))]
    if not fmt3:
        rewrite.insert(0, (res.manifest.get("samples_file", SAMPLES), rows, samples_schema(multi)))
    for name, table, schema in rewrite:
        data = parquet_bytes(table, pa.schema([f for f in schema if f.name in table[0]]) if table else schema)
        st.write_bytes(name, data)
        files[name] = file_entry(data)
    manifest = json.dumps({**res.manifest, "files": files}, indent=2).encode()
    st.write_bytes(MANIFEST, manifest)
    root = open_storage(url)
    if res.version != LEGACY_VERSION:
        root.write_bytes(MANIFEST, manifest)
