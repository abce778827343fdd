"""The sources a dataset is written from: what SRC holds and how one image's bytes are read.

Three layouts (:func:`scan_source` picks by SRC):

* a processed folder ``SRC/<class>/<image>`` (local path, or an ``s3://bucket/prefix`` holding
  ``<class>/<image>`` keys); classes = the sorted sub-folder names;
* the ImageNet-21k release: a tar of per-synset tars (``n01440764.tar`` ...), local or on S3,
  read by streaming (:mod:`pipeline.synset_tars`, never unpacked to disk);
* a JFT-style manifest (``.parquet`` / ``.csv``): an image URI column (local path or
  ``s3://``/``http(s)://``) and a labels column with one or many labels per image.

Class indices are stable: synset ids / class names sorted (``classes.json`` keeps the names,
index i is ``classes[i]``); integer labels in a manifest are used as they are. Everything that
cannot be used is a reject row ``{src, reason, detail}`` (rejects.parquet), never a crash.
"""

from __future__ import annotations

import json
import os
import stat
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .storage import open_storage

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

class WriterError(Exception):
    """A problem with SRC or DEST that stops the writer; ``code`` is the CLI exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def printable(path: str) -> str:
    """``path`` as valid UTF-8 text: bytes that are not UTF-8 become ``\\xNN`` escapes.

    File names are bytes on POSIX; Python hands undecodable ones over as lone surrogates,
    which parquet, JSON-as-UTF-8 and hashing reject. The item keeps the real name (to open
    the file); everything written uses this form.
    """
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")



@dataclass
class Item:
    """One source image: where it lives, its labels (class ids) and its planned split.

    ``span`` is ``(offset, size)`` of the image inside the container file named by ``src``
    before its ``#`` (a member of a synset tar inside the release tar): read by one range read.
    """

    src: str
    labels: list[int] | None
    split: str = "train"
    span: tuple[int, int] | None = None


@dataclass
class Source:
    """A scanned SRC: items, the class vocabulary and whether labels are multi-label."""

    items: list[Item]
    classes: list[str]
    multi_label: bool
    rejects: list[dict[str, Any]] = field(default_factory=list)



def _reject(path: str, reason: str, exc: BaseException | str) -> dict[str, Any]:
    detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"
    return {"src": printable(path), "reason": reason, "detail": printable(detail)}


def _stat_problem(path: str) -> tuple[str, str] | None:
    """Why ``path`` can't be read as an image file or a folder (None: it can)."""
    try:
        st = os.stat(path)  # follows symlinks: a broken link or a loop fails here
    except OSError as exc:
        return "unreadable", f"{type(exc).__name__}: {exc.strerror}"
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return "not_a_regular_file", f"mode {stat.filemode(st.st_mode)}"  # a FIFO would block the reader
    return None


def _walk_class(folder: str, rejects: list[dict[str, Any]], seen: set[tuple[int, int]]) -> list[str]:
    """Image files under ``folder`` (recursive, sorted); everything unreadable becomes a reject."""
    try:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # a symlink cycle, or a second link to a walked folder
            rejects.append(_reject(folder, "duplicate_folder", "already walked (symlink cycle or second link)"))
            return []
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:  # e.g. permission denied: the whole folder is listed as a reject
        rejects.append(_reject(folder, "unreadable_folder", exc))
        return []
    files: list[str] = []
    for e in entries:
        if e.name.startswith("."):
            continue
        problem = _stat_problem(e.path)
        if problem is not None:
            rejects.append(_reject(e.path, *problem))
        elif os.path.isdir(e.path):
            files += _walk_class(e.path, rejects, seen)
        elif os.path.splitext(e.name)[1].lower() not in IMAGE_EXTS:
            rejects.append(_reject(e.path, "not_an_image", os.path.splitext(e.name)[1]))
        else:
            files.append(e.path)
    return files


def scan_folder(root: Path) -> Source:
    """An I21k-style folder: ``root/<class>/<file>``; classes are the sorted sub-folders.

    Every entry the walk cannot use is a reject with its reason, never silently dropped: an
    unreadable class folder (``unreadable_folder``), a broken symlink (``unreadable``), a FIFO
    or device (``not_a_regular_file``), a file outside any class folder. Names need not be
    UTF-8 (see :func:`printable`).
    """
    try:
        with os.scandir(root) as it:
            top = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise WriterError(f"cannot list SRC {printable(str(root))}: {exc.strerror}") from exc
    rejects: list[dict[str, Any]] = []
    class_dirs: list[os.DirEntry[str]] = []
    for e in top:
        problem = _stat_problem(e.path)
        if problem is not None:
            rejects.append(_reject(e.path, problem[0] + ("_folder" if problem[0] == "unreadable" else ""),
                                   problem[1]))
        elif os.path.isdir(e.path):
            class_dirs.append(e)
        else:
            rejects.append(_reject(e.path, "outside_class_folder", "files must be in SRC/<class>/"))
    if not class_dirs:
        raise WriterError(f"SRC {printable(str(root))} has no class sub-folders (expected "
                          f"SRC/<synset>/<image>.JPEG){reject_note(rejects)}")
    items: list[Item] = []
    seen: set[tuple[int, int]] = set()
    for ci, d in enumerate(class_dirs):
        items += [Item(f, [ci]) for f in _walk_class(d.path, rejects, seen)]
    return Source(items, [printable(d.name) for d in class_dirs], multi_label=False, rejects=rejects)


def reject_note(rejects: list[dict[str, Any]]) -> str:
    if not rejects:
        return ""
    reasons = Counter(r["reason"] for r in rejects)
    first = rejects[0]
    return (f"; {len(rejects)} rejected ({', '.join(f'{k}={v}' for k, v in sorted(reasons.items()))}), "
            f"e.g. {first['src']}: {first['reason']} {first['detail']}")


def _parse_label_cell(v: Any) -> list[Any] | None:
    if v is None:
        return None
    if isinstance(v, float) and np.isnan(v):
        return None
    if isinstance(v, list | tuple | np.ndarray):
        return [x for x in v if x is not None and str(x) != ""]
    s = str(v).strip()
    if not s:
        return None
    if s.startswith("["):
        return list(json.loads(s))
    for sep in ("|", ";", ","):
        if sep in s:
            return [x.strip() for x in s.split(sep) if x.strip()]
    return [s]


def _read_table(path: Path | str) -> Any:
    """The manifest as a pyarrow Table: a local file, or an ``s3://`` object read into memory."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    where: Any = path
    if str(path).startswith("s3://"):
        bucket_end = str(path).index("/", 5)
        where = pa.BufferReader(open_storage(str(path)[:bucket_end]).read_bytes(str(path)[bucket_end + 1:]))
    return pq.read_table(where) if str(path).endswith(".parquet") else pcsv.read_csv(where)


def scan_manifest(path: Path | str, *, path_column: str | None = None, labels_column: str | None = None,
                  multi_label: bool | None = None) -> Source:
    """A JFT-style manifest (parquet or csv, local or ``s3://``): an image URI column and a labels column.

    Labels may be lists or scalars, strings (class names; vocabulary = sorted names) or ints
    (class ids; ``num_classes = max + 1``). Relative paths are relative to the manifest.
    An optional ``split`` column assigns splits explicitly.
    """
    table = _read_table(path)
    cols = table.column_names
    pc = path_column or next((c for c in ("path", "image", "image_path", "url", "file", "filename") if c in cols), None)
    lc = labels_column or next((c for c in ("labels", "label", "classes", "class") if c in cols), None)
    if pc is None or lc is None:
        raise ValueError(f"{path}: need an image path column and a labels column; found {cols} "
                         "(use --path-column / --labels-column)")
    paths = table.column(pc).to_pylist()
    raw = [_parse_label_cell(v) for v in table.column(lc).to_pylist()]
    splits = table.column("split").to_pylist() if "split" in cols else None
    flat = [x for r in raw if r for x in r]
    if flat and all(isinstance(x, int | np.integer) or (isinstance(x, str) and x.isdigit()) for x in flat) \
            and not any(isinstance(x, str) for x in flat):
        classes = [str(i) for i in range(max(int(x) for x in flat) + 1)]
        to_id = {str(i): i for i in range(len(classes))}
    else:
        classes = sorted({str(x) for x in flat})
        to_id = {c: i for i, c in enumerate(classes)}
    ml = multi_label if multi_label is not None else any(r is not None and len(r) != 1 for r in raw)
    items, rejects = [], []
    for i, (p, r) in enumerate(zip(paths, raw, strict=True)):
        src = str(p)
        if "://" not in src and not os.path.isabs(src):
            src = f"{str(path).rsplit('/', 1)[0]}/{src}" if str(path).startswith("s3://") else str(Path(path).parent / src)
        if not r:
            rejects.append({"src": src, "reason": "missing_label", "detail": ""})
            continue
        ids = sorted({to_id[str(x)] for x in r})
        if not ml and len(ids) != 1:
            rejects.append({"src": src, "reason": "multiple_labels", "detail": str(r)})
            continue
        items.append(Item(src, ids, split=str(splits[i]) if splits else "train"))
    return Source(items, classes, multi_label=ml, rejects=rejects)



def read_source_bytes(src: str) -> bytes:
    """Bytes of one source image: a local path, ``s3://`` or ``http(s)://`` URL."""
    if src.startswith("s3://"):
        bucket_end = src.index("/", 5)
        return open_storage(src[:bucket_end]).read_bytes(src[bucket_end + 1:])
    if src.startswith(("http://", "https://")):
        with urllib.request.urlopen(src, timeout=60) as r:  # noqa: S310 - user-provided manifest URL
            return r.read()
    path = src.removeprefix("file://")
    # O_NONBLOCK: opening a FIFO without a writer would block before we could check its type.
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # reading a FIFO or a device would block
            raise OSError(f"not a regular file: {printable(path)}")
        return f.read()


def read_item_bytes(item: Item) -> bytes:
    """Bytes of one item: its whole ``src``, or its ``span`` of the container before ``#``."""
    if item.span is None:
        return read_source_bytes(item.src)
    container = item.src.split("#", 1)[0]
    offset, size = item.span
    if container.startswith("s3://"):
        bucket_end = container.index("/", 5)
        with open_storage(container[:bucket_end]).open_range(container[bucket_end + 1:], offset,
                                                             offset + size) as f:
            data = f.read()
    else:
        with open(container.removeprefix("file://"), "rb") as f:
            f.seek(offset)
            data = f.read(size)
    if len(data) != size:
        raise OSError(f"{printable(container)} ends inside the member: {len(data)} of {size} bytes at {offset}")
    return data


def scan_s3_folder(url: str) -> Source:
    """An ``s3://bucket/prefix`` holding ``<class>/<image>`` keys (the folder layout on S3)."""
    st = open_storage(url)
    by_class: dict[str, list[str]] = {}
    rejects: list[dict[str, Any]] = []
    for key in st.list():
        cls, sep, rest = key.partition("/")
        if not sep:
            rejects.append(_reject(st.url_for(key), "outside_class_folder", "keys must be PREFIX/<class>/<image>"))
        elif os.path.splitext(rest)[1].lower() not in IMAGE_EXTS:
            rejects.append(_reject(st.url_for(key), "not_an_image", os.path.splitext(rest)[1]))
        else:
            by_class.setdefault(cls, []).append(st.url_for(key))
    classes = sorted(by_class)
    items = [Item(u, [ci]) for ci, c in enumerate(classes) for u in sorted(by_class[c])]
    return Source(items, classes, multi_label=False, rejects=rejects)
