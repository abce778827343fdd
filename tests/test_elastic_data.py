"""Issue #14: after a world-size change the Trainer continues the same data epoch, end to end.

A real `training.Trainer` (mu/8, ZeRO-1, gloo) trains at world size 2 on the real pipeline
loader over an index-coded dataset (`pipeline.demo_data.make_index_folder`: every image's
colour encodes its source id), checkpoints after `K` optimizer steps and exits. A new Trainer
at world size 1 resumes that checkpoint (`Trainer.restore("auto")`: ZeRO state resharded,
gradient accumulation doubled so the global batch stays) and trains until epoch 0 is done.

A thin proxy around each rank's loader records the ids of every micro-batch the Trainer drew,
tagged with the loader's epoch. Proven: across the world-2 part (exactly the `K * accum`
micro-batches each rank trained before the checkpoint) and the world-1 part, no id of epoch 0
was trained twice, and the ids never trained in epoch 0 are exactly the final layout's dropped
remainder (`pipeline.plan`: fewer than `world_size * num_workers * batch_size` = 1 * 2 * 4).
The world-2 part stops on an odd micro-batch count per rank (15), so the resume also covers
a rank whose next batch was owed by its second DataLoader worker.

The worker side is this file's `main()`: `python <this file> train|resume DATASET CKPT OUT`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LoaderProxy

from pipeline import IOConfig, SourceConfig

ROOT = Path(__file__).resolve().parents[1]
N_IDS = 430  # 430 = 26 * 16 + 14 at world 2: uneven, so the final layout drops a remainder
PER_SHARD = 37  # uneven shards (the last one short)
MICRO = 4  # per-rank micro-batch = the loader's batch_size
WORKERS = 2  # DataLoader workers per rank
GLOBAL_BATCH = 24  # accum 3 at world 2, 6 at world 1
K = 5  # optimizer steps at world 2 before the checkpoint: 15 micro-batches per rank (odd)
TOTAL_STEPS = 40  # the schedule's length; both parts stop earlier with max_steps


# ---------------------------------------------------------------------------- worker side
class RecordingLoader(LoaderProxy):
    """Forwards everything to `loader`; records `(iterator number, loader epoch, ids)` of every
    batch its iterators yield, i.e. of every micro-batch the Trainer drew from it."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.drawn: list[tuple[int, int, list[int]]] = []
        self._iters = 0

    def __iter__(self) -> Iterator[tuple]:
        from pipeline.demo_data import decode_index

        number, self._iters = self._iters, self._iters + 1
        for batch in self.loader:
            # The loader's epoch while it yields is the batch's epoch (it advances after the last).
            self.drawn.append((number, self.loader.epoch, decode_index(batch[0].numpy()).tolist()))
            yield batch



def worker(mode: str, dataset: str, ckdir: str, out: Path) -> None:
    from test_training_dist import make_cfg, make_model

    from pipeline import DataConfig, build_loader
    from training import Trainer

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    data = DataConfig(source=SourceConfig(url=dataset), image_size=32, batch_size=MICRO, io=IOConfig(num_workers=WORKERS, shuffle_buffer=16))
    loader = RecordingLoader(build_loader(data, rank=rank, world_size=world))
    cfg = make_cfg(1, global_batch=GLOBAL_BATCH, micro_batch=MICRO, log_every=1, **{"schedule.total_steps": TOTAL_STEPS, "schedule.warmup_steps": 2, "checkpoint.every": K if mode == "train" else 0})  # 0: only at the end
    trainer = Trainer(make_model(), cfg, loader, checkpoint_dir=ckdir)
    record: dict[str, Any] = {"rank": rank, "world": world, "accum": trainer.accum}
    if mode == "train":
        result = trainer.fit(max_steps=K)  # the checkpoint at step K is written by both ranks
    else:
        assert trainer.restore("auto"), f"no checkpoint found in {ckdir}"
        plan = loader.plan()  # the rest of epoch 0, re-cut for this layout (a new segment)
        record.update(restored_step=trainer.step, plan_epoch=plan.epoch, plan_segment=plan.segment, rest_batches=plan.batches_per_rank, dropped=plan.dropped,
                      world_size_changes=trainer.faults.world_size_changes)
        # Exactly enough steps to draw every batch left in epoch 0 (the last step may run into epoch 1).
        result = trainer.fit(max_steps=trainer.step + math.ceil(plan.batches_per_rank / trainer.accum))
    record.update(final_step=trainer.step, loss=result["loss"], drawn=loader.drawn)
    (out / f"{mode}_r{rank}.json").write_text(json.dumps(record))


# ---------------------------------------------------------------------------- test side
def _run(mode: str, world: int, dataset: Path, ckdir: Path, out: Path, timeout: float = 240) -> list[dict]:
    from conftest import spawn_ranks, wait_ranks

    log = lambda rank: out / f"{mode}_r{rank}.log"  # noqa: E731
    procs = spawn_ranks([__file__, mode, str(dataset), str(ckdir), str(out)], world, log)
    wait_ranks(procs, log, time.monotonic() + timeout, mode)
    return [json.loads((out / f"{mode}_r{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.integration
def test_trainer_resumed_at_another_world_size_continues_the_epoch(tmp_path: Path) -> None:
    from pipeline import write_dataset
    from pipeline.demo_data import make_index_folder

    make_index_folder(tmp_path / "src", n=N_IDS, num_classes=10)
    write_dataset(tmp_path / "src", str(tmp_path / "ds"), samples_per_shard=PER_SHARD, progress=False)
    ckdir = tmp_path / "ck"
    before = _run("train", 2, tmp_path / "ds", ckdir, tmp_path)
    (after,) = _run("resume", 1, tmp_path / "ds", ckdir, tmp_path)

    trained: list[int] = []
    for r in before:  # only the first K * accum micro-batches were trained before the checkpoint
        assert r["accum"] == GLOBAL_BATCH // (MICRO * 2) == 3 and r["final_step"] == K, r["final_step"]
        n = K * r["accum"]
        assert len(r["drawn"]) >= n, f"rank {r['rank']} drew {len(r['drawn'])} micro-batches, trained {n}"
        assert all(epoch == 0 for _, epoch, _ in r["drawn"][:n])
        trained += [i for _, _, ids in r["drawn"][:n] for i in ids]
    assert len(trained) == 2 * K * 3 * MICRO

    assert after["accum"] == 6  # the global batch stays: 4 x 6 x 1 == 4 x 3 x 2
    assert after["restored_step"] == K and after["world_size_changes"] == 1, after
    rest = [ids for number, epoch, ids in after["drawn"] if epoch == 0]
    assert all(number == 0 for number, epoch, _ in after["drawn"] if epoch == 0)  # one pass after the resume
    assert len(rest) == after["rest_batches"] > 0  # the epoch was finished
    assert after["final_step"] == K + math.ceil(after["rest_batches"] / 6)
    trained += [i for ids in rest for i in ids]

    repeated = sorted(i for i in set(trained) if trained.count(i) > 1)
    assert not repeated, f"{len(repeated)} ids trained twice in epoch 0 across the world-size change: {repeated[:20]}"
    never = set(range(N_IDS)) - set(trained)
    assert len(never) == after["dropped"] < 1 * WORKERS * MICRO, sorted(never)  # only the final layout's remainder
    assert (after["plan_epoch"], after["plan_segment"]) == (0, 1)  # the rest of epoch 0, re-cut for world 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    worker(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
