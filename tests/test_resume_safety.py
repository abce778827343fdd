"""Resume safety (issue #12 items 1-3): no deadlock, no code from checkpoints, one run per folder.

* Deadlock: two gloo ranks sharing one node-local staging folder resume 5 times from
  checkpoints on moto S3 (through orchestration.launch.checkpoint_store.StorageCheckpointStore) while the
  download is slowed down after the marker lands and rank 1 arrives late: the race that hung
  `--resume auto` with 2 workers. Each resume is timed; failures and stalls fail every rank
  with a message instead of hanging. The worker side is this file's `main()`.
* Pickles: a checkpoint file whose unpickling would run code (`__reduce__` writing a marker
  file) is refused, both as client state and as DeepSpeed's model-state file, and the marker
  never appears.
* Lease: a second run on a run folder is refused naming the holder, a heartbeat keeps a lease
  live, an expired lease (its holder killed) needs --force, and a refused `--resume auto`
  launch leaves the first run's MLflow status alone.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RESUMES = 5


# ---------------------------------------------------------------------------- payload
class Evil:
    """Unpickling this runs `open(marker, 'w').write('pwned')`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def write_evil(path: Path, marker: Path) -> None:
    """A torch.save file (zip + pickle) whose unpickling writes `marker`."""
    torch.save({"module": Evil(marker)}, path)


# ---------------------------------------------------------------------------- worker side
def _slow_downloads(store: Any, delay: float) -> None:
    """Node-local rank 0's downloads: each file after the marker takes `delay` more seconds.

    Keys are listed in order and `complete.json` sorts first, so the marker lands early and the
    rest trickles in: the window in which a rank deciding on its own saw a "complete" checkpoint.
    """
    storage = store.storage
    real = storage.download_file

    def slow(key: str, local: Any) -> None:
        real(key, local)
        if not key.endswith("complete.json"):
            time.sleep(delay)

    storage.download_file = slow


def scenario_race(out: Path, bucket: str, rank: int) -> None:

    import torch.distributed as dist
    from test_training_dist import ListSink, MemLoader, make_cfg, make_model

    from orchestration.launch.checkpoint_store import StorageCheckpointStore
    from training import Trainer

    staging = out / "staging"  # node-local staging shared by both local ranks (one "node")
    store = StorageCheckpointStore(f"s3://{bucket}/runs/r1/checkpoints")
    cfg = make_cfg(1, **{"schedule.total_steps": 4, "checkpoint.every": 4, "checkpoint.io_timeout_s": 60.0})
    trainer = Trainer(make_model(), cfg, MemLoader(rank, 2), sink=ListSink(), checkpoint_dir=str(staging),
                      checkpoint_store=store)
    trainer.fit()
    saved = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    record: dict[str, Any] = {"resumes": []}
    if rank == 0:
        _slow_downloads(store, 0.25)
    for _ in range(RESUMES):
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # a fresh node: nothing staged yet
        dist.barrier()
        trainer.engine.module.apply(_scramble)
        if rank == 1:
            time.sleep(0.6)  # arrives after rank 0 has fetched the marker, mid-download
        t0 = time.monotonic()
        ok = trainer.restore("auto")
        same = all(torch.equal(v, saved[k]) for k, v in trainer.engine.module.state_dict().items())
        files = sorted(p.name for p in (staging / "step4").iterdir())
        record["resumes"].append({"ok": ok, "step": trainer.step, "seconds": time.monotonic() - t0,
                                  "weights_restored": same, "files": files})
        dist.barrier()  # both have looked at the staged copy before rank 0 wipes it
    record["two_nodes"] = _two_nodes(out, store, rank, cfg)  # before the store is damaged below
    record["download_failure"] = _failed_download(trainer, store, rank, staging)
    record["evil"] = _evil_checkpoint(trainer, store, rank, staging, out / f"pwned_r{rank}")
    record["stuck_rank"] = _stuck_rank(trainer, rank, cfg)  # last: a timed-out collective spoils the group
    (out / f"race_r{rank}.json").write_text(json.dumps(record))
    # The spoiled gloo group still has a worker thread waiting on the timed-out collective; tearing
    # it down at interpreter exit may std::terminate (SIGABRT, seen in CI under load). Everything
    # this scenario checks is in the record: leave without running destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _two_nodes(out: Path, store: Any, rank: int, cfg: Any) -> dict[str, Any]:
    """Each rank on its own "node" (local rank 0, its own staging root): each must check and load
    the copy its node staged, not rank 0's path (which does not exist on another machine)."""
    from test_training_dist import ListSink, MemLoader, make_model

    from training import Trainer

    before = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    root = out / f"node{rank}"
    try:
        trainer = Trainer(make_model(), cfg, MemLoader(rank, 2), sink=ListSink(), checkpoint_dir=str(root),
                          checkpoint_store=store)
    finally:
        os.environ["LOCAL_RANK"] = before or "0"
    checked: list[str] = []
    real = trainer.checkpoints._check
    trainer.checkpoints._check = lambda tag_dir, c: (checked.append(str(tag_dir)), real(tag_dir, c))[1]
    ok = trainer.restore("auto")
    return {"ok": ok, "step": trainer.step, "checked": checked, "root": str(root)}


def _scramble(m: torch.nn.Module) -> None:
    """Overwrite weights so a restore that loads nothing cannot pass for one that did."""
    for p in m.parameters(recurse=False):
        p.data.fill_(0.123)


def _expect_error(fn: Any) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded for the test side
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - t0}
    return {"error": None, "seconds": time.monotonic() - t0}


def _failed_download(trainer: Any, store: Any, rank: int, staging: Path) -> dict[str, Any]:
    """Node-local rank 0's download raises: both ranks raise (none waits for the other)."""
    import torch.distributed as dist

    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)

        def broken(key: str, local: Any) -> None:
            raise OSError(f"injected: connection reset while downloading {key}")

        real, store.storage.download_file = store.storage.download_file, broken
    dist.barrier()
    res = _expect_error(lambda: trainer.restore("auto"))
    if rank == 0:
        store.storage.download_file = real
    return res


def _evil_checkpoint(trainer: Any, store: Any, rank: int, staging: Path, marker: Path) -> dict[str, Any]:
    """DeepSpeed's model-state file in the store replaced by a code-running pickle: caught by its
    checksum; then with complete.json forged to match it (whoever can write the store can), the
    safe unpickler still refuses it."""
    import hashlib

    import torch.distributed as dist

    evil = staging.parent / "evil.pt"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        write_evil(evil, marker)
        store.storage.upload_file(evil, "step4/mp_rank_00_model_states.pt")
    dist.barrier()
    res = _expect_error(lambda: trainer.restore("auto"))
    res["checksum_error"] = res.pop("error")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        committed = json.loads(store.read_text("step4/complete.json"))
        committed["files"]["mp_rank_00_model_states.pt"] = {
            "size": evil.stat().st_size, "sha256": hashlib.sha256(evil.read_bytes()).hexdigest()}
        store.write_text("step4/complete.json", json.dumps(committed))
    dist.barrier()
    res.update(_expect_error(lambda: trainer.restore("auto")))
    res["marker_written"] = marker.exists()
    return res


def _stuck_rank(trainer: Any, rank: int, cfg: Any) -> dict[str, Any]:
    """Rank 1 never shows up within io_timeout_s: rank 0 fails with a message, no hang."""

    trainer.cfg = cfg.replace(**{"checkpoint.io_timeout_s": 2.0})
    if rank == 1:
        time.sleep(4.0)
    return _expect_error(lambda: trainer.restore("auto"))


def main() -> None:
    scenario, out, bucket = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    assert scenario == "race", scenario
    scenario_race(out, bucket, int(os.environ["RANK"]))


# ---------------------------------------------------------------------------- test side
@pytest.fixture(scope="module")
def race(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> list[dict[str, Any]]:
    """Run the 2-rank race scenario once; returns both ranks' records."""
    import uuid

    import boto3

    bucket = f"race-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    out = tmp_path_factory.mktemp("race")
    from conftest import spawn_ranks

    logs = [out / f"race_r{rank}.log" for rank in range(2)]
    procs = spawn_ranks([__file__, "race", str(out), bucket], 2, lambda rank: logs[rank])
    deadline = time.monotonic() + 240  # the old code hung here (rank 0 in barrier, rank 1 in broadcast)
    for p, log in zip(procs, logs, strict=True):
        try:
            code = p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"resume hung; log:\n{log.read_text()[-3000:]}") from None
        assert code == 0, f"worker failed ({code}):\n{log.read_text()[-4000:]}"
    return [json.loads((out / f"race_r{r}.json").read_text()) for r in range(2)]


@pytest.mark.integration
def test_resume_race_does_not_deadlock(race: list[dict[str, Any]]) -> None:
    """5 resumes with a slow download and a late rank: every one completes, on both ranks,
    with the weights of step 4 and a complete staged copy."""
    for rank, rec in enumerate(race):
        assert len(rec["resumes"]) == RESUMES
        for r in rec["resumes"]:
            assert r["ok"] and r["step"] == 4 and r["weights_restored"], (rank, r)
            assert r["seconds"] < 45, (rank, r)
            assert "complete.json" in r["files"] and "trainer_rank0.json" in r["files"], r["files"]
            assert "trainer_rank1.json" in r["files"] and "mp_rank_00_model_states.pt" in r["files"], r["files"]


@pytest.mark.integration
def test_each_node_loads_its_own_staged_copy(race: list[dict[str, Any]]) -> None:
    """Two nodes with their own staging roots: every rank checks the checkpoint under its node's
    root (the old code sent rank 0's absolute path to every rank)."""
    for rank, rec in enumerate(race):
        two = rec["two_nodes"]
        assert two["ok"] and two["step"] == 4, (rank, two)
        assert two["checked"] == [str(Path(two["root"]) / "step4")], (rank, two)


@pytest.mark.integration
def test_failed_download_fails_every_rank(race: list[dict[str, Any]]) -> None:
    r0, r1 = race[0]["download_failure"], race[1]["download_failure"]
    assert r0["error"] is not None and "injected: connection reset" in r0["error"], r0
    assert r1["error"] is not None and "failed on rank(s) [0]" in r1["error"], r1
    assert "injected: connection reset" in r1["error"], r1
    assert r0["seconds"] < 30 and r1["seconds"] < 30


@pytest.mark.integration
def test_tampered_deepspeed_file_is_refused_on_every_rank(race: list[dict[str, Any]]) -> None:
    for rank, rec in enumerate(race):
        evil = rec["evil"]
        assert evil["marker_written"] is False, f"rank {rank} ran the checkpoint's code"
        assert "CheckpointDamaged" in evil["checksum_error"], evil
        assert "step4/mp_rank_00_model_states.pt" in evil["checksum_error"], evil
        assert "recorded at commit" in evil["checksum_error"], evil
        assert evil["error"] is not None and "mp_rank_00_model_states.pt" in evil["error"], evil
        assert "outside the allow-list" in evil["error"], evil


@pytest.mark.integration
def test_a_stuck_rank_times_out_with_a_message(race: list[dict[str, Any]]) -> None:
    stuck = race[0]["stuck_rank"]
    assert stuck["error"] is not None and "CollectiveTimeout" in stuck["error"], stuck
    assert "did not complete within 2 s" in stuck["error"] and "io_timeout_s" in stuck["error"], stuck
    assert stuck["seconds"] < 10, stuck


def test_malicious_client_state_is_refused(tmp_path: Path) -> None:
    """A code-running pickle in place of the client state (and of any .pt) is never unpickled."""
    from training import checkpoint as ckpt

    marker = tmp_path / "pwned"
    control = tmp_path / "control.pt"
    write_evil(control, marker)
    torch.load(control, weights_only=False)  # the payload is real: plain unpickling runs it
    assert marker.read_text() == "pwned"
    marker.unlink()

    tag = tmp_path / "step10"
    tag.mkdir()
    write_evil(tag / ckpt.rank_file(0), marker)  # the client-state file the Trainer reads
    write_evil(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(ValueError, match="not valid JSON"):
        ckpt.load_rank_state(tag, 0)
    with pytest.raises(ckpt.UnsafeCheckpointError, match="outside the allow-list"):
        ckpt.scan_checkpoint(tag)
    with pytest.raises(ckpt.UnsafeCheckpointError, match="zero_pp_rank_0"):
        ckpt.safe_torch_load(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    # The same payload as a bare pickle and in torch's legacy (non-zip) format.
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(pickle.dumps({"x": Evil(marker)}))
    with pytest.raises(ckpt.UnsafeCheckpointError, match="outside the allow-list"):
        ckpt.scan_checkpoint(tag)
    torch.save({"x": Evil(marker)}, tag / "mp_rank_00_model_states.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(ckpt.UnsafeCheckpointError, match="mp_rank_00_model_states"):
        ckpt.scan_checkpoint(tag)
    assert not marker.exists()


def test_client_state_round_trips_as_json(tmp_path: Path) -> None:
    import random

    import numpy as np

    from training import checkpoint as ckpt

    ckpt.save_rank_state(tmp_path, 3, {"step": 7, "loader": {"epoch": 1}, "rng": ckpt.rng_state(),
                                       "config": {"lr": 0.1}, "config_hash": "abc"})
    a = (random.random(), np.random.rand(), torch.rand(2))
    state = json.loads((tmp_path / "trainer_rank3.json").read_text())  # plain JSON on disk
    ckpt.set_rng_state(ckpt.load_rank_state(tmp_path, 3)["rng"])
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert state["step"] == 7 and a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


# ---------------------------------------------------------------------------- lease
@pytest.fixture(params=["local", "s3"])
def lease_prefix(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "runs" / "r1")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/r1"


def test_second_run_is_refused_naming_the_holder(lease_prefix: str) -> None:
    from orchestration.launch.lease import Lease, LeaseHeldError

    first = Lease(lease_prefix, run_id="r1", holder="alice@node1 pid 11", ttl_s=1.5)
    first.acquire()
    try:
        time.sleep(2.2)  # longer than the ttl: only the heartbeat keeps it live
        second = Lease(lease_prefix, run_id="r1", holder="bob@node2 pid 22", ttl_s=1.5, force=True)
        with pytest.raises(LeaseHeldError, match=r"held by alice@node1 pid 11 \(run r1.*expires in"):
            second.acquire()  # a live lease is not taken over, not even with --force
        assert first.read().holder == "alice@node1 pid 11"
    finally:
        assert first.release() is True
    assert first.read() is None
    third = Lease(lease_prefix, run_id="r1", holder="carol", ttl_s=1.5)
    third.acquire()  # released: free again
    third.release()


def test_expired_lease_needs_force(lease_prefix: str) -> None:
    """The holder is killed (no release): its lease expires; takeover only with force, and the
    old holder, if it comes back, finds it lost."""
    from orchestration.launch.lease import Lease, LeaseHeldError

    code = (
        "import os, sys; from orchestration.launch.lease import Lease; "
        f"Lease({lease_prefix!r}, run_id='r1', holder='dead@node pid 1', ttl_s=1.0).acquire(); os._exit(0)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
    time.sleep(1.2)
    with pytest.raises(LeaseHeldError, match=r"held by dead@node pid 1 .*expired .*rerun with --force"):
        Lease(lease_prefix, run_id="r1", holder="bob", ttl_s=5).acquire()
    taker = Lease(lease_prefix, run_id="r1", holder="bob", ttl_s=5, force=True)
    taker.acquire()
    try:
        assert taker.read().holder == "bob"
        stale = Lease(lease_prefix, run_id="r1", holder="dead@node pid 1", ttl_s=1.0)
        stale.token = "not-the-winner"  # a stalled holder's next heartbeat
        stale._etag = "0" * 32
        assert stale.renew() is False and stale.lost
        assert taker.read().holder == "bob"
    finally:
        taker.release()


def test_racing_acquires_have_one_winner(tmp_path: Path) -> None:
    from orchestration.launch.lease import Lease, LeaseHeldError

    prefix = str(tmp_path / "runs" / "r1")
    wins: list[str] = []
    refused: list[str] = []

    def go(i: int) -> None:
        try:
            Lease(prefix, run_id="r1", holder=f"h{i}", ttl_s=30).acquire()
            wins.append(f"h{i}")
        except LeaseHeldError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(refused) == 7
    assert all(f"held by {wins[0]} " in m for m in refused)


@pytest.mark.integration
def test_refused_resume_leaves_the_running_run_alone(tmp_path: Path) -> None:
    """A second `--resume auto` launch while the first holds the run folder: refused before the
    MLflow run, Ray or the checkpoints are touched; the run's status stays what it was."""
    from orchestration import pretrain, tracking
    from orchestration.experiment import get_recipe
    from orchestration.launch.lease import LeaseHeldError, hold_run_lease
    from pipeline.storage import open_storage, url_join

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = str(tmp_path / "runs")
    exp = get_recipe("vit_mu_smoke")
    run_id = tracking.start_run("lease-test", run_name="first", tags={}, uri=uri)
    tracking.end_run(run_id, "FINISHED", uri=uri)
    run_dir = url_join(storage, exp.name, run_id)
    open_storage(url_join(storage, exp.name)).write_bytes(
        "latest_run.json", json.dumps({"run_id": run_id, "run_dir": run_dir}).encode())
    holder = hold_run_lease(run_dir, run_id, ttl_s=30)
    try:
        with pytest.raises(LeaseHeldError, match=f"held by .*run {run_id}"):
            pretrain.launch(exp, data_url=str(tmp_path / "no-data"), storage=storage, uri=uri,
                            experiment="lease-test", run_name="second", resume="auto", register=False)
        assert tracking.client(uri).get_run(run_id).info.status == "FINISHED"
    finally:
        holder.release()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
