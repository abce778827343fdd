"""The one definition of the dataset layout on storage: keys, schemas, manifest, versions.

``pipeline.write_shards`` writes this layout and ``pipeline.loader`` reads it; both go through
the names and functions here, so the layout is defined once. At ``DEST``::

    dataset.json                  the PUBLISHED manifest: a byte copy of one version's manifest,
                                  written last with a single conditional PUT (atomic); readers
                                  start here and pin the version it names
    versions/<version>/           one immutable version of the dataset
        shards/{split}-NNNNNN.tar plain tars, members {key}.jpg + {key}.cls | {key}.json
        markers/{shard}.json      writer resume markers (plan hash, shard sha256, sample rows)
        samples.parquet           one row per sample: split, shard, key, offset, size, label(s),
                                  src, sha256 (of the image bytes)
        index.parquet             one row per shard: split, shard, samples, bytes, sha256
        classes.json, rejects.parquet
        dataset.json              this version's manifest: counts, num_classes, ...,
                                  ``dataset_version`` and ``files`` (bytes + sha256 of
                                  index.parquet, samples.parquet and classes.json)

``<version>`` is a hash of the write plan (source items, labels, seed, options), so re-running
the writer with the same arguments resumes the same version, and any other arguments write a
different one: two writers never write into each other's files. Publishing swaps
``dataset.json`` only if it is still what the writer saw when it started (S3 ``If-Match`` /
``If-None-Match``, locally an ``flock``), so of two racing writers the second fails clearly.

Format 1 datasets (written before versions: ``index.parquet`` etc. at ``DEST`` itself, no
``dataset_version``, no per-sample sha256) still load, as version :data:`LEGACY_VERSION`,
with shard size/sha256 checks but without per-sample checks.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from .storage import S3Settings, Storage, open_storage, url_join

FORMAT = "vitscale-webdataset"
FORMAT_VERSION = 2
MANIFEST = "dataset.json"
INDEX = "index.parquet"
SAMPLES = "samples.parquet"
CLASSES = "classes.json"
REJECTS = "rejects.parquet"
SHARDS_DIR = "shards"
MARKERS_DIR = "markers"
VERSIONS_DIR = "versions"
#: Files whose size and sha256 the manifest records (and readers check).
CHECKED_FILES = (INDEX, SAMPLES, CLASSES)
#: The version name of a format-1 dataset (metadata at the dataset root).
LEGACY_VERSION = "legacy"
#: Manifest fields every format has; format 2 adds ``dataset_version`` and ``files``.
MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str, "version": int, "num_classes": int, "multi_label": bool, "counts": dict, "splits": dict,
}
INDEX_COLUMNS = ("split", "shard", "samples", "bytes", "sha256")
SAMPLE_COLUMNS = ("split", "shard", "key", "offset", "size", "label", "src", "sha256")
REWRITE_HINT = "rewrite it with python -m pipeline.write_shards SRC DEST --overwrite"


class DatasetFormatError(ValueError):
    """A metadata file is missing, unreadable or inconsistent; the message names the file."""


class IntegrityError(RuntimeError):
    """Stored bytes differ from the size/sha256 recorded at write time; names shard (and key)."""


class PublishConflict(RuntimeError):
    """Another writer published a different version while this one was writing."""


class DatasetExists(RuntimeError):
    """DEST already publishes a different version and ``--overwrite`` was not given."""


# ----------------------------------------------------------------------------- names
#: A split becomes storage keys (``shards/{split}-NNNNNN.tar``) and sample keys (``{split}-NNNNNNNNN``,
#: tar members ``{key}.jpg``): letters, digits, ``_`` and ``-`` only, so a key never leaves its folder
#: (no ``/``, ``..``, absolute path) and webdataset, which cuts a member name at its first dot, sees the
#: whole key. At most 64 characters, so every member name fits USTAR's 100-byte name field.
_PATH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
MAX_SPLIT_LEN = 64
MAX_KEY_LEN = MAX_SPLIT_LEN + 12  # "-" and the sample number (9 digits, more past 10**9 samples)
MAX_CLASS_NAME_LEN = 256
PATH_NAME_RULE = "1-{n} of A-Z a-z 0-9 _ -, starting with a letter or digit (no '/', '.', '..', spaces)"


class UnsafeName(ValueError):
    """A split, sample key or class name that could leave DEST or break a shard; names where it came from."""


def path_name_problem(name: object, max_len: int = MAX_SPLIT_LEN) -> str | None:
    """Why ``name`` cannot be part of a storage key or tar member name (None: it can)."""
    if not isinstance(name, str):
        return "is null" if name is None else f"is a {type(name).__name__}, not text"
    if not name:
        return "is empty"
    if len(name) > max_len:
        return f"is {len(name)} characters long (at most {max_len})"
    if not _PATH_NAME.fullmatch(name):
        return "has a character outside the allowed set"
    return None


def check_path_name(name: object, what: str, where: str, max_len: int = MAX_SPLIT_LEN) -> str:
    """``name`` if it is safe as (part of) a key under DEST, else :class:`UnsafeName` naming ``where``."""
    problem = path_name_problem(name, max_len)
    if problem is not None:
        raise UnsafeName(f"{where}: {what} {name!r} {problem}; a {what} must be {PATH_NAME_RULE.format(n=max_len)}")
    return str(name)


def class_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a class name in ``classes.json`` (None: it can).

    Class names are never used as paths (labels are stored as indices), so ``/`` is allowed
    (Freebase ids such as ``/m/0bt9lr`` are common JFT-style labels); empty, ``.``/``..``,
    control characters and very long names are not.
    """
    if not isinstance(name, str):
        return "is null" if name is None else f"is a {type(name).__name__}, not text"
    if name.strip() in ("", ".", ".."):
        return "is empty" if not name.strip() else "is '.' or '..'"
    if len(name) > MAX_CLASS_NAME_LEN:
        return f"is {len(name)} characters long (at most {MAX_CLASS_NAME_LEN})"
    if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in name):
        return "has a control character"
    return None


def version_root(version: str) -> str:
    """Key prefix of ``version`` under the dataset root ("" for a format-1 dataset)."""
    return "" if version == LEGACY_VERSION else f"{VERSIONS_DIR}/{version}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- schemas
def index_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("split", pa.string()), ("shard", pa.string()), ("samples", pa.int64()),
                      ("bytes", pa.int64()), ("sha256", pa.string())])


def samples_schema(multi_label: bool) -> Any:
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


def version_id(plan_hashes: list[str], classes: list[str], options: dict[str, Any]) -> str:
    """The version name: a hash of everything that decides the dataset's content."""
    h = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, "options": options, "classes": classes},
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
    if "dataset_version" in info:
        files = info.get("files")
        if not isinstance(info["dataset_version"], str) or not isinstance(files, dict) or any(
                not isinstance(files.get(f), dict) or not isinstance(files[f].get("sha256"), str)
                or not isinstance(files[f].get("bytes"), int) for f in CHECKED_FILES):
            bad.append(f"dataset_version/files (want a version id and bytes+sha256 of {', '.join(CHECKED_FILES)})")
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


def read_checked(res: Resolved, name: str) -> bytes:
    """A metadata file of ``res``, checked against the manifest's size and sha256."""
    st = res.storage()
    data = _read(st, name, f"dataset version {res.version} is incomplete; {REWRITE_HINT}")
    want = res.manifest.get("files", {}).get(name)
    if want is not None and (len(data) != want["bytes"] or sha256_hex(data) != want["sha256"]):
        raise DatasetFormatError(
            f"{st.url_for(name)} is damaged: {len(data)} bytes with sha256 {sha256_hex(data)[:12]}..., but "
            f"{url_join(res.root_url, MANIFEST)} records {want['bytes']} bytes, sha256 {want['sha256'][:12]}...; "
            f"{REWRITE_HINT}")
    return data


def read_parquet(res: Resolved, name: str, columns: tuple[str, ...]) -> Any:
    """A checked parquet metadata file as a pyarrow Table with at least ``columns``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = read_checked(res, name)
    where = url_join(res.root_url, name)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DatasetFormatError(f"{where} is damaged (not a readable parquet file: {exc}); {REWRITE_HINT}") from exc
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DatasetFormatError(f"{where} is damaged: missing columns {missing} (has {table.column_names}); "
                                 f"{REWRITE_HINT}")
    return table


def read_index(res: Resolved) -> Any:
    return read_parquet(res, INDEX, INDEX_COLUMNS)


def read_samples(res: Resolved) -> Any:
    """samples.parquet; format 1 has no ``sha256`` column (samples are then not verified)."""
    cols = SAMPLE_COLUMNS if res.version != LEGACY_VERSION else SAMPLE_COLUMNS[:-1]
    if res.manifest.get("multi_label"):
        cols = (*cols, "labels")
    return read_parquet(res, res.manifest.get("samples_file", SAMPLES), cols)


def read_classes(res: Resolved) -> list[str]:
    where = url_join(res.root_url, CLASSES)
    try:
        classes = json.loads(read_checked(res, CLASSES))
    except ValueError as exc:
        raise DatasetFormatError(f"{where} is damaged (not JSON: {exc}); {REWRITE_HINT}") from exc
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DatasetFormatError(f"{where} is damaged (want a JSON list of class names); {REWRITE_HINT}")
    return classes


# ----------------------------------------------------------------------------- publishing
@dataclass(frozen=True, kw_only=True)
class Published:
    """What DEST published when a writer started: the version (None: nothing) and a CAS token."""

    version: str | None
    token: str | None  # S3 ETag / local file content hash of dataset.json; None when absent


def published(st: Storage) -> Published:
    """The currently published version of the dataset root ``st`` (format 1 counts)."""
    seen = st.read_versioned(MANIFEST)  # body and token from ONE read: the token is what we looked at
    if seen is None:
        return Published(version=None, token=None)
    data, token = seen
    try:
        version = json.loads(data).get("dataset_version", LEGACY_VERSION)
    except (ValueError, AttributeError):
        version = "damaged"  # a damaged manifest is replaced only with --overwrite
    return Published(version=str(version), token=token)


def publish(st: Storage, manifest: bytes, version: str, seen: Published) -> None:
    """Make ``manifest`` (of ``version``) the published ``dataset.json`` of ``st``, atomically.

    Succeeds only if the published manifest is still ``seen`` (or already names ``version``);
    otherwise raises :class:`PublishConflict` and leaves the other writer's version published.
    """
    if st.put_if(MANIFEST, manifest, token=seen.token) is not None:
        return
    now = published(st)
    if now.version == version:
        return  # a writer with the same plan (or our own retried PUT) published the same version
    raise PublishConflict(
        f"another writer published dataset version {now.version} at {st.url} while this writer was writing "
        f"version {version}; {st.url_for(version_root(version))} is complete but NOT published. Re-run with "
        "--overwrite to publish it (readers pinned to the other version keep reading it)")


# ----------------------------------------------------------------------------- repair (tests)
def reseal(url: str) -> None:
    """Re-record the checksums of the published version after a DELIBERATE in-place edit.

    For tests that simulate data which was bad when written (a corrupt JPEG, a truncated
    member): without this, such edits are caught as tampering (:class:`IntegrityError`).
    """
    import pyarrow as pa

    res = resolve(url)
    edited = Resolved(url=url, version=res.version, manifest={k: v for k, v in res.manifest.items() if k != "files"})
    st = res.storage()
    samples = read_samples(edited).to_pylist()
    shard_bytes = {}
    for r in samples:
        data = shard_bytes.setdefault(r["shard"], st.read_bytes(r["shard"]))
        r["sha256"] = hashlib.sha256(data[r["offset"]: r["offset"] + r["size"]]).digest()
    index = read_index(edited).to_pylist()
    for r in index:
        data = st.read_bytes(r["shard"])
        r["bytes"], r["sha256"] = len(data), sha256_hex(data)
    files = dict(res.manifest.get("files", {}))
    for name, rows, schema in ((SAMPLES, samples, samples_schema(bool(res.manifest.get("multi_label")))),
                               (INDEX, index, index_schema())):
        data = parquet_bytes(rows, pa.schema([f for f in schema if f.name in rows[0]]) if rows else schema)
        st.write_bytes(name, data)
        files[name] = file_entry(data)
    manifest = json.dumps({**res.manifest, "files": files}, indent=2).encode()
    st.write_bytes(MANIFEST, manifest)
    root = open_storage(url)
    if res.version != LEGACY_VERSION:
        root.write_bytes(MANIFEST, manifest)
