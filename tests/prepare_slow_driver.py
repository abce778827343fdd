"""A prepare.py driver whose shard tasks are slowed down and say where they ran (for tests).

Used by tests/test_prepare_multinode.py through ``ray job submit -- python
tests/prepare_slow_driver.py SECONDS SRC DEST ...``: the per-shard function becomes one that
prints ``SHARD <name> ON <node>`` (``head``, or the worker
node's custom resource ``node_<i>``), sleeps SECONDS (so a node can be killed mid-run) and then
runs the real :func:`pipeline.shards.write_shard`. Only our own function is replaced; Ray,
S3 and the writer are real. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orchestration.prepare as prepare  # noqa: E402
from pipeline.shards import ShardJob, write_shard  # noqa: E402

DELAY = float(sys.argv[1])


def slow_write_shard(job: ShardJob, vdest: str, options: dict) -> dict:
    import ray

    me = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == me)
    where = ",".join(sorted(r for r in node["Resources"] if r.startswith("node_"))) or "head"
    print(f"SHARD {job.name} ON {where}", flush=True)
    time.sleep(DELAY)
    return write_shard(job, vdest, options)


prepare.write_shard = slow_write_shard
prepare.main(sys.argv[2:])
