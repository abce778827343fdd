"""Connecting to Ray: a cluster (``$RAY_ADDRESS``, ``ray job submit``) or a private local instance.

A private instance keeps everything in one 0700 folder of ours, ``<tmp>/vitscale-ray-XXXXXXXX``:
its auth token and Ray's temp dir (sessions, logs, sockets), instead of ``~/.ray`` and
``/tmp/ray``. When the driver exits we shut Ray down, end any of its processes still running
(they name the folder in their command line) and delete the folder. A folder whose driver died
without that (``kill -9``) is swept by the next private start: its ``owner.json`` names a
process of this host that no longer runs.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import psutil  # a dependency of ray[default]

from orchestration.launch.lease import host_id, process_alive, process_started_at

log = logging.getLogger(__name__)
_PREFIX = "vitscale-ray-"  # short: Ray's unix socket paths below it must stay < 108 bytes
_OLD_PREFIX = "vitscale-ray-auth-"  # token-only folders of earlier versions (no owner.json)


def connect_ray(address: str | None = None) -> str:
    """Connect to a Ray cluster and return a description of it.

    ``address`` (or ``$RAY_ADDRESS``, which ``ray job submit`` sets for the job's driver) joins
    an existing cluster; ``"auto"`` joins the newest cluster started on this machine. With
    neither, a private local Ray instance is started. We do not try ``"auto"`` implicitly: on a
    shared machine it would attach to somebody else's ``ray start --head``.
    """
    import ray

    if ray.is_initialized():
        return "already connected"
    addr = address or os.environ.get("RAY_ADDRESS") or None
    if addr:
        ray.init(address=addr, log_to_driver=True)
        return f"cluster at {addr}"
    _start_private()
    return "local Ray instance"


def _start_private() -> None:
    """``ray.init()`` of a private instance living in a folder of ours, removed at exit.

    Its workers get ``RAY_ADDRESS`` = its own GCS: Ray's state API in a worker (Ray Train's
    PlacementGroupCleaner actor) otherwise looks for "the" local cluster, finds ours plus any
    other head on the machine and dies with "Found multiple active Ray instances" (a 30-line
    traceback in every run). ``RAY_GCS_SERVER_PORT`` (Ray's own variable) fixes the port first.
    """
    import ray

    sweep_stale_private_folders()
    folder = Path(tempfile.mkdtemp(prefix=_PREFIX))  # mode 0700
    owner = {"pid": os.getpid(), "started_at": process_started_at(os.getpid()), "host_id": host_id()}
    (folder / "owner.json").write_text(json.dumps(owner))
    _private_auth_token(folder)
    port = _free_port()
    saved = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        # The dashboard serves the state API that the PlacementGroupCleaner polls every second
        # (without it: a warning a second); ~2 s and ~200 MB more than include_dashboard=False.
        ray.init(include_dashboard=True, dashboard_port=_free_port(), log_to_driver=True, _temp_dir=str(folder),
                 runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{port}"}})
    except BaseException:
        end_private(folder)
        raise
    finally:
        if saved is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = saved
    # Its agents retitle themselves and outlive a shut-down raylet by a minute: known by pid from now on.
    owner["processes"] = [(p.pid, p.create_time()) for p in _processes_of(folder)]
    (folder / "owner.json").write_text(json.dumps(owner))
    # After ray.init, so it runs before the ray.shutdown Ray registered (atexit is LIFO) and still
    # finds the agents below the raylet.
    atexit.register(end_private, folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The token of this process's private instances (see :func:`_private_auth_token`).
_PROCESS_TOKEN: str | None = None


def _private_auth_token(folder: Path) -> None:
    """Give a private local Ray instance its own token (token auth stays on).

    Without one, ``ray.init()`` would create and keep ``~/.ray/auth_token``: state outside the
    project that later runs silently depend on (docs/design.md, convention 13). The token lives in the
    instance's 0700 folder; Ray's processes inherit the path, never the value. A token the
    caller configured (``RAY_AUTH_TOKEN[_PATH]``, not one of ours) is used as it is.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return  # the caller chose another mode explicitly
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
    ours = Path(path).parent.name.startswith(_PREFIX)  # an earlier private instance of this process
    if os.environ.get("RAY_AUTH_TOKEN") or (path and not ours):
        return
    global _PROCESS_TOKEN
    # Ray's core reads the token once per process and keeps it: a second private instance of
    # this process (a notebook, a test session) must present the same one, or its GCS refuses us.
    _PROCESS_TOKEN = _PROCESS_TOKEN or secrets.token_hex(32)
    token = folder / "auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(_PROCESS_TOKEN)
    # Only the path is set: with RAY_AUTH_MODE unset, ray.init() turns token mode on itself
    # (and refreshes its cached config, which an env change alone would not reach).
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)


def end_private(folder: Path) -> None:
    """Shut the private instance down, end its leftover processes, delete its folder."""
    procs = _processes_of(folder)  # before the shutdown, while the agents are the raylet's children
    with contextlib.suppress(Exception):  # at exit: Ray may be half torn down already
        import ray

        ray.shutdown()
    _end(procs)
    shutil.rmtree(folder, ignore_errors=True)


def _processes_of(folder: Path) -> list[psutil.Process]:
    """The processes of a private instance: those of ours whose command line names ``folder`` (GCS,
    raylet, dashboard, workers), everything below them, and the ones ``owner.json`` recorded at
    start (agents retitle themselves ``ray::...``)."""
    needle, me, uid = str(folder), os.getpid(), os.getuid()
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "uids", "cmdline"]):
        info = p.info
        if info["pid"] != me and info["uids"] and info["uids"].real == uid and needle in " ".join(info["cmdline"] or ()):
            found[p.pid] = p
            with contextlib.suppress(psutil.Error):
                found.update((c.pid, c) for c in p.children(recursive=True) if c.pid != me)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        for pid, started in json.loads((folder / "owner.json").read_text()).get("processes", []):
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(int(pid))
                if pid not in found and pid != me and abs(p.create_time() - float(started)) < 1.0:
                    found[pid] = p
    return list(found.values())


def _end(procs: list[psutil.Process], grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``, by pid (psutil checks each is still the same process)."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def sweep_stale_private_folders(tmp: str | None = None) -> list[Path]:
    """Remove the private-instance folders of ours whose driver is gone (and end their processes).

    A folder counts as gone when ``owner.json`` names a process of this host that no longer
    runs (or ran before the last reboot); a token-only folder of an earlier version when no
    process of ours uses its token. Returns the folders removed.
    """
    root, uid, removed = Path(tmp or tempfile.gettempdir()), os.getuid(), []
    candidates = [p for p in root.glob(f"{_PREFIX}*") if _owned_dir(p, uid)]
    old = [p for p in candidates if p.name.startswith(_OLD_PREFIX) and not (p / "owner.json").exists()]
    in_use: set[str] = set()
    if old:  # the earlier versions' instances carry the token path in their environment only
        for proc in psutil.process_iter(["uids"]):
            with contextlib.suppress(psutil.Error):
                if proc.info["uids"] and proc.info["uids"].real == uid:
                    in_use.add(str(Path(proc.environ().get("RAY_AUTH_TOKEN_PATH", "/")).parent))
    for folder in candidates:
        if folder in old:
            if str(folder) in in_use:
                continue
        else:
            try:
                if not _owner_gone(json.loads((folder / "owner.json").read_text())):
                    continue
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being created right now, or not ours to judge
            _end(_processes_of(folder))
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        log.info("removed %d private Ray folder(s) left by runs that ended without cleaning up: %s",
                 len(removed), [p.name for p in removed])
    return removed


def _owned_dir(path: Path, uid: int) -> bool:
    try:
        st = path.lstat()
    except OSError:  # swept by another process meanwhile
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid


def _owner_gone(owner: dict[str, object]) -> bool:
    """Whether the driver ``owner.json`` names is certainly gone: same host, and a reboot since, or
    the same pid namespace and that process no longer runs. Another host or namespace: unknown."""
    host, boot, pidns = str(owner["host_id"]).split("|")
    my_host, my_boot, my_pidns = host_id().split("|")
    if host != my_host:
        return False
    if boot != my_boot:
        return True
    return pidns == my_pidns and not process_alive(int(owner["pid"]), float(owner["started_at"]))  # type: ignore[arg-type]
