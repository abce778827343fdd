"""Multi-node, for real, on one machine (issue #14): a Ray head plus a separate worker node.

The cluster comes from the production scripts: ``infra/local/start_services.sh`` with
``VITSCALE_RAY_WORKER_NODES=1`` starts the head and one worker raylet (``ray start --address
<gcs> --block``) with its own IP (127.0.0.2), Ray temp dir, TMPDIR, CPUs and custom resource
``node_1``; ``stop_services.sh`` stops both by pid. Every node gets 1 CPU and a training worker
asks for 1, so Ray Train's placement group (PACK by default) must put one rank on each node.

Run storage, checkpoints and Ray Train's own storage are on the moto S3 server; MLflow is an
``mlflow server`` (sqlite in the state dir, artifacts on S3), reached over HTTP from every node.
What is proven, from the outside:
- each rank ran on a different node: Ray Train's worker-group log line (pid, ip, ranks), the
  state API's actor list (pid -> node id -> that node's resources) and the process trees of the
  two ``ray start`` processes agree;
- each node staged its checkpoint files in its own TMPDIR and removed them at the end; the
  checkpoints (every rank's files) are on S3; nothing went to local Ray storage. Where mount
  namespaces are allowed (root), every node runs in its own and sees its own folder at one
  common TMPDIR path (as /tmp on separate machines), and the worker node sees the head's temp
  dir as an empty tmpfs: a rank reading a file another node wrote fails here as on a cluster;
- a second job resumes from S3 (no node has a local copy left) and finishes.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# ~3-3.5 min on 2 busy cores (two Ray nodes, an mlflow server, two DeepSpeed jobs).
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
BUCKET = "multinode-test"
RECIPE = "vit_mu_smoke"
# Ray Train V2's worker-group start-up line, one per rank.
RANK_LINE = re.compile(r"\(ip=(?P<ip>[\d.]+), pid=(?P<pid>\d+)\) world_rank=(?P<rank>\d+), "
                       r"local_rank=(?P<local>\d+), node_rank=(?P<node>\d+)")


def _tree(pid: int) -> list[Any]:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmd(p: Any) -> str:
    try:
        return " ".join(p.cmdline() or [p.name()])
    except Exception:  # noqa: BLE001 - the process may be gone
        return ""


@pytest.fixture(scope="module")
def cluster(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Head + 1 worker node (1 CPU each) via the scripts; S3 = the session's moto server."""
    import boto3
    from conftest import local_services, mlflow_server, s3_mlflow_env

    state = tmp_path_factory.mktemp("multinode")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    with mlflow_server(state / "mlflow", backend=f"sqlite:///{state / 'mlflow.db'}",
                       artifacts=f"s3://{BUCKET}/mlflow", env=s3_mlflow_env(s3_endpoint)) as server:
        extra = {
            "MLFLOW_TRACKING_URI": server,
            "VITSCALE_STORAGE": f"s3://{BUCKET}/runs",
            "VITSCALE_RAY_STORAGE": f"s3://{BUCKET}/ray_results",
            "VITSCALE_RAY_CPUS": "1",
            "VITSCALE_RAY_WORKER_NODES": "1",
            "VITSCALE_RAY_WORKER_CPUS": "1",
        }
        with local_services(state, **extra) as env:
            pids = {name: int((state / f"{name}.pid").read_text()) for name in ("ray", "ray_worker_1")}
            # Where this machine allows it, the worker node must not even see the head's temp dir.
            can_isolate = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                                         capture_output=True).returncode == 0
            for name in ("ray", "ray_worker_1"):
                assert (state / f"{name}.isolation").read_text().strip() == ("mount" if can_isolate else "none"), name
            yield env
        for name, pid in pids.items():
            assert not _tree(pid), f"stop_services.sh left processes of {name} behind"


def _node_tmpdirs(env: dict[str, str]) -> dict[str, Path]:
    """Each node's TMPDIR (what tempfile gives its processes), by pid-file name."""
    state = Path(env["STATE"])
    return {name: Path((state / f"{name}.tmpdir").read_text().strip()) / "tmp" for name in ("ray", "ray_worker_1")}


@pytest.fixture(scope="module")
def digits_url(cluster: dict[str, str]) -> str:
    from pipeline.demo_data import make_digits_folder

    folder = make_digits_folder(Path(cluster["STATE"]) / "digits", image_size=32, limit=400)
    url = f"s3://{BUCKET}/digits"
    subprocess.run([sys.executable, "-m", "pipeline.write_shards", str(folder), url, "--val-fraction", "0.2",
                    "--samples-per-shard", "100", "--workers", "1", "--quiet"],
                   cwd=ROOT, check=True, timeout=120, env=cluster)
    return url


def _submit(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--working-dir", ".", "--entrypoint-num-cpus", "0", "--",
           "python", "orchestration/pretrain.py", "--recipe", RECIPE, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _watch(env: dict[str, str], proc: subprocess.Popen[str], timeout: float = 240) -> dict[str, Any]:
    """Run the job to its end (``conftest.follow_ray_job``), sampling the nodes meanwhile.

    Returns the output, {train-worker pid: node} from the two ``ray start`` process trees, and
    the nodes whose own TMPDIR held checkpoint staging at some point.
    """
    from conftest import follow_ray_job

    state = Path(env["STATE"])
    heads = {name: int((state / f"{name}.pid").read_text()) for name in ("ray", "ray_worker_1")}
    tmpdirs = _node_tmpdirs(env)
    workers: dict[int, str] = {}
    staged: set[str] = set()

    def sample() -> None:
        for name, pid in heads.items():
            workers.update({p.pid: name for p in _tree(pid) if "RayTrainWorker" in _cmd(p)})
            if any((tmpdirs[name] / "vitscale-ckpt").glob("*/step*")):
                staged.add(name)

    out, ok = follow_ray_job(proc, timeout, tick=sample)
    (state / "logs" / f"job-{int(time.time() * 1000)}.log").write_text(out)  # kept for diagnosis
    assert ok, f"the job failed:\n{out[-6000:]}"
    return {"output": out, "workers": workers, "staged": staged}


def _result(output: str) -> dict[str, Any]:
    lines = [ln for ln in output.splitlines() if ln.startswith("VITSCALE_RESULT ")]
    assert lines, f"no VITSCALE_RESULT line in the job output:\n{output[-4000:]}"
    return json.loads(lines[-1].split(" ", 1)[1])


def _ray_list(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    out = subprocess.run([str(VENV_BIN / "ray"), "list", *args, "--detail", "--format", "json", "--limit", "10000"],
                         env=env, check=True, capture_output=True, text=True, timeout=120).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def first_run(cluster: dict[str, str], digits_url: str) -> dict[str, Any]:
    """2 ranks, 20 steps, checkpoints every 10 (on S3)."""
    proc = _submit(cluster, "--data", digits_url, "--storage", cluster["VITSCALE_STORAGE"], "--workers", "2",
                   "--no-register", "--set", "train.schedule.total_steps=20", "--set", "train.schedule.warmup_steps=2",
                   "--set", "train.checkpoint.every=10", "--set", "train.eval_every=20",
                   "--set", "train.log_every=5")
    t0 = time.monotonic()
    run = _watch(cluster, proc)
    run["seconds"] = time.monotonic() - t0
    run["result"] = _result(run["output"])
    return run


@pytest.mark.integration
def test_ranks_run_on_different_nodes(first_run: dict[str, Any], cluster: dict[str, str]) -> None:
    ranks = {int(m["rank"]): m.groupdict() for m in RANK_LINE.finditer(first_run["output"])}
    assert sorted(ranks) == [0, 1], f"no worker-group line for both ranks:\n{first_run['output'][-4000:]}"
    # Ray Train itself sees two nodes: one local rank 0 per node, node ranks 0 and 1.
    assert len({r["ip"] for r in ranks.values()}) == 2, ranks
    assert sorted(int(r["node"]) for r in ranks.values()) == [0, 1], ranks
    assert all(r["local"] == "0" for r in ranks.values()), ranks
    # The state API: each rank's actor (by pid) sits on a different node, one of them node_1.
    actors = {a["pid"]: a for a in _ray_list(cluster, "actors", "--filter", "class_name=RayTrainWorker")}
    nodes = {n["node_id"]: n for n in _ray_list(cluster, "nodes")}
    where = {rank: actors[int(r["pid"])]["node_id"] for rank, r in ranks.items()}
    assert where[0] != where[1], where
    assert sorted(bool(nodes[n]["is_head_node"]) for n in where.values()) == [False, True]
    assert any("node_1" in nodes[n]["resources_total"] for n in where.values())
    # The processes: each rank's pid is in the process tree of a different `ray start`.
    homes = {rank: first_run["workers"].get(int(r["pid"])) for rank, r in ranks.items()}
    assert sorted(map(str, homes.values())) == ["ray", "ray_worker_1"], (homes, first_run["workers"])


@pytest.mark.integration
def test_checkpoints_live_only_on_s3(first_run: dict[str, Any], cluster: dict[str, str]) -> None:
    from pipeline.storage import open_storage
    from training.checkpoint import MARKER, POINTER, rank_file

    res = first_run["result"]
    assert res["metrics"]["step"] == 20
    run_dir = f"{cluster['VITSCALE_STORAGE']}/{RECIPE}/{res['run_id']}"
    assert res["run_dir"] == run_dir
    ckpts = open_storage(f"{run_dir}/checkpoints")
    keys = set(ckpts.list(""))
    assert json.loads(ckpts.read_bytes(POINTER))["tag"] == "step20", keys
    for tag in ("step10", "step20"):
        assert f"{tag}/{MARKER}" in keys, keys
        # Both ranks' files, each uploaded by its own node (rank 1's from the worker node).
        assert {f"{tag}/{rank_file(0)}", f"{tag}/{rank_file(1)}"} <= keys, keys
        assert any(k.startswith(f"{tag}/") and "zero_pp_rank_1" in k for k in keys), keys
    # Each node staged in its own TMPDIR, and nothing staged is left on either node.
    assert first_run["staged"] == {"ray", "ray_worker_1"}, first_run["staged"]
    for name, tmp in _node_tmpdirs(cluster).items():
        assert not (tmp / "vitscale-ckpt" / res["run_id"]).exists(), f"{name} kept a local checkpoint copy"
    assert not (Path(cluster["STATE"]) / "ray_results").exists(), "Ray Train wrote to local storage"


@pytest.mark.integration
def test_resume_from_s3_on_both_nodes(first_run: dict[str, Any], cluster: dict[str, str], digits_url: str) -> None:
    res = first_run["result"]
    proc = _submit(cluster, "--data", digits_url, "--storage", cluster["VITSCALE_STORAGE"], "--workers", "2",
                   "--no-register", "--resume", "auto", "--set", "train.schedule.total_steps=30", "--set",
                   "train.schedule.warmup_steps=2", "--set", "train.checkpoint.every=10", "--set", "train.eval_every=20",
                   "--set", "train.log_every=5")
    run = _watch(cluster, proc)
    again = _result(run["output"])
    assert again["run_id"] == res["run_id"]
    assert again["metrics"]["step"] == 30 and again["metrics"]["resumed_from_step"] == 20, again["metrics"]
    assert sorted(set(run["workers"].values())) == ["ray", "ray_worker_1"], run["workers"]


@pytest.mark.integration
def test_kill_node_takes_the_whole_tree_and_the_node_comes_back(
    cluster: dict[str, str], first_run: dict[str, Any]
) -> None:
    """kill_node.sh (the fault primitive for later tests): node gone, head notices, restart joins."""
    state = Path(cluster["STATE"])
    pid = int((state / "ray_worker_1.pid").read_text())
    tree = [pid, *(p.pid for p in _tree(pid))]
    assert len(tree) >= 3, "the worker node should run a raylet and agents under `ray start`"
    out = subprocess.run(["bash", str(ROOT / "infra/local/kill_node.sh"), "1"], env=cluster, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    assert set(tree) <= {int(p) for p in out.split()}, (tree, out)
    import psutil

    assert not [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    old = {n["node_id"] for n in _ray_list(cluster, "nodes") if "node_1" in n["resources_total"]}
    t0 = time.monotonic()
    while time.monotonic() - t0 < 90:
        states = {n["node_id"]: n["state"] for n in _ray_list(cluster, "nodes") if n["node_id"] in old}
        if set(states.values()) == {"DEAD"}:
            break
        time.sleep(1)
    assert set(states.values()) == {"DEAD"}, f"the head still lists the killed node as alive: {states}"
    print(f"head marked the killed node DEAD after {time.monotonic() - t0:.1f}s")
    subprocess.run(["bash", str(ROOT / "infra/local/start_worker_node.sh"), "1"], env=cluster, check=True,
                   timeout=240)
    alive = [n for n in _ray_list(cluster, "nodes") if "node_1" in n["resources_total"] and n["state"] == "ALIVE"]
    assert len(alive) == 1 and alive[0]["node_id"] not in old, alive


def _newest_checkpoint_after(env: dict[str, str], since: float, world: int | None = None) -> str | None:
    """Key of a commit marker written to the run storage after `since` (epoch s) by `world` ranks
    (any number when None), if any."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"runs/{RECIPE}/")
    for page in pages:
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/complete.json") and "/checkpoints/step" in obj["Key"] \
                    and obj["LastModified"].timestamp() > since:
                if world is None:
                    return obj["Key"]
                try:
                    marker = json.loads(s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read())
                except s3.exceptions.NoSuchKey:  # pruned (keep_checkpoints) since it was listed
                    continue
                if marker.get("world_size") == world:
                    return obj["Key"]
    return None


def _wait_for_checkpoint(env: dict[str, str], proc: subprocess.Popen[str], since: float,
                         world: int | None = None) -> str:
    deadline, marker = time.monotonic() + 240, None
    while marker is None and time.monotonic() < deadline and proc.poll() is None:
        marker = _newest_checkpoint_after(env, since, world)
        time.sleep(0.5)
    if marker is None:
        state = "still running" if proc.poll() is None else f"exited {proc.returncode}"
        status = subprocess.run([str(VENV_BIN / "ray"), "status", "-v"], env=env, capture_output=True, text=True,
                                timeout=120).stdout
        actors = [(a.get("class_name"), a.get("state"), a.get("node_id", "")[:8]) for a in _ray_list(env, "actors")
                  if a.get("state") != "DEAD"]
        print(f"ray status:\n{status}\nlive actors: {actors}")
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate(timeout=60)[0]
        raise AssertionError(f"no checkpoint was committed before the deadline (job {state}); job output:\n"
                             f"{out[-8000:]}")
    return marker


# Long enough that the 1-rank phase outlasts the grow-back: restarting the node (~10-15 s), the
# autoscaling coordinator's next look at the cluster (Ray ticks it every 20 s) and the next elastic
# check (elastic_resize_s=5) can take ~45 s, in which the 1-rank group did 40 to 130 steps here. At
# 200 steps the run could end at 1 rank before the coordinator saw the node (CI, session 5).
ELASTIC_STEPS = 400


@pytest.mark.integration
def test_elastic_run_survives_losing_the_worker_node(cluster: dict[str, str], digits_url: str) -> None:
    """--workers 1-2: the worker node is killed (whole process tree) after the first checkpoint; Ray
    Train restarts the group on the head alone, the Trainer reshards the 2-rank ZeRO-1 state for 1
    rank and doubles accumulation (same global batch); once the shrunk group has checkpointed, the
    node comes back, the group grows to 2 again (resharded 1 -> 2) and the run finishes its steps.
    group_start_timeout_s=20: Ray's first restart asks for 2 workers on a view that still counts the
    dead node and gives up after 20 s instead of its default 60 s. Micro-batch 128 (global 256): the
    1-rank phase must outlast the node's restart and the grow decision (~35 s under this load); at
    the recipe's 32 it ran its ~385 steps in 24 s once the loader got faster, and the run ended
    before the node was back."""
    proc = _submit(cluster, "--data", digits_url, "--storage", cluster["VITSCALE_STORAGE"], "--workers", "1-2",
                   "--no-register", "--set", f"train.schedule.total_steps={ELASTIC_STEPS}", "--set", "train.schedule.warmup_steps=2",
                   "--set", "train.micro_batch=128", "--set", "train.global_batch=256",
                   "--set", "train.checkpoint.every=5", "--set", f"train.eval_every={ELASTIC_STEPS}",
                   "--set", "train.log_every=5", "--set", "resources.elastic_resize_s=5", "--set", "resources.group_start_timeout_s=20")
    t0 = time.time()
    try:
        # The group may start with 1 rank when the worker node's CPU is not free yet (it then
        # grows to 2): kill the node only once 2 ranks have committed a checkpoint.
        first = _wait_for_checkpoint(cluster, proc, time.time() - 5, world=2)
        subprocess.run(["bash", str(ROOT / "infra/local/kill_node.sh"), "1"], env=cluster, check=True,
                       capture_output=True, text=True, timeout=60)
        killed_at = time.time()
        shrunk = _wait_for_checkpoint(cluster, proc, killed_at + 1, world=1)  # written by the 1-rank group
    finally:
        back = subprocess.run(["bash", str(ROOT / "infra/local/start_worker_node.sh"), "1"], env=cluster,
                              capture_output=True, text=True, timeout=240)
    back_at = time.time()
    assert back.returncode == 0, f"the worker node did not come back:\n{back.stderr[-3000:]}"
    # Grown while the run is still going: a checkpoint by 2 ranks after the node is back.
    grown = _wait_for_checkpoint(cluster, proc, back_at, world=2)
    grown_s = time.time() - back_at
    grown_at = time.time()
    run = _watch(cluster, proc, timeout=600)
    m = _result(run["output"])["metrics"]
    print(f"elastic phases (s from submit): killed {killed_at - t0:.0f}, node back {back_at - t0:.0f}, "
          f"grown {grown_at - t0:.0f}, finished {time.time() - t0:.0f}")
    # The recipe's start-up timeout reached Ray Train's controller (through its environment).
    waits = re.findall(r"startup timed out after ([\d.]+) seconds", run["output"])
    assert set(waits) <= {"20.0"}, waits
    print(f"elastic: {len(waits)} start-up timeout line(s); killed after {first}, shrunk group wrote {shrunk}, grown group wrote {grown} "
          f"<= {grown_s:.0f}s after the node was back, finished {time.time() - killed_at:.0f}s after the kill: {m}")
    assert m["step"] == ELASTIC_STEPS, m
    # Both the shrink (2 -> 1) and the grow (1 -> 2) were counted; a group that started with 1 rank
    # and grew before the kill adds a third change, and a start-up timeout on the way adds restarts.
    assert m["world_size"] == 2 and m["fault/world_size_changes"] >= 2 and m["fault/restarts"] >= 2, m


def _progress_step(env: dict[str, str], since: float) -> int:
    """The step of the newest progress record (rank 0, at every log line) written after `since`."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    best = (0.0, -1)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"runs/{RECIPE}/"):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/checkpoints/progress.json") and obj["LastModified"].timestamp() > since:
                step = int(json.loads(s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read())["step"])
                best = max(best, (obj["LastModified"].timestamp(), step))
    return best[1]


def _wait_for_progress(env: dict[str, str], proc: subprocess.Popen[str], since: float, step: int) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if _progress_step(env, since) >= step:
            return
        time.sleep(0.5)
    out = proc.communicate(timeout=60)[0] if proc.poll() is not None else "(still running)"
    raise AssertionError(f"the job did not reach step {step}:\n{out[-6000:]}")


def _actor_on(env: dict[str, str], node: str) -> Any:
    """The RayTrainWorker actor process under `node`'s `ray start` (not its DataLoader forks)."""
    pid = int((Path(env["STATE"]) / f"{node}.pid").read_text())
    workers = [p for p in _tree(pid) if "RayTrainWorker" in _cmd(p)]
    pids = {p.pid for p in workers}
    actors = [p for p in workers if p.ppid() not in pids]
    assert len(actors) == 1, [(p.pid, _cmd(p)) for p in workers]
    return actors[0]


def _commit_steps(env: dict[str, str], run_id: str) -> set[int]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=f"runs/{RECIPE}/{run_id}/checkpoints/") for o in page.get("Contents", [])]
    return {int(m.group(1)) for k in keys if (m := re.search(r"/step(\d+)/complete\.json$", k))}


def _submit_no_checkpoints(cluster: dict[str, str], digits_url: str, total_steps: int) -> subprocess.Popen[str]:
    """2 ranks, a progress record every 2 steps, no periodic checkpoint or eval: every checkpoint
    the run writes comes from a preemption."""
    return _submit(cluster, "--data", digits_url, "--storage", cluster["VITSCALE_STORAGE"], "--workers", "2",
                   "--no-register", "--set", f"train.schedule.total_steps={total_steps}", "--set", "train.schedule.warmup_steps=2",
                   "--set", "train.checkpoint.every=1000", "--set", "train.eval_every=1000",
                   "--set", "train.log_every=2", "--set", "resources.max_failures=2")


@pytest.mark.integration
def test_sigterm_under_ray_job_submit_checkpoints_and_resumes(cluster: dict[str, str], digits_url: str) -> None:
    """Under `ray job submit` the Trainer runs in a thread of Ray Train's worker actor, where Python
    cannot install a signal handler: the handler is installed by the actor's main thread. A real
    SIGTERM to the rank on the worker node: both ranks save the current step together, the signalled
    worker exits 0, Ray Train restarts the group from that checkpoint and the run finishes, having
    recomputed nothing."""
    since = time.time() - 1
    proc = _submit_no_checkpoints(cluster, digits_url, total_steps=40)
    try:
        _wait_for_progress(cluster, proc, since, 6)
        victim = _actor_on(cluster, "ray_worker_1")
        victim.send_signal(signal.SIGTERM)
        run = _watch(cluster, proc, timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, res = run["output"], _result(run["output"])
    m = res["metrics"]
    said = re.search(r"rank (\d): SIGTERM at step (\d+)", out)
    assert said, f"no SIGTERM line from the signalled rank:\n{out[-6000:]}"
    rank = said.group(1)
    saved = re.search(rf"rank {rank}: preempted \(SIGTERM\): checkpoint step(\d+) saved at step (\d+)", out)
    assert saved, f"no preemption checkpoint line from rank {rank}:\n{out[-6000:]}"
    other = re.search(rf"rank {1 - int(rank)}: stopped at step {saved.group(2)} because another rank was preempted", out)
    assert other, f"the other rank did not stop at the same step:\n{out[-6000:]}"
    stop = int(saved.group(2))
    assert int(said.group(2)) <= stop <= int(said.group(2)) + 2, (said.group(0), saved.group(0))
    steps = _commit_steps(cluster, res["run_id"])
    assert stop in steps, steps  # a checkpoint of the step the signal interrupted (not a periodic one)
    assert m["step"] == 40 and m["resumed_from_step"] == stop, m
    assert m["fault/preemptions"] >= 1 and m["fault/restarts"] >= 1 and m["fault/lost_steps"] == 0, m
    assert not victim.is_running() or victim.status() == "zombie"


TOTAL_DRAIN = 1000


@pytest.mark.integration
def test_ray_drain_notice_saves_just_in_time_and_the_run_finishes(cluster: dict[str, str], digits_url: str) -> None:
    """Ray Train's own preemption machinery: the worker node is drained for PREEMPTION with a 20 s
    deadline (what the autoscaler does on a spot reclaim; here `ray drain-node`). Every rank saves a
    checkpoint as soon as the notice reaches it, trains on, saves once more just before the deadline
    and holds; the node is reclaimed at the deadline, a new one joins, and the restarted group resumes
    from that last save, recomputing at most the step in flight."""
    since = time.time() - 1
    # Long enough to outlast the notice's 20 s deadline: 300 steps once finished before it (a
    # faster loader), leaving nothing to reclaim.
    proc = _submit_no_checkpoints(cluster, digits_url, total_steps=TOTAL_DRAIN)
    try:
        _wait_for_progress(cluster, proc, since, 4)
        node = [n["node_id"] for n in _ray_list(cluster, "nodes")
                if "node_1" in n["resources_total"] and n["state"] == "ALIVE"]
        assert len(node) == 1, node
        drain_started = time.time()
        subprocess.run([str(VENV_BIN / "ray"), "drain-node", "--address", cluster["VITSCALE_RAY_GCS"],
                        "--node-id", node[0], "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message",
                        "spot reclaim (test)", "--deadline-remaining-seconds", "20"], env=cluster, check=True,
                       timeout=60)
        drained_at = time.time()
        # From before the command: the notice can reach the ranks and their save finish before
        # `ray drain-node` itself has exited (CI saw it). S3 times are whole seconds, hence the 1 s.
        first = _wait_for_checkpoint(cluster, proc, drain_started - 1)
        # The platform reclaims the node at its deadline; a replacement node joins later.
        time.sleep(max(drained_at + 20 - time.time(), 0))
        subprocess.run(["bash", str(ROOT / "infra/local/kill_node.sh"), "1"], env=cluster, check=True,
                       capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["bash", str(ROOT / "infra/local/start_worker_node.sh"), "1"], env=cluster, timeout=240)
    run = _watch(cluster, proc, timeout=400)
    out, res = run["output"], _result(run["output"])
    m = res["metrics"]
    saves = [int(x) for x in re.findall(r"rank 0: preemption notice: checkpoint step(\d+) complete", out)]
    print(f"drain: notice saves at steps {saves}; {m}")
    assert len(saves) == 2 and saves[0] < saves[1], f"expected a save at the notice and one before the deadline:\n" \
                                                      f"{out[-6000:]}"
    # Both saves are committed and kept (keep_checkpoints=3: the two and the final step). Pruning
    # once deleted step{saves[0]} here: rank 0 had moved to a node whose staging copy of it had no
    # marker (training.checkpoint.prune now asks the store).
    assert any(first.endswith(f"/step{s}/complete.json") for s in saves), (first, saves)  # before the deadline
    assert {*saves} <= _commit_steps(cluster, res["run_id"])
    assert m["step"] == TOTAL_DRAIN and m["resumed_from_step"] == saves[1], m
    # After the save just before the deadline the ranks hold for the reclaim (training.preempt), so
    # the restart recomputes at most the step in flight: far fewer than the steps since the notice,
    # which one save at the notice (Ray's recipe) would recompute. (Training on after that save once
    # lost 47 steps here on a busy box.)
    assert m["fault/preemptions"] == 1 and m["fault/restarts"] == 1, m
    assert 0 <= m["fault/lost_steps"] < (saves[1] - saves[0]) / 2, (saves, m)
