"""prepare.py as a Ray job on a 2-node local cluster with moto S3 (issue #17).

The cluster comes from the production scripts (infra/local/start_services.sh with
``VITSCALE_RAY_WORKER_NODES=1``: a head and a worker node at 127.0.0.2, 1 CPU each, each node in
its own mount namespace where allowed, so a task can only read what is on S3). The source is the
ImageNet-21k release layout (a tar of synset tars) as one S3 object. One job runs while the
worker node is SIGKILLed mid-run (infra/local/kill_node.sh): Ray re-runs the lost shard tasks on
the head and the dataset still ends complete, every shard matching its index row, byte-identical
to the single-machine writer's. Then audit.py, as a job on the same cluster, names a shard
corrupted on S3.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import format as fmt
from pipeline import open_storage

pytestmark = [pytest.mark.slow, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
BUCKET = "prepare-multinode"
FLAGS = ["--samples-per-shard", "3", "--val-fraction", "0.2", "--seed", "1"]
SHARD_LINE = re.compile(r"SHARD (?P<shard>\S+) ON (?P<node>\S+)")


@pytest.fixture(scope="module")
def cluster(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Head + 1 worker node (1 CPU each) via the scripts; S3 = the session's moto server."""
    import boto3
    from conftest import local_services

    state = tmp_path_factory.mktemp("prepare-multinode")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    with local_services(state, VITSCALE_RAY_CPUS="1", VITSCALE_RAY_WORKER_NODES="1",
                        VITSCALE_RAY_WORKER_CPUS="1") as env:
        yield env


def _release_on_s3(tmp: Path) -> str:
    from test_prepare import make_release_tar

    tar = make_release_tar(tmp / "release.tar", per_synset=10)  # 30 images + 3 bad entries
    open_storage(f"s3://{BUCKET}").write_bytes("raw/release.tar", tar.read_bytes())
    return f"s3://{BUCKET}/raw/release.tar"


def _markers(url: str) -> int:
    st = open_storage(url)
    return sum(len(st.list(f"{fmt.VERSIONS_DIR}/{v}/{fmt.MARKERS_DIR}"))
               for v in {k.split("/")[1] for k in st.list(fmt.VERSIONS_DIR)})


def test_prepare_job_survives_a_killed_node_and_matches_write_shards(cluster: dict[str, str],
                                                                     tmp_path: Path) -> None:
    src = _release_on_s3(tmp_path)
    single, on_ray = f"s3://{BUCKET}/single", f"s3://{BUCKET}/prepared"
    subprocess.run([sys.executable, "-m", "pipeline.write_shards", src, single, *FLAGS, "--workers", "1", "--quiet"],
                   cwd=ROOT, env=cluster, check=True, timeout=120)
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--working-dir", ".", "--entrypoint-num-cpus", "0", "--",
           "python", "tests/prepare_slow_driver.py", "1.5", src, on_ray, *FLAGS, "--tasks", "2",
           "--cpus-per-task", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cluster, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while _markers(on_ray) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.3)
    assert proc.poll() is None, f"the job ended before the node could be killed:\n{proc.communicate()[0][-4000:]}"
    subprocess.run(["bash", str(ROOT / "infra/local/kill_node.sh"), "1"], env=cluster, check=True, timeout=60,
                   capture_output=True)
    killed_at = _markers(on_ray)
    from conftest import follow_ray_job

    out, ok = follow_ray_job(proc, 180)
    assert ok, f"the job failed:\n{out[-6000:]}"
    ran_on = {(m["shard"], m["node"]) for m in SHARD_LINE.finditer(out)}
    assert {node for _, node in ran_on} == {"head", "node_1"}, out[-4000:]  # SPREAD: both nodes wrote shards
    a, b = fmt.resolve(on_ray), fmt.resolve(single)
    index = fmt.read_index(a).to_pylist()
    assert a.version == b.version and index == fmt.read_index(b).to_pylist()
    assert killed_at < len(index)  # the kill really happened mid-run
    st = a.storage()
    for row in index:  # complete and verified: every shard's bytes match its index row
        data = st.read_bytes(row["shard"])
        assert len(data) == row["bytes"] and hashlib.sha256(data).hexdigest() == row["sha256"], row["shard"]
    assert sum(r["samples"] for r in index) == 30
    assert "images/s" in out and "ETA" in out and "rejects 3" in out

    # The audit, as a Ray job on the same cluster (one node down), finds a planted corrupt shard.
    bad = index[4]["shard"]
    data = bytearray(st.read_bytes(bad))
    data[600] ^= 0xFF
    st.write_bytes(bad, bytes(data))
    audit = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--working-dir", ".", "--entrypoint-num-cpus",
                            "0", "--", "python", "orchestration/audit.py", on_ray, "--decode-fraction", "1",
                            "--quiet", "--tasks", "2"], cwd=ROOT, env=cluster, capture_output=True, text=True,
                           timeout=180)
    assert audit.returncode != 0, audit.stdout[-4000:]  # the job exits 1: a shard failed its check
    assert f"BAD shard {bad}" in audit.stdout and f"{len(index) - 1}/{len(index)} match" in audit.stdout, \
        audit.stdout[-4000:]
