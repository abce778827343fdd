"""Prepare a dataset (WebDataset shards + index) on a Ray cluster: the distributed write_shards.

Examples::

    # As a Ray job (the driver plans, tasks spread over the nodes write the shards):
    ray job submit --working-dir . -- python orchestration/prepare.py \\
        s3://bucket/raw/imagenet21k.tar s3://bucket/imagenet21k --shard-bytes 1e9 --tasks 64 --cpus-per-task 1

    # Directly (starts a private local Ray instance when $RAY_ADDRESS is unset):
    python orchestration/prepare.py ./my_folder ./ds --samples-per-shard 1000 --tasks 4

SRC, DEST and every content flag are those of ``python -m pipeline.write_shards`` (same
defaults; on a multi-node cluster SRC's images must be readable from every node: ``s3://`` or a
shared mount), and so is the output: the driver plans with :func:`pipeline.shards.plan_dataset`,
each Ray task runs :func:`pipeline.shards.write_shard` for one shard (SPREAD over the nodes,
``--tasks`` in flight, each task re-run elsewhere when its node dies), and the driver writes the
index files and publishes last (:func:`pipeline.shards.finish_dataset`). The shards are
byte-identical to the single-machine writer's for the same SRC and flags. Re-running the same
command resumes: shards already complete at DEST (size and sha256 match their marker) are
verified and kept, not re-encoded. A progress line (shards, images/s, ETA, rejects) goes to
stderr every few seconds. Exit codes as write_shards (2: bad arguments / missing SRC or bucket;
1: nothing could be written, or DEST publishes another dataset). The last stdout line is
``VITSCALE_RESULT {json}`` (version, counts, summary).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file (ray job submit -- python orchestration/prepare.py)
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[1]))

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from orchestration.data.distribute import Progress, TaskSettings, connect, run_tasks
from pipeline import format as fmt
from pipeline.shards import DatasetPlan, finish_dataset, plan_dataset, write_shard
from pipeline.sources import WriterError
from pipeline.storage import StorageError
from pipeline.write_shards import add_write_arguments, argument_problems, settings_from_args, summary_lines

ROOT = Path(__file__).resolve().parents[1]


def write_on_ray(plan: DatasetPlan, tasks: TaskSettings, *, progress: bool = True) -> list[dict[str, Any]]:
    """Every shard of ``plan`` written (or verified and kept) by Ray tasks; results in plan order."""
    bar = Progress(total_items=len(plan.jobs), total_images=len(plan.source.items), what="prepare",
                   enabled=progress, rejects_before=len(plan.source.rejects))

    def seen(r: dict[str, Any]) -> None:
        bar.update(images=r["shard"]["samples"], rejects=len(r["rejects"]))

    return run_tasks(write_shard, plan.jobs, (plan.vdest, plan.options), tasks, on_result=seen)


def prepare(src: str, dest: str, args: argparse.Namespace) -> dict[str, Any]:
    """Plan on the driver, write on Ray, finish and publish on the driver."""
    tasks = TaskSettings(max_in_flight=args.tasks, cpus_per_task=args.cpus_per_task, max_retries=args.max_retries)
    plan = plan_dataset(src, dest, settings_from_args(args), overwrite=args.overwrite)
    where = connect(args.address, str(ROOT))
    if not args.quiet:
        print(f"prepare: {len(plan.source.items)} images -> {len(plan.jobs)} shards of version {plan.version} "
              f"on {where}, {tasks.max_in_flight} tasks x {tasks.cpus_per_task} CPU", file=sys.stderr, flush=True)
    results = write_on_ray(plan, tasks, progress=not args.quiet)
    return finish_dataset(plan, results)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python orchestration/prepare.py", description=__doc__.split("\n\n")[0])
    add_write_arguments(ap)
    ap.add_argument("--tasks", type=int, default=8, help="shard tasks in flight at once (cluster-wide)")
    ap.add_argument("--cpus-per-task", type=float, default=1.0, help="Ray CPUs each shard task reserves")
    ap.add_argument("--max-retries", type=int, default=5, help="re-runs of a task whose node died")
    ap.add_argument("--address", default=None, help="Ray address (default $RAY_ADDRESS; else a local Ray)")
    a = ap.parse_args(argv)
    problems = argument_problems(a)
    if a.tasks < 1:
        problems.append(f"--tasks {a.tasks} must be >= 1")
    if not a.cpus_per_task > 0:
        problems.append(f"--cpus-per-task {a.cpus_per_task} must be > 0")
    if a.max_retries < 0:
        problems.append(f"--max-retries {a.max_retries} must be >= 0")
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2)
    try:
        info = prepare(a.src, a.dest, a)
    except (fmt.DatasetExists, fmt.PublishConflict) as exc:
        print(f"prepare: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except (WriterError, StorageError) as exc:
        print(f"prepare: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(exc.code if isinstance(exc, WriterError) else 2) from None
    for line in summary_lines(info, a.dest):
        print(line)
    print("VITSCALE_RESULT " + json.dumps({"dataset_version": info["dataset_version"], "counts": info["counts"],
                                           "summary": info["summary"]}), flush=True)


if __name__ == "__main__":
    main()
