"""The sources a dataset is written from: what SRC holds and how one image's bytes are read.

Three layouts (:func:`pipeline.scan.scan_source` picks by SRC; manifests are read by
:mod:`pipeline.manifests`):

* a processed folder ``SRC/<class>/<image>`` (local path, or an ``s3://bucket/prefix`` holding
  ``<class>/<image>`` keys); classes = the sorted sub-folder names; or, unlabelled
  (``--unlabelled``), a plain tree of images at any depth whose folders mean nothing;
* the ImageNet-21k release: a tar of per-synset tars (``n01440764.tar`` ...), local or on S3,
  read by streaming (:mod:`pipeline.synset_tars`, never unpacked to disk);
* a JFT-style manifest (``.parquet`` / ``.csv``): an image URI column (local path or
  ``s3://``/``http(s)://``) and a labels column with one or many labels per image (none: the
  manifest is unlabelled).

Class indices are stable: synset ids / class names sorted (``classes.json`` keeps the names,
index i is ``classes[i]``); integer labels in a manifest are class indices as they are
(``classes[i] == str(i)``, :mod:`pipeline.labels`). Every input that is not used is a reject row
``{src, reason, detail}`` (rejects.parquet), never a crash and never silently dropped. Names
that become paths (a manifest's splits) are checked where they are read
(:func:`pipeline.format.check_path_name`): a bad one stops the scan naming its row. A folder
walk never follows a symlink out of SRC or out of its class folder.

An unlabelled source (``Source.labelled`` false) has no classes and items without labels; its
dataset is written with ``num_classes: 0`` and no label members (:mod:`pipeline.shards`).
"""

from __future__ import annotations

import os
import stat
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import format as fmt
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
    """A scanned SRC: items, the class vocabulary and whether labels are multi-label.

    ``labelled=False``: images only (no classes, every item's ``labels`` is None).
    """

    items: list[Item]
    classes: list[str]
    multi_label: bool
    rejects: list[dict[str, Any]] = field(default_factory=list)
    labelled: bool = True


def unlabelled_source(items: list[Item], rejects: list[dict[str, Any]]) -> Source:
    """Images only: ``items`` with their labels dropped, no classes."""
    for it in items:
        it.labels = None
    return Source(items, [], multi_label=False, rejects=rejects, labelled=False)



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


HIDDEN = "names starting with '.' are not read (hidden or temporary files)"


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _link_problem(path: str, src_root: str, class_root: str) -> tuple[str, str] | None:
    """Why the symlink ``path`` must not be followed: it leads out of SRC or out of its class folder.

    Following it would read files that are not part of SRC, or label another class's images
    with this class (``SRC/a/up -> ..`` would put every image of b and c into a).
    """
    target = os.path.realpath(path)
    if not _within(target, src_root):
        return "symlink_outside_src", f"points to {target}, outside SRC {src_root}"
    if not _within(target, class_root):
        return "symlink_outside_class", f"points to {target}, outside its class folder {class_root}"
    return None


def _walk_class(folder: str, rejects: list[dict[str, Any]], seen: set[tuple[int, int]], src_root: str,
                class_root: str) -> list[str]:
    """Image files under ``folder`` (recursive, sorted); everything unused becomes a reject."""
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
        problem = (("hidden", HIDDEN) if e.name.startswith(".") else _stat_problem(e.path)) or \
            (_link_problem(e.path, src_root, class_root) if e.is_symlink() else None)
        if problem is not None:
            rejects.append(_reject(e.path, *problem))
        elif os.path.isdir(e.path):
            files += _walk_class(e.path, rejects, seen, src_root, class_root)
        elif os.path.splitext(e.name)[1].lower() not in IMAGE_EXTS:
            rejects.append(_reject(e.path, "not_an_image", os.path.splitext(e.name)[1]))
        else:
            files.append(e.path)
    return files


def _class_folders(root: Path, rejects: list[dict[str, Any]]) -> list[tuple[os.DirEntry[str], str]]:
    """The class folders of ``root`` with their real paths; every other entry becomes a reject.

    A class folder may be a symlink to a folder inside SRC that is not (and holds no) other
    class folder; one leading out of SRC or into another class is rejected.
    """
    src_root = os.path.realpath(root)
    try:
        with os.scandir(root) as it:
            top = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise WriterError(f"cannot list SRC {printable(str(root))}: {exc.strerror}") from exc
    roots = [os.path.realpath(e.path) for e in top if not e.name.startswith(".") and not e.is_symlink()
             and e.is_dir()]
    out: list[tuple[os.DirEntry[str], str]] = []
    for e in top:
        problem = ("hidden", HIDDEN) if e.name.startswith(".") else _stat_problem(e.path)
        if problem is not None and problem[0] == "unreadable":
            problem = ("unreadable_folder", problem[1])
        real = os.path.realpath(e.path)
        if problem is None and e.is_symlink() and os.path.isdir(e.path):
            if not _within(real, src_root):
                problem = ("symlink_outside_src", f"points to {real}, outside SRC {src_root}")
            elif real == src_root or any(_within(real, r) or _within(r, real) for r in roots):
                problem = ("symlink_outside_class", f"points to {real}: SRC itself, or into (or above) another "
                           "class folder")
            else:
                roots.append(real)
        if problem is None and os.path.isdir(e.path) and (bad := fmt.class_name_problem(printable(e.name))):
            problem = ("bad_class_name", f"class folder name {bad}")
        if problem is not None:
            rejects.append(_reject(e.path, *problem))
        elif os.path.isdir(e.path):
            out.append((e, real))
        else:
            rejects.append(_reject(e.path, "outside_class_folder", "files must be in SRC/<class>/"))
    return out


def scan_folder(root: Path, *, unlabelled: bool = False) -> Source:
    """An I21k-style folder: ``root/<class>/<file>``; classes are the sorted sub-folders.

    ``unlabelled``: ``root`` is a plain tree of images at any depth (its folders are not
    classes), walked by the same rules with SRC as the one folder symlinks must stay in.

    Every entry the walk cannot use is a reject with its reason, never silently dropped: an
    unreadable class folder (``unreadable_folder``), a broken symlink (``unreadable``), a FIFO
    or device (``not_a_regular_file``), a file outside any class folder, a hidden entry
    (``hidden``: ``.DS_Store``, ``..jpg``), a symlink leading out of SRC (``symlink_outside_src``)
    or out of its class folder (``symlink_outside_class``). Names need not be UTF-8 (see
    :func:`printable`).
    """
    rejects: list[dict[str, Any]] = []
    items: list[Item] = []
    seen: set[tuple[int, int]] = set()
    src_root = os.path.realpath(root)
    if unlabelled:
        try:  # the walk would turn an unlistable SRC into a reject; it is the whole input
            with os.scandir(root):
                pass
        except OSError as exc:
            raise WriterError(f"cannot list SRC {printable(str(root))}: {exc.strerror}") from exc
        files = _walk_class(str(root), rejects, seen, src_root, src_root)
        return unlabelled_source([Item(f, None) for f in files], rejects)
    class_dirs = _class_folders(root, rejects)
    if not class_dirs:
        raise WriterError(f"SRC {printable(str(root))} has no class sub-folders (expected "
                          f"SRC/<synset>/<image>.JPEG; a plain tree of images without classes: pass "
                          f"--unlabelled){reject_note(rejects)}")
    for ci, (d, real) in enumerate(class_dirs):
        items += [Item(f, [ci]) for f in _walk_class(d.path, rejects, seen, src_root, real)]
    return Source(items, [printable(d.name) for d, _ in class_dirs], multi_label=False, rejects=rejects)


def reject_note(rejects: list[dict[str, Any]]) -> str:
    if not rejects:
        return ""
    reasons = Counter(r["reason"] for r in rejects)
    first = rejects[0]
    return (f"; {len(rejects)} rejected ({', '.join(f'{k}={v}' for k, v in sorted(reasons.items()))}), "
            f"e.g. {first['src']}: {first['reason']} {first['detail']}")


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


def scan_s3_folder(url: str, *, unlabelled: bool = False) -> Source:
    """An ``s3://bucket/prefix`` holding ``<class>/<image>`` keys (the folder layout on S3);
    ``unlabelled``: image keys at any depth, no classes."""
    st = open_storage(url)
    by_class: dict[str, list[str]] = {}
    rejects: list[dict[str, Any]] = []
    for key in st.list():
        cls, sep, rest = key.partition("/")
        if unlabelled:  # one bucket of images whatever the key's folders; the checks below still apply
            cls, sep, rest = "", "/", key
        if not sep:
            rejects.append(_reject(st.url_for(key), "outside_class_folder", "keys must be PREFIX/<class>/<image>"))
        elif any(part.startswith(".") for part in key.split("/")):
            rejects.append(_reject(st.url_for(key), "hidden", HIDDEN))
        elif not unlabelled and (bad := fmt.class_name_problem(cls)) is not None:
            rejects.append(_reject(st.url_for(key), "bad_class_name", f"class {cls!r} {bad}"))
        elif os.path.splitext(rest)[1].lower() not in IMAGE_EXTS:
            rejects.append(_reject(st.url_for(key), "not_an_image", os.path.splitext(rest)[1]))
        else:
            by_class.setdefault(cls, []).append(st.url_for(key))
    classes = sorted(by_class)
    items = [Item(u, [ci]) for ci, c in enumerate(classes) for u in sorted(by_class[c])]
    if unlabelled:
        return unlabelled_source(items, rejects)
    return Source(items, classes, multi_label=False, rejects=rejects)
