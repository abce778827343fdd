"""JFT-style manifests (``.parquet`` / ``.csv``, local or ``s3://``): the rows a dataset is written from.

An image URI column and a labels column (integer class indices as they are, or class names;
:mod:`pipeline.labels`), an optional ``split`` column. See :func:`scan_manifest` for how bad
rows are named, and :mod:`pipeline.sources` for the :class:`~pipeline.sources.Source` it returns.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import format as fmt
from .labels import label_ids
from .sources import Item, Source, _reject, unlabelled_source
from .storage import open_storage


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
                  multi_label: bool | None = None, unlabelled: bool = False) -> Source:
    """A JFT-style manifest (parquet or csv, local or ``s3://``): an image URI column and a labels column.

    Without a labels column (or with ``unlabelled``: its labels are ignored) the manifest is
    unlabelled: images only, every row with an image path is used.

    Labels (:mod:`pipeline.labels`) are integer class indices as they are (``classes[i] == str(i)``)
    or class names (vocabulary = sorted names). Relative paths are relative to the manifest. An
    optional ``split`` column assigns splits; a split must be a safe name
    (:func:`pipeline.format.check_path_name`). A bad split or label stops the scan with an error
    naming the row (rows count from 1 after the header). Rows naming the same image: exact
    repeats are kept once (``duplicate_row`` rejects), repeats with other labels or split are all
    rejected (``conflicting_duplicate``): which one is right cannot be known.
    """
    table = _read_table(path)
    cols = table.column_names
    for flag, name in (("--path-column", path_column), ("--labels-column", labels_column)):
        if name is not None and name not in cols:
            raise ValueError(f"{path}: has no column {name!r} ({flag}); its columns are {cols}")
    pc = path_column or next((c for c in ("path", "image", "image_path", "url", "file", "filename") if c in cols), None)
    lc = None if unlabelled else labels_column or next(
        (c for c in ("labels", "label", "classes", "class") if c in cols), None)
    if pc is None:
        raise ValueError(f"{path}: need an image path column (and a labels column, unless unlabelled); found "
                         f"{cols} (use --path-column / --labels-column)")
    if lc is None and multi_label:
        raise ValueError(f"{path}: --multi-label needs a labels column, and this manifest is read without labels "
                         f"(columns {cols}{', --unlabelled' if unlabelled else ''})")
    csv = not str(path).endswith(".parquet")

    def where(i: int) -> str:
        return f"row {i + 1}" + (f" (line {i + 2})" if csv else "")

    paths = table.column(pc).to_pylist()
    classes: list[str] = []
    ids: list[list[int] | None] = [None] * len(paths)
    if lc is not None:
        classes, ids = label_ids(table.column(lc).to_pylist(), where)
    splits = table.column("split").to_pylist() if "split" in cols else None
    ml = multi_label if multi_label is not None else any(r is not None and len(r) != 1 for r in ids)
    base = str(path).rsplit("/", 1)[0] if str(path).startswith("s3://") else str(Path(path).parent)
    items: dict[str, tuple[int, Item]] = {}  # image -> (first row, item)
    conflicts: dict[str, list[int]] = {}
    rejects: list[dict[str, Any]] = []
    for i, (p, r) in enumerate(zip(paths, ids, strict=True)):
        split = "train"
        if splits is not None:  # a CSV column of numbers ("2021") is read as ints: still a name
            raw = splits[i]
            split = fmt.check_path_name(str(raw) if type(raw) is int else raw, "split", where(i))
        if p is None or not str(p).strip():
            rejects.append(_reject(f"{path}#{where(i)}", "missing_path", f"{where(i)} has no image path"))
            continue
        src = str(p)
        if "://" not in src and not os.path.isabs(src):
            src = f"{base}/{src}"
        if lc is not None and not r:
            rejects.append(_reject(src, "missing_label", where(i)))
            continue
        if r is not None and not ml and len(r) != 1:
            rejects.append(_reject(src, "multiple_labels", f"{where(i)}: {r}"))
            continue
        key = src if "://" in src else os.path.normpath(src)
        if key not in items:
            items[key] = (i, Item(src, r, split=split))
            continue
        first, it = items[key]
        if (it.labels, it.split) == (r, split):
            rejects.append(_reject(src, "duplicate_row", f"{where(i)} repeats {where(first)}"))
        else:
            conflicts.setdefault(key, [first]).append(i)
    for key, rows in conflicts.items():
        seen = "; ".join(f"{where(i)}: labels {ids[i]} split {'train' if splits is None else splits[i]}" for i in rows)
        src = items.pop(key)[1].src
        rejects += [_reject(src, "conflicting_duplicate", f"{where(i)} of rows that disagree on this image ({seen}); "
                            "fix the manifest") for i in rows]
    kept = [it for _, it in items.values()]
    if lc is None:
        return unlabelled_source(kept, rejects)
    return Source(kept, classes, multi_label=ml, rejects=rejects)
