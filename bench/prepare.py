"""Dataset preparation throughput: prepare.py on Ray (1 task vs N) and against write_shards.

    .venv/bin/python bench/prepare.py                       # ~2-3 min on 2 cores
    .venv/bin/python bench/prepare.py --images 2000 --cpus 16 --rounds 3

Same source for every run: ``--images`` ~500x375 photo JPEGs (pipeline.demo_data) in class
folders, written with ``--max-side 256`` (every image decoded, resized, re-encoded: the real
per-image work of preparing ImageNet-21k at a training resolution) into a fresh local DEST.

1. Scaling: images/s of ``orchestration.prepare`` (plan, Ray tasks, finish+publish) with
   ``--tasks 1`` against ``--tasks N`` (``--cpus-per-task 1``, N = ``--cpus``). Ratio = N-task
   rate / 1-task rate; ideal N.
2. Overhead: wall time of ``prepare`` with N tasks against ``pipeline.write_shards`` with
   ``--workers N`` (a local process pool) on the same CPUs. Ratio = prepare / write_shards;
   goal <= 1.10. The Ray instance is started once before the rounds (a cluster is long-lived;
   its start-up is not part of a job) with ``num_cpus=N``.

Runs alternate; the best round of each counts (the machine may be shared; best-of is the least
noisy). Also prints the load average, which says how much to trust the numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestration.data.distribute import TaskSettings  # noqa: E402
from orchestration.prepare import write_on_ray  # noqa: E402
from pipeline import write_dataset  # noqa: E402
from pipeline.demo_data import make_photo_folder  # noqa: E402
from pipeline.shards import WriteSettings, finish_dataset, plan_dataset  # noqa: E402


def run_prepare(src: Path, dest: Path, *, tasks: int, per_shard: int, max_side: int) -> float:
    t0 = time.perf_counter()
    plan = plan_dataset(src, str(dest), WriteSettings(samples_per_shard=per_shard, max_side=max_side))
    finish_dataset(plan, write_on_ray(plan, TaskSettings(max_in_flight=tasks, cpus_per_task=1), progress=False))
    return time.perf_counter() - t0


def run_write_shards(src: Path, dest: Path, *, workers: int, per_shard: int, max_side: int) -> float:
    t0 = time.perf_counter()
    write_dataset(src, str(dest), samples_per_shard=per_shard, max_side=max_side, workers=workers, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="N: tasks / pool workers / Ray CPUs")
    ap.add_argument("--per-shard", type=int, default=50)
    ap.add_argument("--max-side", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    import ray

    from orchestration.launch.cluster import _private_auth_token

    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        src = make_photo_folder(tmp / "src", n=a.images, num_classes=10)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        _private_auth_token()
        ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
        kw = {"per_shard": a.per_shard, "max_side": a.max_side}
        best = {"ray1": float("inf"), "rayN": float("inf"), "pool": float("inf")}
        for r in range(a.rounds):
            for name, fn in (("ray1", lambda d: run_prepare(src, d, tasks=1, **kw)),
                             ("rayN", lambda d: run_prepare(src, d, tasks=a.cpus, **kw)),
                             ("pool", lambda d: run_write_shards(src, d, workers=a.cpus, **kw))):
                dest = tmp / f"{name}-{r}"
                s = fn(dest)
                shutil.rmtree(dest)
                best[name] = min(best[name], s)
                print(f"round {r} {name}: {s:.2f}s ({a.images / s:.1f} images/s)", flush=True)
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rate = {k: a.images / v for k, v in best.items()}
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs, N={a.cpus}, {a.images} images, max_side "
          f"{a.max_side}")
    print(f"prepare 1 task: {rate['ray1']:.1f} images/s; {a.cpus} tasks: {rate['rayN']:.1f} images/s; "
          f"scaling ratio {rate['rayN'] / rate['ray1']:.2f} (ideal {a.cpus})")
    print(f"write_shards --workers {a.cpus}: {best['pool']:.2f}s; prepare --tasks {a.cpus}: {best['rayN']:.2f}s; "
          f"overhead ratio {best['rayN'] / best['pool']:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
