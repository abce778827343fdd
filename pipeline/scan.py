"""SRC -> :class:`~pipeline.sources.Source`: which of the layouts a source is, read with its reader.

A local folder (:func:`pipeline.sources.scan_folder`), an ``s3://`` prefix
(:func:`pipeline.sources.scan_s3_folder`), the ImageNet-21k release tar
(:mod:`pipeline.synset_tars`) or a manifest (:mod:`pipeline.manifests`); every problem with SRC
is one :class:`~pipeline.sources.WriterError` naming it, never a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import format as fmt
from .labels import LabelError
from .manifests import scan_manifest
from .sources import Source, WriterError, printable, reject_note, scan_folder, scan_s3_folder
from .synset_tars import is_synset_release, scan_synset_tars


def scan_source(src: str | Path, *, path_column: str | None = None, labels_column: str | None = None,
                multi_label: bool | None = None, unlabelled: bool = False) -> Source:
    """Scan SRC (folder, ``s3://`` folder, release tar or manifest); nothing to write is a :class:`WriterError`.

    ``unlabelled``: a folder is a plain tree of images (no class folders), labels are ignored.
    """
    shown = printable(str(src))
    if is_synset_release(str(src)):
        source = scan_synset_tars(str(src), unlabelled=unlabelled)
    elif str(src).startswith("s3://"):
        source = _scan_s3(str(src), path_column=path_column, labels_column=labels_column, multi_label=multi_label,
                          unlabelled=unlabelled)
    else:
        srcp = Path(str(src).removeprefix("file://"))
        if not os.path.lexists(srcp):
            raise WriterError(f"SRC {shown} does not exist: give an image folder SRC/<class>/<image>, a "
                              ".parquet/.csv manifest or the ImageNet-21k release .tar")
        if srcp.is_dir():
            source = scan_folder(srcp, unlabelled=unlabelled)
        elif srcp.suffix in {".parquet", ".csv"}:
            source = _manifest(srcp, shown, path_column=path_column, labels_column=labels_column,
                               multi_label=multi_label, unlabelled=unlabelled)
        else:
            raise WriterError(f"SRC {shown} is a file but not a .parquet/.csv manifest or a .tar release "
                              "(or an image folder)")
    if not source.items:
        raise WriterError(f"SRC {shown} holds no images to write{reject_note(source.rejects)}", code=1)
    return source


def _scan_s3(src: str, **manifest_kw: Any) -> Source:
    """An ``s3://`` manifest object, or an ``s3://`` prefix of ``<class>/<image>`` keys."""
    unlabelled = manifest_kw.get("unlabelled", False)
    if not src.endswith((".parquet", ".csv")):
        return scan_s3_folder(src, unlabelled=unlabelled)
    try:
        return _manifest(src, src, **manifest_kw)
    except FileNotFoundError as exc:
        raise WriterError(f"SRC {src} does not exist: give an s3:// manifest object, prefix or release .tar") from exc


def _manifest(path: str | Path, shown: str, **manifest_kw: Any) -> Source:
    """:func:`scan_manifest` with a bad row or an unreadable file as one WriterError naming it."""
    try:
        return scan_manifest(path, **manifest_kw)
    except (fmt.UnsafeName, LabelError) as exc:  # a bad row: name it, no traceback
        raise WriterError(f"manifest {shown} {exc}") from exc
    except FileNotFoundError:
        raise
    except (ValueError, OSError) as exc:  # pyarrow's parse errors are ValueErrors
        raise WriterError(f"cannot read manifest {shown}: {' '.join(str(exc).split())}") from exc
