"""The names of a dataset's files on storage, and the rules for names that become keys.

Part of the dataset layout (:mod:`pipeline.format` re-exports everything here; see its
docstring for the layout). A split becomes ``shards/{split}-NNNNNN.tar``,
``samples/{split}-NNNNNN.parquet`` and sample keys, so it is checked before anything is written
(docs/data.md, "Hostile input"). Class names are never paths.
"""

from __future__ import annotations

import posixpath
import re

MANIFEST = "dataset.json"
INDEX = "index.parquet"
SAMPLES = "samples.parquet"  # format 2: every sample row of a version in one file
CLASSES = "classes.json"
REJECTS = "rejects.parquet"
SHARDS_DIR = "shards"
ROWS_DIR = "samples"  # format 3: one rows file per shard
MARKERS_DIR = "markers"
VERSIONS_DIR = "versions"
#: The version name of a format-1 dataset (metadata at the dataset root).
LEGACY_VERSION = "legacy"


def version_root(version: str) -> str:
    """Key prefix of ``version`` under the dataset root ("" for a format-1 dataset)."""
    return "" if version == LEGACY_VERSION else f"{VERSIONS_DIR}/{version}"


def rows_key(shard: str) -> str:
    """The key of a shard's rows file: ``shards/train-000042.tar`` -> ``samples/train-000042.parquet``."""
    return f"{ROWS_DIR}/{posixpath.basename(shard).removesuffix('.tar')}.parquet"


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
