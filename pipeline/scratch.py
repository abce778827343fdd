"""The writer's temporary files: where they live, and removing those a killed writer left behind.

Two kinds, both named after the process that writes them:

* in a local DEST, :class:`~pipeline.storage.LocalStorage` writes every file as
  ``.{name}.tmp{pid}`` (or ``.tmp{pid}.{thread}``) next to it and renames it into place;
* a shard is built as a local tar before its upload, at :func:`shard_tar_path`
  (``$TMPDIR/vitscale-shards-{euid}/{pid}-{thread}-{shard}``) and removed after the upload.

A writer killed mid-write (``kill -9``, the OOM killer, a lost node) cannot remove its own, so
the next writer does: :func:`sweep_dest` when planning (both CLIs), :func:`shard_tar_path`
before every shard on every node. A file is abandoned when no running process on this host
has its pid (a zombie counts as gone). Limit: on a DEST folder shared by several hosts, a
second run of the same plan started on another host while the first still writes may remove
the first run's in-flight file; that run then fails on its rename and a re-run resumes it.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import threading
from pathlib import Path

_DEST_TMP = re.compile(r"\..+\.tmp(\d+)(?:\.\d+)?")
_SCRATCH = re.compile(r"(\d+)-\d+-.+")


def pid_running(pid: int) -> bool:
    """Whether a live (not zombie) process ``pid`` exists on this host."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"  # field 3: state; the name may hold ")"
    except (OSError, IndexError):
        return True


def _remove_if_abandoned(path: str, pid: int, removed: list[str]) -> None:
    if not pid_running(pid):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass  # another writer swept it first


def sweep_dest(root: str | os.PathLike[str]) -> list[str]:
    """Remove the abandoned ``.*.tmp{pid}`` files anywhere under the local dataset root; returns them."""
    removed: list[str] = []
    for folder, _, files in os.walk(root):
        for name in files:
            m = _DEST_TMP.fullmatch(name)
            if m:
                _remove_if_abandoned(os.path.join(folder, name), int(m.group(1)), removed)
    return removed


def _creator_uid(folder: Path) -> int:
    """The owner of files this process creates (its fsuid, which setfsuid can set apart from its euid)."""
    fd, probe = tempfile.mkstemp(dir=folder)
    try:
        return os.fstat(fd).st_uid
    finally:
        os.close(fd)
        os.unlink(probe)


def private_dir(name: str, what: str) -> Path:
    """This user's folder ``$TMPDIR/{name}-{euid}`` (created 0700), node-local.

    Refused when it is a link, someone else's, or writable by others: whoever could write
    there could swap a file between its checksum and its use. ``what`` says what it holds.
    """
    d = Path(tempfile.gettempdir()) / f"{name}-{os.geteuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022 or (
            st.st_uid != os.geteuid() and st.st_uid != _creator_uid(d.parent)):
        raise OSError(f"{d} is not a folder only this user (uid {os.geteuid()}) can write: remove it, or set TMPDIR "
                      f"to another folder for {what}")
    return d


def scratch_dir() -> Path:
    """This user's folder for shard tars in the making (created 0700)."""
    return private_dir("vitscale-shards", "the writer's temporary shard tars")


def shard_tar_path(shard: str) -> Path:
    """Where this process builds ``shard`` (a key such as ``shards/train-000000.tar``) before uploading it.

    Removes the tars of writers that died on this host first, so they never pile up.
    """
    d = scratch_dir()
    removed: list[str] = []
    with os.scandir(d) as it:
        for e in it:
            m = _SCRATCH.fullmatch(e.name)
            if m:
                _remove_if_abandoned(e.path, int(m.group(1)), removed)
    return d / f"{os.getpid()}-{threading.get_ident()}-{os.path.basename(shard)}"
