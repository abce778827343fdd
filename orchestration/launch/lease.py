"""A lease on a run's storage prefix: at most one live run writes a run folder at a time.

Two ``--resume auto`` launches of the same recipe resolve to the same MLflow run, checkpoint
prefix and node staging folder; without exclusion one deadlocks and, when stopped, marks the
other's run FAILED. The driver therefore takes ``<run_dir>/lease.json`` before it touches the
MLflow run or starts Ray, and holds it for the whole run:

* **create** is conditional (``Storage.put_if(token=None)``: S3 ``If-None-Match: *``, locally
  under an ``flock``); of two launches exactly one wins, the other is told who holds it.
* **heartbeat**: a daemon thread rewrites the lease every ``ttl_s / 3`` seconds, conditional on
  it being unchanged since our last write (``put_if`` with the token of that write: S3
  ``If-Match: <etag>``, locally its content hash), moving ``expires_at`` forward. A lease that
  is not renewed expires.
* **expiry / takeover**: a live lease is never taken over. A stale one is taken over only with
  ``force=True`` (``pretrain.py --force``), by the same conditional replace, so two forcing
  launches cannot both win. Stale means: expired (its driver died without releasing); or held
  by a process of this host (same boot, same pid namespace) that is no longer running, at once;
  or unusable (unreadable, or an expiry further away than any lease's ttl, MAX_TTL_S).
* **release** deletes the lease if it is still ours.

Expiry compares the holder's wall clock (``expires_at``) with the reader's: clocks must agree to
well within ``ttl_s`` (NTP does that; the default ttl is minutes).
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from functools import cache

from pipeline.storage import Storage, open_storage, url_join

log = logging.getLogger(__name__)

LEASE_KEY = "lease.json"
DEFAULT_TTL_S = 120.0
MAX_TTL_S = 24 * 3600.0  # a lease further from expiry than this was not written by a live Lease
_LATEST_TIME = 2.0**35  # year ~3000: any later timestamp is garbage, not a time


class LeaseHeldError(RuntimeError):
    """Another run holds the lease (live, or expired and not forced)."""


class LeaseLostError(RuntimeError):
    """Our lease was replaced by another run (it had expired and was taken over with --force)."""


@dataclass(frozen=True, kw_only=True)
class LeaseInfo:
    """The contents of ``lease.json``: who holds it and until when (holder's clock).

    ``host_id``/``pid``/``pid_started_at`` let a reader on the holder's host see at once that the
    holder is gone (absent in leases written by older versions: those only expire).
    """

    holder: str
    run_id: str
    token: str
    acquired_at: float
    expires_at: float
    ttl_s: float
    host_id: str = ""
    pid: int = 0
    pid_started_at: float = 0.0
    invalid: str = ""  # why the stored bytes are not a usable lease (never written)

    def to_json(self) -> bytes:
        return json.dumps({k: v for k, v in self.__dict__.items() if k != "invalid"}, sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes, where: str) -> LeaseInfo:
        """The lease in ``data``; an unusable one (bad JSON, a missing field, a wrong type, a
        non-finite or absurd time) comes back with ``invalid`` saying why: a stale lease."""
        try:
            d = json.loads(data)
            if not isinstance(d, dict):
                raise ValueError(f"a JSON {type(d).__name__}, not an object")
            for k in ("holder", "run_id", "token"):
                if not isinstance(d[k], str):
                    raise ValueError(f"{k} {d[k]!r:.40} is not a string")
            for k in ("acquired_at", "expires_at", "ttl_s", "pid_started_at"):
                v = d.get(k, 0.0)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < _LATEST_TIME:
                    raise ValueError(f"{k} {v!r:.40} is not a time")
            pid = d.get("pid", 0)
            if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < 2**31:
                raise ValueError(f"pid {pid!r:.40} is not a process id")
            if not isinstance(d.get("host_id", ""), str):
                raise ValueError("host_id is not a string")
            return LeaseInfo(**{k: d[k] for k in LeaseInfo.__dataclass_fields__ if k in d and k != "invalid"})
        except (ValueError, KeyError) as e:
            why = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            log.warning("unreadable lease %s (%s): treating it as stale", where, why)
            return LeaseInfo(holder="?", run_id="?", token="?", acquired_at=0.0, expires_at=0.0, ttl_s=0.0,
                             invalid=why)

    def stale_reason(self, now: float) -> str | None:
        """Why this lease may be taken over (with --force), or None while its holder may be alive."""
        if self.invalid:
            return f"it is unreadable ({self.invalid})"
        if self.expires_at - now > MAX_TTL_S:
            return f"its expiry is more than {MAX_TTL_S / 3600:.0f} h away, beyond any lease's ttl"
        if self.pid and self.host_id == host_id() and not process_alive(self.pid, self.pid_started_at):
            return f"its process (pid {self.pid}) is no longer running on this host"
        if self.expires_at <= now:
            return "its run stopped renewing it (crashed or killed)"
        return None

    def describe(self, now: float) -> str:
        if self.invalid:
            return f"an unreadable lease ({self.invalid})"
        left = self.expires_at - now
        state = ("expires implausibly far in the future" if left > MAX_TTL_S
                 else f"expires in {left:.0f} s" if left > 0 else f"expired {-left:.0f} s ago")
        return f"{self.holder:.200} (run {self.run_id:.100}, acquired {_iso(self.acquired_at)}, {state})"


def default_holder() -> str:
    """``user@host pid N``: enough to find and stop the process that holds a lease."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


@cache
def host_id() -> str:
    """This host and pid namespace, as far as pids are comparable: hostname, boot id (a reboot
    reuses pids) and pid namespace (containers on one host share a hostname, not their pids)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        import psutil

        boot = str(int(psutil.boot_time()))
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return f"{socket.gethostname()}|{boot}|{pidns}"


def process_started_at(pid: int) -> float:
    """The start time of process ``pid`` of this host (0.0 if it is not running)."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def process_alive(pid: int, started_at: float = 0.0) -> bool:
    """Whether process ``pid`` of this host runs (not a zombie) and, given ``started_at``, is still
    the process that started then (pids are reused)."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return not started_at or math.isclose(p.create_time(), started_at, abs_tol=1.0)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # exists, but not ours to inspect
        return True


@cache
def _own_start(pid: int) -> float:  # keyed by pid: a forked child is another process
    return process_started_at(pid)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Lease:
    """The lease on ``<prefix_url>/lease.json`` for run ``run_id``.

    Use as a context manager around everything the run does (``acquire`` + heartbeat thread on
    enter, ``release`` on exit)::

        with Lease(run_dir, run_id=run_id, force=args.force):
            ...  # train

    ``lost`` becomes True if a heartbeat finds the lease replaced by another run.
    """

    def __init__(self, prefix_url: str, *, run_id: str, holder: str | None = None, ttl_s: float = DEFAULT_TTL_S,
                 force: bool = False) -> None:
        if not 0 < ttl_s <= MAX_TTL_S:
            raise ValueError(f"lease ttl_s={ttl_s} must be > 0 and <= {MAX_TTL_S:.0f} s")
        self.url = url_join(prefix_url, LEASE_KEY)
        self.storage: Storage = open_storage(prefix_url)
        self.run_id, self.ttl_s, self.force = run_id, float(ttl_s), force
        self.holder = holder or default_holder()
        self.token = uuid.uuid4().hex
        self.lost = False
        self._etag: str | None = None  # S3: the ETag of our last write (the If-Match condition)
        self._acquired_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- public
    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease and start the heartbeat; LeaseHeldError names the current holder."""
        self._acquired_at = time.time()
        if not self._create():
            current, version = self._read()
            now = time.time()
            if current is None:  # released between our create and read: try once more
                if self._create():
                    return self._start()
                current, version = self._read()
                assert current is not None, f"{self.url} vanished twice while acquiring"
            stale = current.stale_reason(now)
            if current.invalid and not self.force:
                raise LeaseHeldError(f"{self.url} is not a usable lease ({current.invalid}). If no run is using "
                                     "this run folder, rerun with --force to replace it")
            if stale is None:
                raise LeaseHeldError(
                    f"{self.url} is held by {current.describe(now)}: another run is using this run folder "
                    "(the same MLflow run, checkpoints and staging folder). Wait for it to finish or stop that "
                    "process; --force takes over only a stale lease"
                )
            if not self.force:
                raise LeaseHeldError(
                    f"{self.url} is held by {current.describe(now)}, but {stale}. If that process is gone, "
                    "rerun with --force to take the lease over"
                )
            if not self._replace(version):
                raise LeaseHeldError(f"{self.url} was taken over by another run while we tried to: rerun to see by whom")
            log.warning("took over the lease %s of %s (%s)", self.url, current.describe(now), stale)
        self._start()

    def release(self) -> bool:
        """Stop the heartbeat and delete the lease if it is still ours; False if it was lost
        (taken over by another run), in which case that run owns everything under the prefix."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.lost:
            return False
        try:
            self._delete()
        except Exception as e:  # noqa: BLE001 - it expires by itself; don't mask the run's outcome
            log.warning("could not release the lease %s (it will expire in %.0f s): %s", self.url, self.ttl_s, e)
        return True

    def renew(self) -> bool:
        """One heartbeat: push ``expires_at`` forward if the lease is still ours (False if lost)."""
        if self.lost:
            return False
        if self._replace(self._etag):
            return True
        self.lost = True
        log.error("lease %s was taken over by another run: this run no longer owns its run folder", self.url)
        return False

    def read(self) -> LeaseInfo | None:
        """The lease as stored now, or None."""
        return self._read()[0]

    # ---------------------------------------------------------------- internals
    def _info(self) -> LeaseInfo:
        pid = os.getpid()
        return LeaseInfo(holder=self.holder, run_id=self.run_id, token=self.token, acquired_at=self._acquired_at,
                         expires_at=time.time() + self.ttl_s, ttl_s=self.ttl_s, host_id=host_id(), pid=pid,
                         pid_started_at=_own_start(pid))

    def _start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="vitscale-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        period = self.ttl_s / 3
        while not self._stop.wait(period):
            try:
                if not self.renew():
                    return
            except Exception as e:  # noqa: BLE001 - a failed renewal is retried at the next beat
                log.warning("lease heartbeat for %s failed (retrying in %.0f s): %s", self.url, period, e)

    def _create(self) -> bool:
        """Conditional create; False if a lease already exists."""
        token = self.storage.put_if(LEASE_KEY, self._info().to_json(), token=None)
        if token is None:
            return False
        self._etag = token
        return True

    def _replace(self, version: str | None) -> bool:
        """Rewrite the lease with ours if it is unchanged since ``version`` (the storage token of
        what we last read or wrote: S3 ETag, local content hash)."""
        if version is None:  # no token would make the write a create
            return False
        token = self.storage.put_if(LEASE_KEY, self._info().to_json(), token=version)
        if token is None:
            return False
        self._etag = token
        return True

    def _read(self) -> tuple[LeaseInfo | None, str | None]:
        """(lease, token) as stored now; (None, None) if there is none."""
        seen = self.storage.read_versioned(LEASE_KEY)
        if seen is None:
            return None, None
        return LeaseInfo.from_json(seen[0], self.url), seen[1]

    def _delete(self) -> None:
        if self._etag is not None:
            self.storage.delete_if(LEASE_KEY, token=self._etag)


def hold_run_lease(run_dir: str, run_id: str, *, force: bool = False, ttl_s: float | None = None) -> Lease:
    """Acquire the lease on ``run_dir`` for ``run_id`` (heartbeat running); the caller releases it.

    ``ttl_s`` defaults to ``$VITSCALE_LEASE_TTL_S`` or DEFAULT_TTL_S.
    """
    ttl = ttl_s if ttl_s is not None else float(os.environ.get("VITSCALE_LEASE_TTL_S") or DEFAULT_TTL_S)
    lease = Lease(run_dir, run_id=run_id, ttl_s=ttl, force=force)
    lease.acquire()
    return lease
