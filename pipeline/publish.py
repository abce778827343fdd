"""Publishing a dataset version: one compare-and-swap of the root ``dataset.json``.

Part of the dataset layout (:mod:`pipeline.format` re-exports it). A writer notes what DEST
published when it started (:func:`published`) and swaps in its own manifest only if that is
still there (:func:`publish`), so of two racing writers the second fails clearly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .keys import LEGACY_VERSION, MANIFEST, version_root
from .storage import Storage


class PublishConflict(RuntimeError):
    """Another writer published a different version while this one was writing."""


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
