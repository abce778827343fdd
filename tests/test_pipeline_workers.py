"""pipeline/ loader with real DataLoader worker processes: coverage, resume, re-sharding."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import DataConfig, IOConfig, SourceConfig, build_loader, write_dataset
from pipeline.demo_data import decode_index, make_digits_folder, make_index_folder

pytestmark = pytest.mark.integration

N_IDS = 500


@pytest.fixture(scope="module")
def id_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """500 index-coded images in deliberately uneven shards (37 per shard, 19 in the last)."""
    root = tmp_path_factory.mktemp("ids_w")
    make_index_folder(root / "src", n=N_IDS, num_classes=10)
    write_dataset(root / "src", str(root / "ds"), samples_per_shard=37, progress=False)
    return root / "ds"


@pytest.fixture(scope="module")
def digits_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits_w")
    make_digits_folder(root / "src", image_size=24, limit=200)
    write_dataset(root / "src", str(root / "ds"), samples_per_shard=30, progress=False)
    return root / "ds"


def cfg_for(ds: Path, **kw) -> DataConfig:
    base = DataConfig(source=SourceConfig(url=str(ds)), image_size=16, batch_size=8,
                      io=IOConfig(num_workers=2, shuffle_buffer=32))
    return base.replace(**kw)


def ids_of(batch: tuple) -> np.ndarray:
    return decode_index(batch[0].numpy())


def test_two_ranks_two_workers_cover_epoch_exactly_once(id_ds: Path) -> None:
    world, per_rank = 2, []
    for rank in range(world):
        ld = build_loader(cfg_for(id_ds), rank=rank, world_size=world)
        got = [ids_of(b) for b in ld]
        assert len(got) == len(ld)
        per_rank.append(got)
    assert len(per_rank[0]) == len(per_rank[1]) == (N_IDS // (2 * 2 * 8)) * 2  # 15 batches each
    ids = np.concatenate([np.concatenate(r) for r in per_rank])
    assert len(ids) == len(set(ids.tolist())), "a sample was yielded twice"
    # the exact set: everything but the plan's dropped remainder (< world*workers*batch)
    ref = build_loader(cfg_for(id_ds), rank=0, world_size=world)
    p = ref.plan()
    from pipeline.format import read_samples, resolve

    src = [int(Path(s).stem) for s in read_samples(resolve(str(id_ds)))["src"].to_pylist()]
    kept = np.concatenate([p.slot_emission(s) for s in range(p.num_slots)])
    assert sorted(ids.tolist()) == sorted(src[i] for i in kept.tolist())
    assert N_IDS - len(ids) == p.dropped < 2 * 2 * 8


def test_resume_mid_epoch_equals_uninterrupted(digits_ds: Path) -> None:
    cfg = cfg_for(digits_ds, image_size=16, batch_size=6, **{"io.shuffle_buffer": 16, "io.num_workers": 2})
    full_ld = build_loader(cfg, rank=1, world_size=2)
    full = [b for b in full_ld]
    assert len(full) == len(full_ld) == 16
    for k in (3, 8):  # odd k: the next batch is owed by worker 1, not worker 0
        a = build_loader(cfg, rank=1, world_size=2)
        head = []
        for b in a:
            head.append(b)
            if len(head) == k:
                break
        state = a.state_dict()
        assert state["epoch"] == 0 and state["batches"] == k
        import json

        b2 = build_loader(cfg, rank=1, world_size=2)
        b2.load_state_dict(json.loads(json.dumps(state)))
        tail = list(b2)
        assert len(head) + len(tail) == len(full)
        for (x1, y1), (x2, y2) in zip(full, head + tail, strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert b2.epoch == 1 and b2.state_dict()["batches"] == 0


def test_world_size_change_continues_without_repeats(id_ds: Path) -> None:
    k = 5
    seen, states = [], []
    for rank in range(2):  # 2 ranks x 2 workers consume 5 batches each, then "crash"
        ld = build_loader(cfg_for(id_ds), rank=rank, world_size=2)
        for n, b in enumerate(ld):
            seen.append(ids_of(b))
            if n + 1 == k:
                break
        states.append(ld.state_dict())
    assert states[0] == states[1]
    lens = set()
    for rank in range(3):  # resume on 3 ranks x 1 worker
        ld = build_loader(cfg_for(id_ds, **{"io.num_workers": 1}), rank=rank, world_size=3)
        ld.load_state_dict(states[0])
        rest = [ids_of(b) for b in ld]
        lens.add(len(rest))
        seen += rest
        assert ld.epoch == 1
    assert len(lens) == 1
    ids = np.concatenate(seen)
    assert len(ids) == len(set(ids.tolist())), "a sample was repeated after re-sharding"
    # only the two layouts' remainders are left out
    assert N_IDS - len(ids) < 2 * 2 * 8 + 3 * 1 * 8


# ------------------------------------------------------------ SIGTERM reaching the loader workers
# A launcher stops a rank by signalling its process group (torchrun: os.killpg), so the DataLoader
# workers get the preemption SIGTERM too; the training process must still finish its step.
_GROUP_SIGTERM = r'''
import os, signal, subprocess, sys, time
from pipeline import DataConfig, IOConfig, SourceConfig, build_loader
seen = []
signal.signal(signal.SIGTERM, lambda *_: seen.append(1))  # the Trainer's handler: note it, go on
cfg = DataConfig(source=SourceConfig(url=sys.argv[1]), image_size=16, batch_size=8,
                 io=IOConfig(num_workers=2, shuffle_buffer=32))
loader = build_loader(cfg, rank=0, world_size=1)
drawn = 0
for n, (images, _) in enumerate(loader):
    if n == 3:  # from another process, to the whole group: what torchrun's close() does
        subprocess.run([sys.executable, "-c", f"import os; os.killpg({os.getpgid(0)}, 15)"])
        time.sleep(0.5)
    drawn += len(images)
print("DRAWN", drawn, "SEEN", len(seen), "BATCHES", len(loader))
'''


def test_group_sigterm_leaves_the_workers_to_the_training_process(id_ds: Path) -> None:
    """SIGTERM to the process group of a process iterating the loader with 2 workers: the process's
    own handler sees it and the pass goes on to its last batch (torch's worker handler alone dies,
    and the next batch raises "DataLoader worker exited unexpectedly")."""
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", _GROUP_SIGTERM, str(id_ds)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, start_new_session=True, env={**__import__("os").environ,
                                                                               "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    drawn, seen, batches = (int(x) for x in proc.stdout.split()[1::2])
    assert seen == 1 and drawn == batches * 8, proc.stdout


def _sleeper(ready: object) -> None:
    import time

    from pipeline.loader import leave_sigterm_to_the_parent

    leave_sigterm_to_the_parent(0)
    ready.set()  # type: ignore[attr-defined]
    time.sleep(60)


def test_a_worker_still_obeys_its_parent_and_leaves_when_the_parent_is_gone() -> None:
    """The init keeps what torch's worker handler does for the parent (its SIGTERM ends the worker,
    exit 0: the DataLoader's shutdown of a stuck worker) and ends a worker whose parent has gone."""
    import multiprocessing as mp
    import os
    import signal
    import subprocess
    import sys
    import time

    ctx = mp.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_sleeper, args=(ready,))
    child.start()
    assert ready.wait(30)
    subprocess.run([sys.executable, "-c", f"import os; os.kill({child.pid}, 15)"], check=True)  # not the parent
    child.join(2.0)
    assert child.is_alive(), "a SIGTERM from another process must be left to the training process"
    os.kill(child.pid, signal.SIGTERM)  # from the parent
    child.join(10)
    assert child.exitcode == 0, child.exitcode

    # Parent gone (os._exit after a preemption save or a hang dump): the orphan leaves by itself.
    code = ("import multiprocessing as mp, os, sys, test_pipeline_workers as t\n"
            "ctx = mp.get_context('fork'); ready = ctx.Event()\n"
            "p = ctx.Process(target=t._sleeper, args=(ready,)); p.start(); ready.wait(30)\n"
            "print(p.pid, flush=True); os._exit(0)\n")
    from conftest import ROOT

    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"})
    orphan = int(out.stdout.split()[0])
    import psutil

    def running() -> bool:
        try:
            return psutil.Process(orphan).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    if running():
        os.kill(orphan, signal.SIGKILL)
        raise AssertionError("the worker outlived its parent by 10 s")


# ------------------------------------------------------------ persistent workers
def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_persistent_workers_keep_their_pids_and_serve_the_same_batches(id_ds: Path) -> None:
    """Two epochs, an abandoned pass, a resume and eval passes in between: the same two worker
    processes serve all of it, and every batch equals the one workers started per pass serve."""
    import json

    def passes(persistent: bool) -> tuple[list[list[np.ndarray]], list[list[int]], object]:
        ld = build_loader(cfg_for(id_ds, **{"io.persistent_workers": persistent}), rank=1, world_size=2)
        ev = build_loader(cfg_for(id_ds, train=False, **{"io.persistent_workers": persistent}), rank=1, world_size=2)
        out, pids = [], []
        out.append([ids_of(b) for b in ld])  # epoch 0
        pids.append(ld.worker_pids())
        out.append([ids_of(b) for b in ev])  # eval after train
        head = []
        for b in ld:  # epoch 1: abandoned after 3 batches (odd: worker 1 owes the next batch)
            head.append(ids_of(b))
            if len(head) == 3:
                break
        out.append(head)
        state = json.loads(json.dumps(ld.state_dict()))
        out.append([ids_of(b) for b in ld])  # the rest of epoch 1, same loader
        pids.append(ld.worker_pids())
        ld.load_state_dict(state)
        out.append([ids_of(b) for b in ld])  # the rest of epoch 1 again, from its saved cursor
        out.append([ids_of(b) for b in ev])  # eval again
        pids.append(ld.worker_pids())
        return out, pids, ld

    fresh, fresh_pids, _ = passes(False)
    assert fresh_pids == [[], [], []]
    kept, kept_pids, ld = passes(True)
    assert len(kept_pids[0]) == 2 and kept_pids[0] == kept_pids[1] == kept_pids[2], kept_pids
    assert len(kept) == len(fresh)
    for a, b in zip(kept, fresh, strict=True):
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert np.array_equal(x, y)
    with ld:  # the context manager (close()) stops them now
        pass
    assert ld.worker_pids() == [] and _wait_gone(kept_pids[0]) == []


_KILLED_PARENT = r'''
import os, signal, sys
from pipeline import DataConfig, IOConfig, SourceConfig, build_loader
cfg = DataConfig(source=SourceConfig(url=sys.argv[1]), image_size=16, batch_size=8,
                 io=IOConfig(num_workers=2, shuffle_buffer=32))
ld = build_loader(cfg, rank=0, world_size=1)
for _ in ld:
    pass
print(*ld.worker_pids(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
'''


def test_persistent_workers_leave_with_a_killed_parent(id_ds: Path) -> None:
    """A rank killed outright (SIGKILL: no exit handler runs) between epochs leaves no loader workers."""
    from conftest import ROOT

    out = subprocess.run([sys.executable, "-c", _KILLED_PARENT, str(id_ds)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stdout
    left = _wait_gone(pids)
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"loader workers {left} outlived their killed parent by 10 s"


def _ring_slots(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ring slot of every batch the main process accounts (-1: a fresh buffer)."""
    from pipeline.loader import Loader

    slots: list[int] = []
    account = Loader._account
    monkeypatch.setattr(Loader, "_account", lambda self, stats: slots.append(stats.get("ring_slot", -1))
                        or account(self, stats))
    return slots


def test_recycled_batch_buffers_never_change_a_batch_the_consumer_holds(
        id_ds: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pool workers' shared batch buffers (``workers.BatchRing``) are handed to the consumer in place; a
    consumer keeping every batch (uint8 output, two epochs) holds every slot, so the workers fall back to
    fresh buffers and no kept batch changes: all equal fresh workers' batches."""
    cfg = cfg_for(id_ds, output="uint8")
    fresh = build_loader(cfg.replace(**{"io.persistent_workers": False}), rank=0, world_size=1)
    want = [b[0].clone() for _ in range(2) for b in fresh]
    slots = _ring_slots(monkeypatch)
    with build_loader(cfg, rank=0, world_size=1) as ld:
        held = [b[0] for _ in range(2) for b in ld]
        assert len(held) == len(want)
        for k, (got, exp) in enumerate(zip(held, want, strict=True)):
            assert torch.equal(got, exp), f"batch {k} changed after it was yielded"
    assert slots[0] >= 0 and -1 in slots  # the ring first, fresh buffers once every slot is held


def test_a_kept_view_of_a_batch_is_never_overwritten_and_dropped_batches_are_recycled(
        id_ds: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ring slot is rewritten only once no tensor, view or numpy array of its batch is alive (a weak
    reference on the array its storage is built from): a slice of batch 5 and a numpy view of epoch 0's
    last batch (kept across the next pass's start, which frees the discarded batches' slots) stay what
    they were through two epochs and their slots are not reused while they live, while dropped batches'
    slots are; once the views are dropped their slots are free again."""
    cfg = cfg_for(id_ds, output="uint8")
    fresh = build_loader(cfg.replace(**{"io.persistent_workers": False}), rank=0, world_size=1)
    want = [b[0].clone() for _ in range(3) for b in fresh]
    slots = _ring_slots(monkeypatch)
    with build_loader(cfg, rank=0, world_size=1) as ld:
        per_epoch = len(ld)
        views: dict[int, tuple[object, slice]] = {}
        k = 0
        for _ in range(2):
            for b in ld:
                assert torch.equal(b[0], want[k]), f"batch {k} differs from fresh workers' batch"
                if k == 5:
                    views[k] = (b[0][2:5], slice(2, 5))  # a view: the same storage
                elif k == per_epoch - 1:
                    views[k] = (b[0].numpy()[1:3], slice(1, 3))  # a numpy array of it
                del b
                for j, (v, sl) in views.items():
                    assert torch.equal(torch.as_tensor(v), want[j][sl]), f"kept view of batch {j} overwritten at {k}"
                    assert slots[j] >= 0 and slots[j] not in slots[j + 1:], f"slot of batch {j} reused while kept"
                    del v  # (the loop variable would keep the last view alive)
                k += 1
        ring_batches = [s for s in slots if s >= 0]
        # Only the worker of both kept batches may run out of slots (2 kept + 2 in flight + 1 being read).
        assert len(ring_batches) >= len(slots) - per_epoch // 2 and len(set(ring_batches)) < len(ring_batches)
        kept = {slots[j] for j in views}
        assert kept <= ld._pool.ring.held()
        views.clear()  # the last views die: their slots go back to the workers
        assert not kept & ld._pool.ring.held()
        for b in ld:
            assert torch.equal(b[0], want[k])
            k += 1
