"""The ImageNet-21k release layout: one big tar holding one tar per synset (``n01440764.tar``).

:func:`scan_synset_tars` streams through the release tar once and reads only tar headers: the
outer tar's member headers, and inside each synset tar its member headers. For every image it
records ``(offset, size)`` of the image bytes *in the outer file*, so a shard writer later reads
exactly those bytes with one seek (local) or one range GET (S3): nothing is unpacked to disk and
no task has to read through the whole release.

A local release tar is opened seekable (tarfile skips member data by seeking); an ``s3://``
release tar is read as one sequential stream (its bytes pass through once, nothing is stored).

Classes are the synset ids (the synset tar names without ``.tar``), sorted: class index i is
``classes[i]`` in ``classes.json``, the same order a processed folder of the same synsets gets.
Rejects (never a crash): an outer member that is not a ``.tar`` (``not_a_synset_tar``), a synset
tar that cannot be parsed (``unreadable_tar_member``, e.g. truncated or not a tar), a member
that is not an image file (``not_an_image``), a symlink, hardlink or special member, inner or
outer (``not_a_regular_member``: a link is never followed), a synset tar whose name cannot be a
class name (``bad_class_name``); a truncated release tar ends the scan with an
``unreadable_tar_member`` reject for the rest. Folder entries carry no data and are skipped.
Unlabelled (``--unlabelled``): the same images, without labels or classes (a synset tar's name
is then not a class name, so it is not checked as one).
"""

from __future__ import annotations

import os
import tarfile
from typing import IO, Any

from .format import class_name_problem
from .sources import IMAGE_EXTS, Item, Source, WriterError, printable, unlabelled_source
from .storage import open_storage


def is_synset_release(src: str) -> bool:
    """A SRC naming a ``.tar`` file (local or ``s3://``) is read as the release layout."""
    return src.removeprefix("file://").endswith(".tar")


def _open_outer(src: str) -> tuple[IO[bytes], str]:
    """The release tar as a file object and the tarfile mode that fits it (seek or stream)."""
    if src.startswith("s3://"):
        bucket_end = src.index("/", 5)
        return open_storage(src[:bucket_end]).open_range(src[bucket_end + 1:]), "r|"  # type: ignore[return-value]
    path = src.removeprefix("file://")
    if not os.path.isfile(path):
        raise WriterError(f"SRC {printable(path)} does not exist or is not a file: give the ImageNet-21k release "
                          "tar (a tar of <synset>.tar files)")
    return open(path, "rb"), "r:"


def _reject(src: str, reason: str, detail: str) -> dict[str, Any]:
    return {"src": printable(src), "reason": reason, "detail": printable(detail[:500])}


def _kind(m: tarfile.TarInfo) -> str:
    """What a non-regular tar member is; links are not followed (their target may be anywhere)."""
    if m.issym():
        return f"symlink -> {m.linkname} (links are not followed)"
    if m.islnk():
        return f"hardlink -> {m.linkname} (links are not followed)"
    return f"tar member type {m.type!r} (a device, FIFO or other special file)"


def _scan_synset(outer: tarfile.TarFile, member: tarfile.TarInfo, src: str, stream: bool,
                 rejects: list[dict[str, Any]]) -> list[tuple[str, tuple[int, int]]]:
    """(member src, (offset in the outer file, size)) of every image in one synset tar."""
    where = f"{src}#{member.name}"
    found: list[tuple[str, tuple[int, int]]] = []
    try:
        f = outer.extractfile(member)
        if f is None:
            raise tarfile.ReadError("not a regular file")
        with tarfile.open(fileobj=f, mode="r|" if stream else "r:") as inner:
            for m in inner:
                msrc = f"{where}/{m.name}"
                if m.isdir():
                    continue  # a folder entry carries no bytes; its files are members of their own
                if not m.isfile():
                    rejects.append(_reject(msrc, "not_a_regular_member", _kind(m)))
                    continue
                if os.path.splitext(m.name)[1].lower() not in IMAGE_EXTS:
                    rejects.append(_reject(msrc, "not_an_image", os.path.splitext(m.name)[1]))
                    continue
                found.append((msrc, (member.offset_data + m.offset_data, m.size)))
    except (tarfile.TarError, OSError, EOFError) as exc:
        rejects.append(_reject(where, "unreadable_tar_member", f"{type(exc).__name__}: {exc}"))
        return []  # a synset tar we could not read to its end: none of it, not a silent part
    return found


def scan_synset_tars(src: str, *, unlabelled: bool = False) -> Source:
    """Scan the release tar at ``src`` (see module docstring); items sorted by (synset, member)."""
    fileobj, mode = _open_outer(src)
    by_synset: dict[str, list[tuple[str, tuple[int, int]]]] = {}
    rejects: list[dict[str, Any]] = []
    try:
        with tarfile.open(fileobj=fileobj, mode=mode) as outer:
            try:
                for member in outer:
                    name = os.path.basename(member.name)
                    where = f"{src}#{member.name}"
                    if member.isdir():
                        continue
                    if not member.isfile():
                        rejects.append(_reject(where, "not_a_regular_member", _kind(member)))
                        continue
                    if not name.endswith(".tar"):
                        rejects.append(_reject(where, "not_a_synset_tar", "release members must be <synset>.tar"))
                        continue
                    if not unlabelled and (bad := class_name_problem(name[: -len(".tar")])) is not None:
                        rejects.append(_reject(where, "bad_class_name", f"synset name {bad}"))
                        continue
                    found = _scan_synset(outer, member, src, mode == "r|", rejects)
                    by_synset.setdefault(name[: -len(".tar")], []).extend(found)
            except (tarfile.TarError, OSError, EOFError) as exc:  # a truncated or damaged release tar
                rejects.append(_reject(src, "unreadable_tar_member", f"release tar unreadable after "
                                       f"{len(by_synset)} synsets: {type(exc).__name__}: {exc}"))
    except tarfile.TarError as exc:
        raise WriterError(f"SRC {printable(src)} is not a tar file ({exc}): give the ImageNet-21k release tar "
                          "(a tar of <synset>.tar files)") from exc
    finally:
        fileobj.close()
    # Every synset seen is a class, even one whose tar was unreadable: indices stay the same when
    # a re-downloaded release fixes that tar.
    classes = sorted(by_synset)
    items = [Item(msrc, [ci], span=span) for ci, s in enumerate(classes) for msrc, span in sorted(by_synset[s])]
    if unlabelled:
        return unlabelled_source(items, rejects)
    return Source(items, classes, multi_label=False, rejects=rejects)
