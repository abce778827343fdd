"""Run a pipeline function once per work item as Ray tasks spread over the cluster.

The pipeline owns the work (``pipeline.shards.write_shard``, ``pipeline.shard_audit.audit_shard``);
this module only schedules it: SPREAD over the nodes, at most ``max_in_flight`` tasks at once
(so a 14k-shard plan does not queue 14k task specs on the head), each task retried by Ray when
its worker or node dies (``max_retries``), results handed back as they finish. A task that
raises is not retried (the pipeline functions turn bad data into rejects, so an exception is a
real problem: it is raised on the driver with the work item named).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO


def connect(address: str | None, root: str) -> str:
    """Join the Ray cluster at ``address`` / ``$RAY_ADDRESS``, else start a private local one whose
    workers import the checkout at ``root`` (a cluster gets the code via ``--working-dir``)."""
    import ray

    from orchestration.launch.cluster import connect_ray

    if not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return connect_ray(address)


@dataclass(frozen=True, kw_only=True)
class TaskSettings:
    """How the work is spread: concurrency, CPUs per task and retries on node death."""

    max_in_flight: int = 8
    cpus_per_task: float = 1.0
    max_retries: int = 5  # node deaths survived per task (Ray re-runs it on another node)
    stall_s: float = 300.0  # a warning when no task finished for this long

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"--tasks {self.max_in_flight} must be >= 1")
        if self.cpus_per_task <= 0:
            raise ValueError(f"--cpus-per-task {self.cpus_per_task} must be > 0")


def run_tasks(fn: Callable[..., Any], items: Sequence[Any], extra: tuple[Any, ...], settings: TaskSettings,
              *, on_result: Callable[[Any], None] | None = None) -> list[Any]:
    """``[fn(item, *extra) for item in items]`` as Ray tasks; results in ``items`` order.

    ``extra`` is put in the object store once and shared by every task. ``on_result`` is called
    on the driver with each result as it arrives (progress).
    """
    import ray

    remote = ray.remote(fn).options(num_cpus=settings.cpus_per_task, max_retries=settings.max_retries,
                                    retry_exceptions=False, scheduling_strategy="SPREAD")
    shared = [ray.put(x) for x in extra]
    results: list[Any] = [None] * len(items)
    pending: dict[Any, int] = {}
    todo = iter(range(len(items)))
    for i in _take(todo, settings.max_in_flight):
        pending[remote.remote(items[i], *shared)] = i
    while pending:
        # Bounded wait: a cluster that stops making progress (every node lost, tasks pending
        # forever for lack of CPUs) says so on the driver instead of hanging silently.
        done, _ = ray.wait(list(pending), num_returns=1, timeout=settings.stall_s)
        if not done:
            print(f"distribute: no task finished in {settings.stall_s:g}s; {len(pending)} in flight, e.g. "
                  f"{_describe(items[next(iter(pending.values()))])}; check `ray status` (nodes, free CPUs)",
                  file=sys.stderr, flush=True)
        for ref in done:
            i = pending.pop(ref)
            try:
                results[i] = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                raise RuntimeError(f"work item {i} ({_describe(items[i])}) failed: {exc}") from exc
            if on_result is not None:
                on_result(results[i])
            for j in _take(todo, 1):
                pending[remote.remote(items[j], *shared)] = j
    return results


def _take(it: Iterator[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def _describe(item: Any) -> str:
    return str(getattr(item, "name", item))[:200]


class Progress:
    """One progress line on the driver: items done, images/s, ETA, rejects so far.

    Printed at most every ``every`` seconds (and at the end) as plain lines, so it reads the
    same in a terminal and in ``ray job logs``.
    """

    def __init__(self, *, total_items: int, total_images: int, what: str, every: float = 5.0,
                 out: TextIO | None = None, enabled: bool = True, rejects_before: int = 0) -> None:
        self.total_items, self.total_images, self.what = total_items, total_images, what
        self.every, self.out, self.enabled = every, out, enabled
        self.items = self.images = 0
        self.before = self.rejects = rejects_before  # e.g. found while scanning SRC (not in total_images)
        self.t0 = self._last = time.monotonic()

    def update(self, *, images: int, rejects: int) -> None:
        self.items += 1
        self.images += images
        self.rejects += rejects
        now = time.monotonic()
        if now - self._last >= self.every or self.items == self.total_items:
            self._last = now
            self.print()

    def line(self) -> str:
        dt = max(time.monotonic() - self.t0, 1e-9)
        rate = self.images / dt
        left = max(self.total_images - self.images - (self.rejects - self.before), 0)
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        return (f"{self.what}: {self.items}/{self.total_items} shards, {self.images} images, {rate:.1f} images/s, "
                f"ETA {eta}, rejects {self.rejects}")

    def print(self) -> None:
        if self.enabled:
            print(self.line(), file=self.out or sys.stderr, flush=True)  # stderr as it is now, not at import
