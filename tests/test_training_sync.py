"""Issue #15: the Trainer's steady-state step does not wait for the device per micro-batch.

A host synchronisation is counted wherever a value goes from the device to Python
(`Tensor.item`, `__bool__`, `__float__`, `__int__`, `tolist`), at `torch.cuda.synchronize`, and at
every `torch.distributed` collective (a blocking call that every rank must reach). On CPU these
are cheap, but they are the same calls that stall a GPU, so their number is what is budgeted:
at most one per optimizer step (DeepSpeed's gradient overflow check), none per micro-batch.
"""

from __future__ import annotations

import collections
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from training.config import EngineConfig, ScheduleConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

_TENSOR_SYNCS = ("item", "__bool__", "__float__", "__int__", "tolist")
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
                "reduce_scatter", "reduce_scatter_tensor", "barrier", "all_to_all_single", "reduce",
                "gather", "scatter")


class SyncCounter:
    """Counts host synchronisations by wrapping the calls that make them (see module doc)."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.on = False
        for name in _TENSOR_SYNCS:
            self._wrap(mp, torch.Tensor, name, f"Tensor.{name}")
        self._wrap(mp, torch.cuda, "synchronize", "cuda.synchronize")
        for name in _COLLECTIVES:
            if hasattr(torch.distributed, name):
                self._wrap(mp, torch.distributed, name, f"dist.{name}")

    def _wrap(self, mp: pytest.MonkeyPatch, owner: Any, name: str, label: str) -> None:
        real = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.on:
                self.counts[label] += 1
            return real(*args, **kwargs)

        mp.setattr(owner, name, counted)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class Loop:
    """Endless in-memory batches (the loader's cost is not what is measured)."""

    def __init__(self, micro: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(micro, 3, 32, 32, generator=g), torch.randint(0, 10, (micro,), generator=g))
                        for _ in range(4)]
        self.pos = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            self.pos += 1
            yield self.batches[self.pos % 4]


def _count(monkeypatch: pytest.MonkeyPatch, stage: int, accum: int, steps: int = 3) -> tuple[SyncCounter, int]:
    """Build a 1-rank Trainer, warm it up, then count over `steps` steady-state optimizer steps.

    Returns the counter and how often the Trainer itself called its cross-rank reduction
    (`all_reduce_sum`: a collective whenever there is more than one rank)."""
    import training.trainer
    from model import create_model
    from training import TrainConfig, Trainer

    torch.manual_seed(0)
    cfg = TrainConfig(global_batch=4 * accum, micro_batch=4, profile="cpu", log_every=100, engine=EngineConfig(zero_stage=stage), schedule=ScheduleConfig(total_steps=100, warmup_steps=2))
    trainer = Trainer(create_model("mu/8", num_classes=10, image_size=32), cfg, Loop(4))
    for _ in range(2):  # warm-up: first-step allocations and DeepSpeed's one-off setup
        trainer.train_step()
    counter = SyncCounter(monkeypatch)
    ours = [0]
    real = training.trainer.all_reduce_sum

    def counted(t: torch.Tensor) -> torch.Tensor:
        ours[0] += counter.on
        return real(t)

    monkeypatch.setattr(training.trainer, "all_reduce_sum", counted)
    counter.on = True
    for _ in range(steps):
        loss, _ = trainer.train_step()
        assert loss is not None
    counter.on = False
    assert trainer.step == 2 + steps
    return counter, ours[0]


def _syncs(c: SyncCounter) -> int:
    return sum(v for k, v in c.counts.items() if not k.startswith("dist."))


def _collectives(c: SyncCounter) -> int:
    return sum(v for k, v in c.counts.items() if k.startswith("dist."))


@pytest.mark.integration
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_steady_state_step_syncs_at_most_once(monkeypatch: pytest.MonkeyPatch, stage: int) -> None:
    """4 micro-batches per step: at most 1 host sync per optimizer step (DeepSpeed's overflow
    check, or the Trainer's own under ZeRO-0 fp32), and the Trainer adds no collective of its
    own between log lines (ZeRO-0: the one that makes its skip decision global)."""
    steps = 3
    counter, ours = _count(monkeypatch, stage, accum=4, steps=steps)
    syncs = _syncs(counter)
    assert syncs <= steps, f"{syncs / steps:.1f} host syncs per optimizer step of 4 micro-batches: {dict(counter.counts)}"
    assert ours <= (steps if stage == 0 else 0), f"the Trainer made {ours} cross-rank reductions in {steps} steps"


@pytest.mark.integration
@pytest.mark.parametrize("stage", [0, 1])
def test_no_collective_per_micro_batch(monkeypatch: pytest.MonkeyPatch, stage: int) -> None:
    """ZeRO-0/1 reduce gradients once per optimizer step, so with the guard decided per step the
    number of collectives and syncs does not grow with the number of micro-batches. (ZeRO-2/3
    reduce-scatter each micro-batch's gradients by design; that is the engine's, not the guard's.)"""
    one, ours_one = _count(monkeypatch, stage, accum=1)
    monkeypatch.undo()
    four, ours_four = _count(monkeypatch, stage, accum=4)
    assert _collectives(four) == _collectives(one), (dict(one.counts), dict(four.counts))
    assert _syncs(four) == _syncs(one) and ours_four == ours_one, (dict(one.counts), dict(four.counts))


def test_nonfinite_loss_poisons_every_gradient() -> None:
    """A NaN/Inf loss whose own gradient is finite (cross-entropy at an infinite loss) still
    trips the once-per-step gradient check (old code checked the loss, per micro-batch); a finite loss's gradients are bitwise unchanged."""
    from training.trainer import _poison

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    inf = torch.tensor(float("inf"))
    (w.sum() + inf).backward()  # the loss is inf, its gradient finite (1, 1)
    assert torch.isfinite(w.grad).all()
    w.grad = None
    _poison(w.sum() + inf).backward()
    assert torch.isnan(w.grad).all()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    grads = []
    for wrap in (lambda t: t, _poison):
        w.grad = None
        wrap((x @ w).square().mean()).backward()
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_prefetcher_on_cpu_takes_in_order_and_runs_nothing_ahead() -> None:
    """CPU: batches in loader order, `preload()` takes nothing from the loader, and the cursor a
    checkpoint saves is the loader's own (the CUDA path saves the one from before its pending
    batch; it needs a GPU to run)."""
    from training.prefetch import DevicePrefetcher

    taken = [0]

    def fetch() -> tuple[torch.Tensor, torch.Tensor]:
        taken[0] += 1
        return torch.full((2, 3), taken[0], dtype=torch.uint8), torch.tensor([taken[0]])

    p = DevicePrefetcher(fetch, torch.device("cpu"), state=lambda: {"pos": taken[0]})
    assert p.stream is None
    for k in (1, 2, 3):
        images, targets = p.take()
        assert images.dtype == torch.uint8 and int(targets) == k and int(images[0, 0]) == k
        p.preload()
        assert taken[0] == k and p.loader_state() == {"pos": k}
