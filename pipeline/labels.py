"""Labels of a JFT-style manifest: from table cells to class indices, checked row by row.

The kind is decided once for the whole labels column:

* **integer labels**: an integer column (or list of integers), integral floats (pandas writes
  an integer column with gaps as float), or text whose every label is a decimal number (``3``,
  ``3|17``, ``[3, 17]``). They are class indices as they are: ``classes.json`` is
  ``["0", "1", ..., "N-1"]`` with N = the largest label + 1, so ``classes[i] == str(i)`` and the
  image labelled 2 is class index 2. A negative label, or one that would make more classes than
  :func:`int_label_limit` allows for the number of rows, is an error naming the row, raised
  before anything the size of the label is allocated.
* **class names**: anything else. The vocabulary is the sorted set of names; index i is
  ``classes[i]``. A name that cannot be a class name (empty, control characters, too long:
  :func:`pipeline.format.class_name_problem`) is an error naming the row.

Cells may be a list (a list column, or JSON text ``[...]``) or a scalar, where text holding
``|``, ``;`` or ``,`` is split into several labels. Empty cells are missing labels (``None``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from . import format as fmt

#: Integer labels make ``max + 1`` classes; past these bounds they are ids, not indices.
MIN_INT_LIMIT = 100_000  # a small manifest may still use a large label space (JFT: ~30k classes)
MAX_INT_CLASSES = 10_000_000
_DECIMAL = re.compile(r"[+-]?[0-9]+")


class LabelError(ValueError):
    """A label that cannot be used; the message names the manifest row and the fix."""


def int_label_limit(rows: int) -> int:
    """The number of classes integer labels may make for a manifest of ``rows`` rows."""
    return min(MAX_INT_CLASSES, max(MIN_INT_LIMIT, 10 * rows))


def _token(x: Any) -> int | str:
    """One label: a Python int for integer-valued input, else its text."""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating) and math.isfinite(x) and float(x).is_integer():
        return int(x)
    return str(x).strip()


def parse_cell(v: Any, where: str) -> list[int | str] | None:
    """The labels of one cell (None when it has none); ``where`` names the row in errors."""
    if v is None or (isinstance(v, float | np.floating) and math.isnan(v)):
        return None
    if isinstance(v, list | tuple | np.ndarray):
        out = [_token(x) for x in v if x is not None and str(x).strip() != ""]
        return out or None
    if not isinstance(v, str):
        return [_token(v)]
    s = v.strip()
    if not s:
        return None
    if s.startswith("["):
        try:
            parsed = json.loads(s)
        except ValueError as exc:
            raise LabelError(f"{where}: labels {s[:80]!r} look like a JSON list but do not parse ({exc})") from exc
        return parse_cell(parsed if isinstance(parsed, list) else [parsed], where)
    for sep in ("|", ";", ","):
        if sep in s:
            return [x.strip() for x in s.split(sep) if x.strip()] or None
    return [s]


def label_ids(cells: list[Any], where: Callable[[int], str]) -> tuple[list[str], list[list[int] | None]]:
    """``(classes, ids)``: the class vocabulary and each row's sorted class indices (None: no label).

    ``where(i)`` names row ``i`` in errors (:class:`LabelError`).
    """
    parsed = [parse_cell(v, where(i)) for i, v in enumerate(cells)]
    tokens = [x for r in parsed if r for x in r]
    if tokens and all(isinstance(x, int) or _DECIMAL.fullmatch(x) for x in tokens):
        return _int_ids(parsed, where)
    for i, r in enumerate(parsed):
        for x in r or ():
            problem = fmt.class_name_problem(str(x))
            if problem is not None:
                raise LabelError(f"{where(i)}: class name {str(x)[:80]!r} {problem}")
    classes = sorted({str(x) for x in tokens})
    to_id = {c: i for i, c in enumerate(classes)}
    return classes, [sorted({to_id[str(x)] for x in r}) if r else None for r in parsed]


def _int_ids(parsed: list[list[int | str] | None], where: Callable[[int], str]) -> tuple[list[str],
                                                                                        list[list[int] | None]]:
    limit = int_label_limit(len(parsed))
    ids: list[list[int] | None] = []
    top = -1
    for i, r in enumerate(parsed):
        if not r:
            ids.append(None)
            continue
        row = sorted({int(x) for x in r})
        if row[0] < 0:
            raise LabelError(f"{where(i)}: label {row[0]} is negative; integer labels are class indices "
                             "0..N-1 (drop the row, or give class names as text that is not a number)")
        if row[-1] >= limit:
            raise LabelError(
                f"{where(i)}: label {row[-1]} is too large: integer labels are class indices, so it would make "
                f"{row[-1] + 1:,} classes for {len(parsed):,} rows (at most {limit:,}); if these are ids rather "
                f"than indices, give class names as text that is not a number (e.g. 'c{row[-1]}')")
        top = max(top, row[-1])
        ids.append(row)
    return [str(i) for i in range(top + 1)], ids
