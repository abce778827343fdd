"""The local services start on a clean machine: fresh HOME, no Ray/AWS/MLflow variables.

`infra/local/start_services.sh` (`make services-up`) makes the Ray cluster's auth token itself,
inside the state dir ($VITSCALE_HOME here, as a user's shell has it); `ray job submit` and the
job's driver authenticate with it; the token never reaches a log or stdout, nothing is written to
HOME, and `stop_services.sh` removes it. env.sh gives jobs the same state dir and MLflow store as
a shell without it, and the bucket the README writes to exists.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _clean_env(home: Path, state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "VITSCALE_"))}
    env.update(HOME=str(home), VITSCALE_HOME=str(state), PYTHON=sys.executable,
               RAY_BIN=str(VENV_BIN / "ray"), VITSCALE_RAY_CPUS="1",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


def _load_env_sh(env: dict[str, str], state: Path) -> dict[str, str]:
    out = dict(env)
    for line in (state / "env.sh").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        out[key] = value.strip("'")
    return out


@pytest.mark.integration
def test_services_make_their_own_token_on_a_fresh_home(tmp_path: Path) -> None:
    home, state, job = tmp_path / "home", tmp_path / "state", tmp_path / "job"
    home.mkdir()
    job.mkdir()
    (job / "whoami.py").write_text(
        "import os, ray\n"
        "ray.init()\n"  # the job's driver joins the cluster with the token too
        "print('JOB-OK', int(ray.cluster_resources()['CPU']), os.environ['RAY_AUTH_MODE'])\n"
        "print('JOB-HOME', os.environ['VITSCALE_HOME'], os.environ['VITSCALE_CHECKOUT'])\n"
    )
    env = _clean_env(home, state)
    token_file = state / "ray_auth_token"
    try:  # a start that fails half-way still has its services stopped
        started = subprocess.run(["bash", str(ROOT / "infra/local/start_services.sh")], env=env, check=True,
                                 timeout=300, capture_output=True, text=True)
        assert f"source {state.resolve()}/env.sh" in started.stderr, started.stderr  # what to do next
        plain = dict(env)
        env = _load_env_sh(env, state)
        assert env["VITSCALE_HOME"] == str(state.resolve()) and env["RAY_ADDRESS"].startswith("http://127.0.0.1:")
        # One tracking store: the URI env.sh exports is the one the code picks without it.
        default = subprocess.run([sys.executable, "-c", "from orchestration import tracking; print(tracking.tracking_uri())"],
                                 env={**plain, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True,
                                 timeout=120, check=True).stdout.strip()
        assert env["MLFLOW_TRACKING_URI"] == default == f"sqlite:///{state.resolve()}/mlflow.db"
        import boto3  # the bucket of the README's commands

        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
        assert "vitscale" in [b["Name"] for b in s3.list_buckets()["Buckets"]]
        assert env["RAY_AUTH_MODE"] == "token" and Path(env["RAY_AUTH_TOKEN_PATH"]) == token_file
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text()
        assert len(token) == 64 and token not in (state / "env.sh").read_text()

        submit = [str(VENV_BIN / "ray"), "job", "submit", "--working-dir", str(job),
                  "--entrypoint-num-cpus", "0", "--", "python", "whoami.py"]
        ok = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
        assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
        assert "JOB-OK 1 token" in ok.stdout
        assert f"JOB-HOME {state.resolve()} {ROOT}" in ok.stdout  # jobs keep the checkout's state dir
        assert token not in ok.stdout + ok.stderr

        # Auth is really on: a client without the token is refused.
        no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
        refused = subprocess.run([str(VENV_BIN / "ray"), "job", "list"], env=no_token,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
        assert "JOB-OK" not in refused.stdout
    finally:
        subprocess.run(["bash", str(ROOT / "infra/local/stop_services.sh")], env=env, timeout=120)

    assert not token_file.exists(), "stop_services.sh must remove the cluster's token"
    logs = [p for p in state.rglob("*") if p.is_file()]
    assert any("ray-session" in str(p) for p in logs), "Ray's own logs were not kept"
    leaked = [str(p) for p in logs if token.encode() in p.read_bytes()]
    assert not leaked, f"token found in {leaked}"
    assert not (home / ".ray").exists() and sorted(os.listdir(home)) == [], os.listdir(home)


@pytest.mark.integration
def test_a_worker_node_that_cannot_start_is_retried_then_everything_started_is_stopped(tmp_path: Path) -> None:
    """A worker node whose `ray start` fails (here: a bad CPU count; in CI once: Ray's 30 s
    registration timeout on a loaded machine) gets one more try; when that fails too the script
    exits 1 having stopped the head and the moto server it started: no process of the state
    folder is left, no pid file claims one."""
    import psutil

    state = tmp_path / "state"
    env = _clean_env(tmp_path / "home", state) | {"VITSCALE_RAY_WORKER_NODES": "1",
                                                  "VITSCALE_RAY_WORKER_CPUS": "notanumber"}
    (tmp_path / "home").mkdir()
    out = subprocess.run(["bash", str(ROOT / "infra/local/start_services.sh")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "worker node 1 did not start; trying once more" in out.stderr, out.stderr[-3000:]
    assert "did not start twice; stopping the services this script started" in out.stderr
    assert "stopped ray" in out.stderr and "stopped moto" in out.stderr, out.stderr[-3000:]
    assert not list(state.glob("*.pid"))
    left = []
    for p in psutil.process_iter(["cmdline"]):
        if any(str(state) in a for a in (p.info["cmdline"] or [])):
            left.append(p.pid)
    assert not left, f"processes of {state} still running: {left}"
