"""Shared fixtures: real local services, never hand-written mocks (docs/design.md)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def small_digits_dataset(tmp_path_factory: pytest.TempPathFactory, image_size: int, limit: int = 200) -> str:
    """Shards of the first ``limit`` digits at ``image_size`` px, 10 classes, a 20 % val split
    (160 train / 40 val by default): what module-scoped ``digits`` fixtures return."""
    from pipeline import write_dataset
    from pipeline.demo_data import make_digits_folder

    tmp = tmp_path_factory.mktemp("digits")
    folder = make_digits_folder(tmp / "folder", image_size=image_size, limit=limit)
    write_dataset(folder, str(tmp / "ds"), val_fraction=0.2, samples_per_shard=100, workers=1, progress=False)
    return str(tmp / "ds")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (the real S3 wire protocol over HTTP).

    Sets AWS_ENDPOINT_URL and dummy credentials for the whole session so boto3 clients
    created anywhere (pipeline.storage, subprocesses, Ray workers) talk to it.
    """
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        url = f"http://127.0.0.1:{port}"
        env = {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield url
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture()
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the moto server; returns its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail fast (with the log tail) if ``proc`` exits."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode} during start-up:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"mlflow server not healthy at {url} after {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def _stop_group(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM the server's process group (its pid: it leads its own session), SIGKILL if it lingers."""
    import signal

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader so the group can empty
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@contextlib.contextmanager
def mlflow_server(
    state: Path, *, backend: str, artifacts: str, env: dict[str, str] | None = None, timeout: float = 180.0
) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (one uvicorn worker) proxying artifacts to ``artifacts``.

    ``backend`` is a backend store URI (``sqlite:///...`` or a folder for the file store);
    ``artifacts`` a folder or ``s3://bucket/prefix`` (the server reads ``MLFLOW_S3_ENDPOINT_URL``
    and the AWS variables from ``env``). Health-checked on ``/health``; stopped by its pid (it
    leads its own process group, so its workers go with it). Yields ``http://127.0.0.1:PORT``.
    """
    state.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = state / f"mlflow-server-{port}.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--serve-artifacts",
           "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=state, env={**os.environ, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", proc, log, timeout)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop_group(proc)


def s3_mlflow_env(s3_endpoint: str) -> dict[str, str]:
    """Environment for an mlflow server (and clients) whose artifacts live on the moto S3 server."""
    return {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "AWS_ENDPOINT_URL": s3_endpoint,
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


VENV_BIN = Path(sys.executable).parent


@contextlib.contextmanager
def local_services(state: Path, **extra: str) -> Iterator[dict[str, str]]:
    """The project's own local services (``infra/local/start_services.sh``: moto S3 unless
    AWS_ENDPOINT_URL is given, a token-authenticated Ray head, worker nodes with
    VITSCALE_RAY_WORKER_NODES) with their state in ``state``; ``extra`` adds environment variables.

    Yields the environment a user gets from ``source $STATE/env.sh`` (plus ``STATE``), for
    ``ray job submit`` and the CLIs; ``stop_services.sh`` runs on exit.
    """
    env = {**os.environ, "VITSCALE_STATE_DIR": str(state), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHON": sys.executable, "RAY_BIN": str(VENV_BIN / "ray"), **extra}
    subprocess.run(["bash", str(ROOT / "infra/local/start_services.sh")], env=env, check=True, timeout=300)
    try:
        for line in (state / "env.sh").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value.strip("'")
        env["STATE"] = str(state)
        yield env
    finally:
        subprocess.run(["bash", str(ROOT / "infra/local/stop_services.sh")], env=env, timeout=120)


FINAL_STATUS = re.compile(rb"Job '[^']+' (succeeded|failed|stopped)")


def follow_ray_job(proc: subprocess.Popen, timeout: float, tick: Callable[[], None] | None = None,
                   grace: float = 30.0) -> tuple[str, bool]:
    """Wait for a ``ray job submit`` CLI; returns (its output, whether the job succeeded).

    The job's own final status line is what counts: after a node or a worker was lost, Ray's CLI
    was seen to print "Job '...' succeeded" and then not exit for 10+ minutes (session 8). The
    output is read as it comes; a CLI that printed the final status gets ``grace`` seconds to exit
    before it is stopped. ``tick`` runs between reads (sampling processes, say). At ``timeout``
    the CLI is killed and the job counts as failed.
    """
    fd = proc.stdout.fileno()  # type: ignore[union-attr]
    os.set_blocking(fd, False)
    buf, final, final_at = bytearray(), None, None
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if tick is not None:
            tick()
        buf += _read_available(fd)
        if final is None and (m := FINAL_STATUS.search(buf)):
            final, final_at = m.group(1).decode(), time.monotonic()
        if final_at is not None and time.monotonic() - final_at > grace:
            break
        time.sleep(0.3)
    stuck = proc.poll() is None
    if stuck:
        proc.kill()
    proc.wait(timeout=60)
    os.set_blocking(fd, True)
    while chunk := os.read(fd, 1 << 16):  # the rest, to EOF
        buf += chunk
    out = buf.decode(errors="replace")
    if stuck and final is not None:
        print(f"ray job submit printed the final status ({final}) but did not exit in {grace:.0f} s; stopped it")
        return out, final == "succeeded"
    return out, proc.returncode == 0


def _read_available(fd: int) -> bytes:
    """What the pipe holds now, without waiting."""
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def gloo_rank_env(rank: int, world: int, port: int | str) -> dict[str, str]:
    """A torchrun-style environment for one CPU rank (gloo; DeepSpeed on its CPU accelerator) of a
    multi-process test, with this checkout and tests/ importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def spawn_ranks(argv: list[str], world: int, log_of: Callable[[int], Path]) -> list[subprocess.Popen[bytes]]:
    """``world`` processes ``python *argv`` (one per rank, env from :func:`gloo_rank_env`, one
    free port), each writing stdout+stderr to ``log_of(rank)``."""
    port, procs = free_port(), []
    for rank in range(world):
        with log_of(rank).open("w") as f:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen([sys.executable, *argv], env=gloo_rank_env(rank, world, port), stdout=f,
                                          stderr=subprocess.STDOUT, cwd=ROOT))
    return procs


def wait_ranks(procs: list[subprocess.Popen[bytes]], log_of: Callable[[int], Path], deadline: float,
               name: str = "worker") -> None:
    """Every rank exits 0 by ``deadline`` (time.monotonic()); else all are killed and the first
    failing rank's log tail is the assertion message."""
    for rank, p in enumerate(procs):
        try:
            code = p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            code = None
            for q in procs:
                q.kill()
        assert code == 0, f"{name} rank {rank} exited {code}:\n{log_of(rank).read_text()[-4000:]}"


@pytest.fixture(autouse=True, scope="module")
def _environment_per_module() -> Iterator[None]:
    """Each test module ends with the MLFLOW_* environment it started with.

    ``mlflow.set_tracking_uri`` (called by ``tracking.client``) exports MLFLOW_TRACKING_URI so
    that child processes inherit it. Left in place, a module's MLflow server, stopped with the
    module, would become the tracking store of every later module's subprocesses (seen: audit
    jobs retrying a dead server). Only MLFLOW_* is restored: session fixtures (moto's AWS_*) set
    their variables once for the whole session.
    """
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    for k in [k for k in os.environ if k.startswith("MLFLOW_")]:
        del os.environ[k]
    os.environ.update(before)


class LoaderProxy:
    """Forwards a loader's length, resume state and other attributes to `self.loader`: subclasses
    override `__iter__` to watch what the Trainer draws."""

    loader: Any

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:  # normalize, stats, plan, epoch, ...
        return getattr(self.loader, name)
