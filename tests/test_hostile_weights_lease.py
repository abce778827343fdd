"""Issue #32 findings 7, 8, 9 (part) and issue #30 item 5: hostile weight files, the run lease,
and what a private Ray instance leaves behind.

* Weights: a file's config is checked against its tensors (the safetensors header) and a size
  bound before the model is allocated; int8 tensors and a position embedding for another grid
  are refused unless the caller asks for that conversion (finetune.py asks, for --image-size).
* Lease: a holder on this host whose pid is dead is stale at once; an absurd expiry is stale; a
  malformed lease is one line, not a traceback; the lease is taken before Ray starts.
* Ray: a private instance started next to another head prints no "multiple active Ray
  instances" traceback, leaves no session folder and no token folder, and its processes end
  with the job (folders of a killed earlier driver are swept by the next start).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from model import create_model
from model.weights import load_weights, read_config, save_weights
from orchestration.launch.lease import Lease, LeaseHeldError, hold_run_lease
from orchestration.tracking import load_model

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _save_with_config(sd: dict[str, torch.Tensor], cfg: dict[str, Any], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"vitscale.config": json.dumps(cfg)})
    return path


# ------------------------------------------------------------------------------ weights (finding 7)

# Loads the file under an address-space limit a little above what the interpreter already maps:
# a loader that builds the declared 51.5 GB model fails with "can't allocate" instead of paging.
_LOAD_UNDER_LIMIT = """
import json, resource, sys, time
from pathlib import Path
from orchestration.tracking import load_model
load_model(sys.argv[2])  # an honest file first: every lazy import is done before the limit
vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
t = time.monotonic()
try:
    load_model(sys.argv[1])
    out = {'ok': True}
except BaseException as e:
    out = {'ok': False, 'type': type(e).__name__, 'msg': str(e)[:2000]}
out['s'] = time.monotonic() - t
print('RESULT ' + json.dumps(out))
"""


def test_config_claiming_a_huge_model_is_refused_before_allocation(tmp_path: Path) -> None:
    """Finding 7: a tiny file whose config says width 65536 / mlp 262144 (51.5 GB of fp32)."""
    small = create_model("mu/8", num_classes=5, image_size=32)
    cfg = {**dataclasses.asdict(small.cfg), "width": 65536, "mlp_dim": 262144, "heads": 16}
    path = _save_with_config(small.state_dict(), cfg, tmp_path / "hostile.safetensors")
    assert path.stat().st_size < 200_000
    save_weights(small, tmp_path / "honest.safetensors")
    proc = subprocess.run([sys.executable, "-c", _LOAD_UNDER_LIMIT, str(path), str(tmp_path / "honest.safetensors")],
                          env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(line[-1].removeprefix("RESULT "))
    assert res["type"] == "ValueError", res  # not a failed 51.5 GB allocation
    assert "do not match the config" in res["msg"] and "width 65536" in res["msg"], res
    assert "patch_embed.proj.weight: checkpoint has shape (32, 3, 8, 8), model expects (65536, 3, 8, 8)" in res["msg"]


def test_depth_and_size_bounds_are_checked_from_the_header(tmp_path: Path) -> None:
    from model.weights import check_weights_file

    small = create_model("mu/8", num_classes=5, image_size=32)
    deep = _save_with_config(small.state_dict(), {**dataclasses.asdict(small.cfg), "depth": 10**9},
                             tmp_path / "deep.safetensors")
    t = time.monotonic()
    with pytest.raises(ValueError, match=r"declares depth 1000000000 but the file holds 2 blocks"):
        load_model(str(deep))  # a meta build of 10**9 blocks would never end
    assert time.monotonic() - t < 5
    honest = tmp_path / "honest.safetensors"
    save_weights(small, honest)
    with pytest.raises(ValueError, match=r"needs 0\.0 GiB, more than the 0\.0 GiB allowed"):
        check_weights_file(honest, small.cfg, max_bytes=1000)
    check_weights_file(honest, small.cfg)  # fits this machine


def test_int8_weights_are_refused_unless_a_cast_is_asked_for(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Finding 7: int8 tensors were cast to float silently."""
    m = create_model("mu/8", num_classes=5, image_size=32)
    sd = {k: (v * 10).to(torch.int8) if k.startswith("blocks.") else v for k, v in m.state_dict().items()}
    path = _save_with_config(sd, dataclasses.asdict(m.cfg), tmp_path / "int8.safetensors")
    with pytest.raises(ValueError, match=r"not floating point \(int8 -> float32: \['blocks\.0\..*allow_cast=True"):
        load_model(str(path))
    with pytest.raises(ValueError, match="not floating point"):
        load_weights(create_model("mu/8", num_classes=5, image_size=32), path)
    with caplog.at_level(logging.WARNING, logger="model.weights"):
        loaded = load_model(str(path), allow_cast=True)
    assert "cast" in caplog.text and "int8 -> float32" in caplog.text
    assert loaded.blocks[0].mlp.fc1.weight.dtype == torch.float32
    # Floating-point precisions are not conversions to ask for: bf16 loads into an fp32 model.
    bf16 = _save_with_config({k: v.to(torch.bfloat16) for k, v in m.state_dict().items()},
                             dataclasses.asdict(m.cfg), tmp_path / "bf16.safetensors")
    assert load_model(str(bf16)).pos_embed.dtype == torch.float32


def test_pos_embed_for_another_grid_needs_allow_resample(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Finding 7: a pos_embed for another grid was resampled silently (inside a file that claims
    32 px, and into any model)."""
    big = create_model("mu/8", num_classes=5, image_size=48)  # 6x6 grid
    small_cfg = dataclasses.asdict(create_model("mu/8", num_classes=5, image_size=32).cfg)  # 4x4
    lying = _save_with_config(big.state_dict(), small_cfg, tmp_path / "lying.safetensors")
    with pytest.raises(ValueError, match=r"pos_embed: checkpoint is for a 6x6 patch grid.*4x4.*allow_resample=True"):
        load_model(str(lying))
    file48 = tmp_path / "m48.safetensors"
    save_weights(big, file48)
    with pytest.raises(ValueError, match=r"6x6 patch grid.*allow_resample=True"):
        load_weights(create_model("mu/8", num_classes=5, image_size=32), file48)
    with caplog.at_level(logging.INFO, logger="model.weights"):
        m = load_weights(create_model("mu/8", num_classes=5, image_size=32), file48, allow_resample=True)
    assert "resampled pos_embed from a 6x6 to a 4x4 patch grid" in caplog.text
    assert m.pos_embed.shape == (1, 17, 32)


def test_finetune_stages_the_source_at_its_image_size(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The one legitimate resampling: finetune.py asks for it, once, and the workers' loader
    (build_model: load_weights(..., ignore_head=True), no conversion) gets the right grid."""
    from orchestration import finetune

    src = create_model("mu/8", num_classes=5, image_size=32)
    with caplog.at_level(logging.INFO):
        url = finetune._stage_weights(src, str(tmp_path / "init" / "w.safetensors"), 48)
    assert "resampled pos_embed from a 4x4 to a 6x6 patch grid" in caplog.text
    staged = read_config(url)
    assert staged is not None and staged.image_size == 48
    worker = load_weights(create_model("mu/8", num_classes=10, image_size=48), url, ignore_head=True)
    assert worker(torch.zeros(1, 3, 48, 48)).shape == (1, 10)


# ------------------------------------------------------------------------------ lease (finding 8)

_HOLD = ("import sys, time; from orchestration.launch.lease import Lease; "
         "Lease(sys.argv[1], run_id='r1', ttl_s=60).acquire(); print('held', flush=True); time.sleep(300)")


def test_holder_killed_on_this_host_is_stale_at_once(tmp_path: Path) -> None:
    """Finding 8: after kill -9 of the holder, the next run was told "another run is using it"
    until the ttl ran out."""
    prefix = str(tmp_path / "runs" / "r1")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, prefix], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()  # SIGKILL: no release, no atexit
        holder.wait(timeout=30)
    with pytest.raises(LeaseHeldError) as err:
        Lease(prefix, run_id="r1", ttl_s=60).acquire()
    msg = str(err.value)
    assert f"its process (pid {holder.pid}) is no longer running on this host" in msg and "--force" in msg
    assert "another run is using" not in msg
    taker = Lease(prefix, run_id="r1", ttl_s=60, force=True)
    taker.acquire()  # now, not after the 60 s ttl
    try:
        assert taker.read().token == taker.token
    finally:
        taker.release()


@pytest.mark.parametrize(("expires_at", "reason"), [
    (1e300, "not a usable lease (expires_at 1e+300 is not a time)"),
    (time.time() + 10 * 365 * 86400, "its expiry is more than 24 h away"),
    ("soon", "not a usable lease (expires_at 'soon' is not a time)"),
    (float("nan"), "not a usable lease (expires_at nan is not a time)"),
], ids=["1e300", "in-10-years", "soon", "nan"])
def test_absurd_or_malformed_lease_is_stale_and_reported_in_one_line(tmp_path: Path, expires_at: Any,
                                                                      reason: str) -> None:
    """Finding 8: expires_at 1e300 locked the folder for ever (even with --force) with a
    300-digit message; "soon" ended in a TypeError."""
    prefix = tmp_path / "runs" / "r1"
    prefix.mkdir(parents=True)
    bad = {"holder": "mallory@elsewhere pid 7", "run_id": "r1", "token": "t", "acquired_at": 1.0,
           "expires_at": expires_at, "ttl_s": 60.0}
    (prefix / "lease.json").write_text(json.dumps(bad))
    with pytest.raises(LeaseHeldError) as err:
        Lease(str(prefix), run_id="r1", ttl_s=60).acquire()
    msg = str(err.value)
    assert reason in msg and "--force" in msg and "\n" not in msg and len(msg) < 600, msg
    taker = Lease(str(prefix), run_id="r1", ttl_s=60, force=True)
    taker.acquire()
    taker.release()
    with pytest.raises(ValueError, match="ttl_s"):
        Lease(str(prefix), run_id="r1", ttl_s=1e300)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    from pipeline import write_dataset
    from pipeline.demo_data import make_digits_folder

    tmp = tmp_path_factory.mktemp("digits")
    folder = make_digits_folder(tmp / "folder", image_size=16, limit=100)
    write_dataset(folder, str(tmp / "ds"), val_fraction=0.2, samples_per_shard=100, workers=1, progress=False)
    return str(tmp / "ds")


@pytest.mark.parametrize("lease", ["live", "malformed"])
def test_lease_is_checked_before_ray_starts(tmp_path: Path, digits: str, lease: str, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Finding 8: Ray started (~20 s) before the lease was checked. A refused `--resume auto`
    exits 3 with one line and never reaches connect_ray."""
    import ray

    from orchestration import pretrain, tracking
    from orchestration.launch import cluster
    from pipeline.storage import url_join

    def tripwire(*_: Any, **__: Any) -> str:
        raise AssertionError("Ray would start now, before the lease was checked")

    monkeypatch.setattr(cluster, "connect_ray", tripwire)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "runs")
    run_id = tracking.start_run("lease-order", run_name="first", tags={}, uri=uri)
    tracking.end_run(run_id, "FINISHED", uri=uri)
    run_dir = url_join(storage, "vit_mu_smoke", run_id)
    (tmp_path / "runs" / "vit_mu_smoke").mkdir(parents=True)
    (tmp_path / "runs" / "vit_mu_smoke" / "latest_run.json").write_text(json.dumps({"run_id": run_id,
                                                                                    "run_dir": run_dir}))
    held = None
    if lease == "live":
        held = hold_run_lease(run_dir, run_id, ttl_s=60)
    else:
        Path(run_dir).mkdir(parents=True)
        (Path(run_dir) / "lease.json").write_text('{"holder": "x", "expires_at": "soon"}')
    try:
        rc = pretrain.main(["--recipe", "vit_mu_smoke", "--data", digits, "--storage", storage,
                            "--tracking-uri", uri, "--resume", "auto", "--experiment", "lease-order"])
    finally:
        if held is not None:
            held.release()
    err = capsys.readouterr().err
    assert rc == 3, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert ("lease.json is held by" if lease == "live" else "lease.json is not a usable lease") in lines[0], err
    assert not ray.is_initialized()
    assert tracking.client(uri).get_run(run_id).info.status == "FINISHED"


# ------------------------------------------------------------------- private Ray (finding 9, #30)

def test_sweep_removes_only_the_folders_of_gone_drivers(tmp_path: Path) -> None:
    """Finding 9: /tmp/vitscale-ray-auth-* token folders stayed for ever. The next private start
    removes what drivers that are gone left behind, and nothing of a live one."""
    from orchestration.launch.cluster import sweep_stale_private_folders
    from orchestration.launch.lease import host_id, process_started_at

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    me = {"pid": os.getpid(), "started_at": process_started_at(os.getpid()), "host_id": host_id()}
    host, boot, ns = host_id().split("|")
    owners = {
        "vitscale-ray-killed01": {**me, "pid": int(gone.stdout), "started_at": 1.0},
        "vitscale-ray-reboot01": {**me, "host_id": f"{host}|another-boot|{ns}"},
        "vitscale-ray-live0001": me,
        "vitscale-ray-elsewher": {**me, "pid": int(gone.stdout), "host_id": f"other-host|{boot}|{ns}"},
    }
    for name, owner in owners.items():
        (tmp_path / name).mkdir(mode=0o700)
        (tmp_path / name / "owner.json").write_text(json.dumps(owner))
    (tmp_path / "vitscale-ray-auth-old00001").mkdir(mode=0o700)  # an earlier version's token folder
    (tmp_path / "vitscale-ray-auth-old00001" / "auth_token").write_text("x" * 64)
    removed = sweep_stale_private_folders(str(tmp_path))
    assert sorted(p.name for p in removed) == ["vitscale-ray-auth-old00001", "vitscale-ray-killed01",
                                               "vitscale-ray-reboot01"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vitscale-ray-elsewher", "vitscale-ray-live0001"]


_DRIVER = """
import json, os, sys, time
import psutil
from orchestration.launch.cluster import connect_ray
print('RAY', connect_ray(), flush=True)
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

def loop() -> None:
    time.sleep(4)  # the PlacementGroupCleaner polls the state API every second meanwhile

TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
             run_config=RunConfig(name='t', storage_path=sys.argv[1])).fit()
kids = [(p.pid, p.create_time()) for p in psutil.Process().children(recursive=True)]
print('PIDS ' + json.dumps(kids), flush=True)
"""


@pytest.fixture()
def short_tmp() -> Iterator[Path]:
    """A short TMPDIR for the driver (Ray's socket paths below it must stay < 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="vt-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.integration
def test_private_ray_next_to_another_head_is_quiet_and_leaves_nothing(
        s3_endpoint: str, tmp_path: Path, short_tmp: Path) -> None:
    from conftest import local_services

    # What a driver killed with -9 left behind (its pid is gone), and an earlier version's token folder.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    from orchestration.launch.lease import host_id

    stale = short_tmp / "vitscale-ray-killed01"
    stale.mkdir(mode=0o700)
    (stale / "owner.json").write_text(json.dumps({"pid": int(gone.stdout), "started_at": 1.0, "host_id": host_id()}))
    (short_tmp / "vitscale-ray-auth-old00001").mkdir(mode=0o700)
    (short_tmp / "vitscale-ray-auth-old00001" / "auth_token").write_text("x" * 64)

    with local_services(tmp_path / "services", AWS_ENDPOINT_URL=s3_endpoint, VITSCALE_RAY_CPUS="1") as services:
        env = {k: v for k, v in _env().items() if not k.startswith("RAY_")}
        (tmp_path / "home").mkdir()
        env.update(TMPDIR=str(short_tmp), HOME=str(tmp_path / "home"))
        t = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path / "ray_results")], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=400)
        ended = time.monotonic()
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-6000:]
        assert "RAY local Ray instance" in out
        assert "multiple active Ray instances" not in out and "Traceback" not in out, out[-6000:]
        assert "Failed to query Ray Train Controller" not in out, out[-6000:]
        kids = json.loads(next(ln for ln in out.splitlines() if ln.startswith("PIDS ")).removeprefix("PIDS "))
        assert len(kids) >= 3  # gcs, raylet, agents, workers
        import psutil

        def alive() -> list[int]:
            left = []
            for pid, started in kids:
                try:
                    p = psutil.Process(pid)
                    if abs(p.create_time() - started) < 1 and p.status() != psutil.STATUS_ZOMBIE:
                        left.append(pid)
                except psutil.NoSuchProcess:
                    pass
            return left

        while alive() and time.monotonic() - ended < 5:
            time.sleep(0.2)
        assert not alive(), f"Ray processes outlived the job: {[psutil.Process(p).cmdline()[:1] for p in alive()]}"
        assert services["RAY_ADDRESS"]  # the other head was up all along
    leftovers = sorted(p.name for p in short_tmp.iterdir())
    assert not any(n == "ray" or n.startswith("vitscale-ray-") for n in leftovers), leftovers
    assert not (tmp_path / "home" / ".ray").exists()
    assert time.monotonic() - t < 300


@pytest.mark.integration
def test_a_second_private_ray_in_the_same_process_connects(short_tmp: Path) -> None:
    """Ray's core keeps the first auth token a process reads: a second private instance in the same
    process (a notebook, a test session) used to get a fresh token and fail with InvalidAuthToken."""
    script = ("import sys, ray\nsys.path.insert(0, sys.argv[1])\nfrom orchestration.launch.cluster import connect_ray\n"
              "for i in range(2):\n    connect_ray()\n    print('CPUS', ray.cluster_resources().get('CPU'), flush=True)\n"
              "    ray.shutdown()\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(short_tmp / "home"), "TMPDIR": str(short_tmp)}
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0 and proc.stdout.count("CPUS") == 2, (proc.stdout + proc.stderr)[-3000:]
    assert not (short_tmp / "home" / ".ray").exists()  # nothing under ~/.ray, either time
