"""Trainer: a DeepSpeed engine over a ViT; `fit()` reads batch -> step -> log -> eval -> checkpoint.

Works the same under torchrun, the deepspeed launcher, Ray Train or a bare `python` (rank and
world come from the environment; see training.dist). Every rank runs the same loop; only rank 0
talks to the MetricsSink.

Under Ray Train, call it from `train_loop_per_worker` (TorchTrainer has already made the process
group and set RANK/WORLD_SIZE/LOCAL_RANK)::

    ctx = ray.train.get_context()
    loader = build_loader(data_cfg, rank=ctx.get_world_rank(), world_size=ctx.get_world_size())
    trainer = Trainer(create_model(...), train_cfg, loader, eval_loader=..., sink=sink_on_rank0,
                      checkpoint_dir=local_dir, checkpoint_store=s3_store)
    metrics = trainer.fit(resume="auto")   # every rank; rank 0's sink gets the metrics

A NaN/Inf loss or gradient on any rank skips that optimizer step on every rank (no update; its
micro-batches are spent, the step is taken again with the next ones) and counts a bad step;
`max_bad_steps` in a row raise NonFiniteLossError. The decision is DeepSpeed's own gradient
overflow check, once per step, so nothing waits for the device per micro-batch; losses stay on
the device and are read once per log line. fp16 overflow in the gradients is DeepSpeed's loss
scaler's business (a skipped update, logged as `skipped_updates`, not a bad step).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training import checkpoint as ckpt
from training.config import TrainConfig
from training.deepspeed_config import deepspeed_config
from training.dist import DistInfo, all_reduce_sum, init_distributed
from training.faults import FaultStats
from training.interruptions import Interruptions
from training.metrics import MetricsSink, NullSink, device_name, mfu, peak_tflops
from training.objectives import objective_for
from training.optim import build_optimizer, drop_repeated_norm_checks, lr_at, param_groups, set_lr
from training.periodic import PeriodicEval, full_module
from training.preempt import SAVE, STOP
from training.prefetch import DevicePrefetcher
from training.profiles import get_profile, set_sdpa
from training.progress import ConsoleProgress, LogWindow


class NonFiniteLossError(RuntimeError):
    """Raised after `max_bad_steps` consecutive micro-batches with a NaN/Inf loss."""


class Trainer(Interruptions):
    """Pre-train / fine-tune `model` with DeepSpeed ZeRO according to `cfg`.

    `train_loader`: any re-iterable of `(images, targets)` batches of `cfg.micro_batch` per
    rank (each `iter()` = one epoch from the current cursor) with `state_dict()` /
    `load_state_dict()`; `stats()` is logged when present; uint8 images are normalized on the
    device by the loader's `normalize(images)` (pipeline's `DataConfig(output="uint8")`).
    `eval_loader` yields `(images, targets, valid)` exactly once per sample over all ranks.
    `checkpoint_dir` is a local (or shared) directory; `checkpoint_store` mirrors it remotely
    (needs checkpoint_dir). `periodic`: extra evaluations (`training.periodic.PeriodicEval`, e.g.
    orchestration's few-shot evaluator) run on every rank at their own interval and at the end.
    `console`: rank 0 prints its progress on stdout (`training.progress.ConsoleProgress`).
    `teacher`: the objective's frozen model, on every rank: the distillation objective's teacher
    (`training.objectives.distill`), BEiT's tokenizer (`training.objectives.beit`); frozen,
    outside the DeepSpeed engine (no optimizer state, not in checkpoints).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        train_loader: Iterable,
        *,
        eval_loader: Iterable | None = None,
        sink: MetricsSink | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_store: ckpt.CheckpointStore | None = None,
        periodic: Sequence[PeriodicEval] = (),
        console: bool = True,
        teacher: nn.Module | None = None,
    ) -> None:
        import deepspeed

        if checkpoint_store is not None and checkpoint_dir is None:  # before the costly engine build
            raise ValueError("checkpoint_store needs a local checkpoint_dir to stage files in")
        self.cfg = cfg
        self.dist: DistInfo = init_distributed()
        self.accum = cfg.accum_for(self.dist.world_size)  # clear error if the batch doesn't fit
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.periodic = tuple(periodic)
        self.sink: MetricsSink = sink if (sink is not None and self.dist.is_main) else NullSink()
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self._seed(cfg.seed + self.dist.rank)
        if cfg.profile in ("auto", "cpu", "t4", "a100", "h100"):
            set_sdpa(get_profile(cfg.profile).sdpa)

        self.objective = objective_for(cfg.objective, teacher=teacher)
        module = self.objective.wrap(model)  # the model plus the objective's own modules (MAE's decoder)
        if hasattr(module, "set_grad_checkpointing"):
            module.set_grad_checkpointing(cfg.engine.activation_checkpointing)
        module.to(self.dist.device)
        self._broadcast_params(module)  # ZeRO-3 partitions each rank's own copy: make them equal
        self.flops_per_image = self.objective.flops_per_image(module)
        groups = param_groups(module, cfg.optim.weight_decay, cfg.optim.layer_decay)
        optimizer = build_optimizer(cfg, groups, self.dist.device.type)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=deepspeed_config(cfg, self.dist.world_size)
        )
        drop_repeated_norm_checks(self.optimizer)  # host syncs DeepSpeed's ZeRO-1/2 step repeats
        self.checkpoints = ckpt.CheckpointManager(self.engine, self.dist, self.checkpoint_dir, checkpoint_store)
        if cfg.engine.compile:
            # In place (nn.Module.compile): state_dict keys, checkpoints and exported weights
            # are the same as without it.
            self.engine.compile(backend=cfg.engine.compile_backend)
        self.input_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.engine.precision, torch.float32)
        self.device_name = device_name(self.dist.device)
        self.peak = peak_tflops(self.device_name, cfg.engine.precision)
        self.console = ConsoleProgress(cfg, world_size=self.dist.world_size, accum=self.accum,
                                       device=self.device_name, enabled=console and self.dist.is_main)

        # DeepSpeed checks gradients for overflow in ZeRO 1-3, in bf16 and fp16; not in ZeRO-0 fp32.
        self._own_overflow_check = cfg.engine.zero_stage == 0 and cfg.engine.precision == "fp32"
        state = getattr(train_loader, "state_dict", None)
        self._batches = DevicePrefetcher(self._next_batch, self.dist.device, state if callable(state) else None)

        self._step = 0
        self._init_fault_handling(cfg)
        self.bad_steps = 0  # optimizer steps skipped for a non-finite loss or gradient, in total
        self._bad_in_row = 0
        self._epoch_iter: Iterator | None = None
        self._last_loss: torch.Tensor | None = None  # this rank's, on the device
        self.last_loss = float("nan")  # over all ranks; set when fit() logs or returns

    # ------------------------------------------------------------------ public
    @property
    def step(self) -> int:
        """Optimizer steps taken so far (the global step)."""
        return self._step

    @property
    def model(self) -> nn.Module:
        """The wrapped module (partitioned under ZeRO-3; use export_weights for full weights)."""
        return self.engine.module

    def fit(self, resume: str | int | None = None, *, max_steps: int | None = None) -> dict[str, float]:
        """Train until `cfg.schedule.total_steps` (or `max_steps`, for time-boxed jobs); return final metrics.

        `resume`: None (fresh), "auto" (newest intact committed checkpoint in checkpoint_dir / the
        store, fresh if none; a damaged one is reported and the next older one tried), a step
        (500, "500"), a tag ("step500") or a checkpoint directory path.
        """
        self.watchdog.start()
        self.preemption.install()
        try:
            return self._fit(resume, max_steps)
        finally:
            self.preemption.uninstall()
            self.watchdog.stop()

    def _fit(self, resume: str | int | None, max_steps: int | None) -> dict[str, float]:
        if resume is not None:
            self.watchdog.beat("checkpoint", self._step)
            self.restore(resume)
        stop = min(self.cfg.schedule.total_steps, max_steps if max_steps is not None else self.cfg.schedule.total_steps)
        self.sink.log_params(
            {**self.cfg.to_dict(), "world_size": self.dist.world_size, "grad_accum": self.accum, "device": self.device_name}
        )
        result: dict[str, float] = {"step": float(self._step)}
        window = LogWindow(self.dist.device)
        self.console.started(self._step, stop)
        while self._step < stop:
            loss, wait = self.train_step()  # batch -> step
            window.add(loss, wait)
            self.console.stepped(self._step)
            self.watchdog.beat("collective", self._step)
            self.preemption.step = self._step
            decided = self.preemption.poll()
            if decided == STOP:  # SIGTERM on any rank: every rank saves and exits 0
                self._stop_preempted()
            if decided == SAVE:  # a preemption notice: every rank saves once, training goes on
                self._save_on_notice()
            if loss is None:  # skipped for a NaN/Inf: nothing to log, eval or save
                continue
            if self._step % self.cfg.log_every == 0 or self._step == stop:  # log: the sink and the console
                metrics = self._log_metrics(window)
                self.sink.log_metrics(metrics, self._step)
                self.console.logged(self._step, metrics)
                if self._progress is not None:
                    self._progress.record(self._step, (time.perf_counter() - window.start) / max(window.steps, 1))
                window = LogWindow(self.dist.device)
            if self.eval_loader is not None and self._due(self.cfg.eval_every, stop):  # eval
                result.update(self.evaluate())
            for p in self.periodic:  # e.g. few-shot: every rank, its own interval, and at the end
                if self._due(p.every, stop):
                    result.update(self.run_periodic(p))
            if self.checkpoint_dir is not None and self._due(self.cfg.checkpoint.every, stop):  # checkpoint
                self.save_checkpoint()
        self.preemption.drain()
        if self.preemption.requested_at is not None:  # signalled during the last step: already saved
            self.preemption.done()
        self.watchdog.beat("collective", self._step)
        if self._last_loss is not None:  # every rank: the last step's loss over all ranks
            self.last_loss = all_reduce_sum(self._last_loss.reshape(1).clone()).item() / self.dist.world_size
        result.update(step=float(self._step), loss=self.last_loss, bad_steps=float(self.bad_steps),
                      **self.faults.metrics())
        self.console.finished(self._step, result)
        return result

    # ------------------------------------------------------------------ steps
    def train_step(self) -> tuple[torch.Tensor | None, float]:
        """One optimizer step over `accum` micro-batches; returns (this rank's mean loss as a
        device tensor, or None when the step was skipped for a NaN/Inf; data wait in s).

        Nothing here waits for the device: losses stay on it, and whether the step is skipped
        is decided once, at the accumulation boundary, by DeepSpeed's overflow check (a
        non-finite global gradient norm; `_poison` makes a non-finite loss one). That check is
        the step's one host synchronisation; ZeRO-0 fp32, which has none, gets ours.
        """
        set_lr(self.optimizer, lr_at(self.cfg, self._step))
        skipped_before = self.engine.skipped_steps
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        wait = 0.0
        for i in range(self.accum):
            t0 = time.perf_counter()
            self.watchdog.beat("data")
            batch = self._batches.take()
            wait += time.perf_counter() - t0
            self.watchdog.beat("forward_backward")
            self.objective.begin_micro_batch(step=self._step, slot=i * self.dist.world_size + self.dist.rank,
                                             seed=self.cfg.seed)
            loss = self.objective.loss(self.engine, self._to_device(batch, self.train_loader, non_blocking=True))
            loss_sum += loss.detach()
            self.engine.backward(_poison(loss))
            t0 = time.perf_counter()
            self._batches.preload()  # CUDA: the next batch's copy overlaps this backward
            wait += time.perf_counter() - t0
            self.watchdog.beat("optimizer_step")
            if i == self.accum - 1 and self._own_overflow_check:
                self._boundary_step_checked()
            else:
                self.engine.step()
        if self._skipped_for_nonfinite(self.engine.skipped_steps != skipped_before, loss_sum):
            return None, wait
        self._bad_in_row = 0
        self._step += 1
        self._last_loss = loss_sum / self.accum
        return self._last_loss, wait

    def _skipped_for_nonfinite(self, skipped: bool, loss_sum: torch.Tensor) -> bool:
        """Count a step DeepSpeed skipped as bad (every rank sees the same global decision);
        `max_bad_steps` in a row raise. Under fp16 a skip is usually the loss scaler's
        overflow (logged as skipped_updates, not bad): only a non-finite loss counts then."""
        if not skipped:
            return False
        if self.cfg.engine.precision == "fp16":
            flag = all_reduce_sum((~torch.isfinite(loss_sum)).double().reshape(1))
            if flag.item() == 0:  # a host sync, on skipped steps only
                return False
        self.bad_steps += 1
        self._bad_in_row += 1
        if self._bad_in_row >= self.cfg.faults.max_bad_steps:
            raise NonFiniteLossError(
                f"{self._bad_in_row} consecutive batches (optimizer steps) had a NaN/Inf loss or gradient at step "
                f"{self._step} (max_bad_steps={self.cfg.faults.max_bad_steps}); lower lr ({self.cfg.optim.lr}), check the data, "
                f"or use precision='bf16'/'fp32' instead of {self.cfg.engine.precision!r}"
            )
        return True

    def _boundary_step_checked(self) -> None:
        """ZeRO-0 fp32 (no DeepSpeed overflow check): skip the update on every rank when any
        rank's gradients are not finite, keeping DeepSpeed's step counters going as usual."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        bad = torch.zeros(1, dtype=torch.float64, device=self.dist.device)
        if grads:  # per tensor, not a sum of sums: a large finite sum must not overflow to inf
            bad += (~torch.stack([torch.isfinite(g).all() for g in grads])).sum()
        if all_reduce_sum(bad).item() == 0:  # the step's one host sync
            self.engine.step()
            return
        opt = self.engine.optimizer
        opt.step = lambda *args, **kwargs: None  # our own optimizer object: this update only
        try:
            self.engine.step()  # counters advance, gradients are zeroed
        finally:
            del opt.step
        self.engine.skipped_steps += 1

    def _to_device(self, batch: tuple, loader: Any, *, non_blocking: bool = False) -> tuple:
        """A batch on the device, images in the model's input dtype; uint8 images
        (``DataConfig(output="uint8")``) are normalized there by the loader's ``normalize``: a
        quarter of the bytes on the host and through the copy, and no float conversion on the host."""
        images, *rest = batch
        rest = [t.to(self.dist.device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t for t in rest]
        if images.dtype != torch.uint8:  # one copy, converting to the input dtype on the way
            return (images.to(self.dist.device, self.input_dtype, non_blocking=non_blocking), *rest)
        normalize = getattr(loader, "normalize", None)
        if normalize is None:
            raise TypeError(f"{type(loader).__name__} yielded uint8 images but has no normalize(images) "
                            "method to turn them into model inputs; yield float images instead")
        return (normalize(images.to(self.dist.device, non_blocking=non_blocking)).to(self.input_dtype), *rest)

    def _next_batch(self) -> tuple:
        """Next training batch; a new epoch starts when the loader's epoch is exhausted."""
        for _ in range(2):
            if self._epoch_iter is None:
                self._epoch_iter = iter(self.train_loader)
            try:
                return next(self._epoch_iter)
            except StopIteration:
                self._epoch_iter = None
        raise RuntimeError("train_loader yielded no batches for a whole epoch")

    def _due(self, every: int, stop: int) -> bool:
        return self._step == stop or (every > 0 and self._step % every == 0)

    # ------------------------------------------------------------------ metrics
    def _log_metrics(self, window: LogWindow) -> dict[str, float]:
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        images_per_s = window.steps * self.cfg.global_batch / elapsed
        grad_norm = self.engine.get_global_grad_norm()
        scale = getattr(self.optimizer, "cur_scale", None) if self.cfg.engine.precision == "fp16" else 1.0
        # The window's losses (and the objective's own sums: BEiT's masked-token hits) summed over
        # ranks: the one sync and collective per log line.
        extra = self.objective.train_sums()
        packed = window.loss_sum.reshape(1).clone()
        if extra is not None:
            packed = torch.cat([packed, extra.to(packed)])
        packed = all_reduce_sum(packed).cpu()
        loss = packed[0].item() / self.dist.world_size / max(window.steps, 1)
        self.last_loss = loss
        out: dict[str, float] = {
            "loss": loss,
            "lr": lr_at(self.cfg, self._step - 1),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "loss_scale": float(scale) if scale is not None else float("nan"),
            "images_per_s": images_per_s,
            "data_wait_frac": window.wait / elapsed,
            "bad_steps": float(self.bad_steps),
            "skipped_updates": float(getattr(self.engine, "skipped_steps", 0)),
        }
        if self.flops_per_image is not None:
            achieved = self.flops_per_image * images_per_s / self.dist.world_size  # per device
            out["tflops_per_device"] = achieved / 1e12
            out["mfu"] = mfu(self.flops_per_image, images_per_s / self.dist.world_size, self.peak)
        if extra is not None:
            out.update(self.objective.train_metrics(packed[1:]))
        stats = getattr(self.train_loader, "stats", None)
        if callable(stats):
            out.update({f"data/{k}": float(v) for k, v in stats().items()})
        return out

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The objective's evaluation over the whole eval set, all ranks (classification: top-1 /
        top-5 or precision@1 and the loss; MAE: the reconstruction loss).

        The objective's sums are summed over ranks with all_reduce; padding rows (valid=False)
        are ignored, so each sample of the exactly-once eval loader counts once.
        """
        assert self.eval_loader is not None
        t0 = time.perf_counter()
        self.engine.eval()
        sums = torch.zeros(len(self.objective.eval_keys), dtype=torch.float64)
        for batch in self.eval_loader:
            self.watchdog.beat("eval")
            sums += self.objective.eval_sums(self.engine, self._to_device(batch, self.eval_loader))
        all_reduce_sum(sums)
        self.engine.train()
        out = self.objective.eval_metrics(sums)
        self.sink.log_metrics(out, self._step)
        self.console.evaluated(self._step, out, time.perf_counter() - t0)
        self._on_eval()
        return out

    def _on_eval(self) -> None:
        """Give the sink the model (gathered under ZeRO-3, so every rank takes part)."""
        with full_module(self.engine) as module:
            self.sink.on_eval(module, self._step)

    @torch.no_grad()
    def run_periodic(self, p: PeriodicEval) -> dict[str, float]:
        """Run ``p`` now on every rank with the full model; rank 0's sink logs what it returns."""
        t0 = time.perf_counter()
        with full_module(self.engine) as module:
            out = {k: float(v) for k, v in p.fn(self.objective.exported(module), self._step).items()}
        out[f"{p.name}/seconds"] = time.perf_counter() - t0
        self.sink.log_metrics(out, self._step)
        self.console.evaluated(self._step, out, out[f"{p.name}/seconds"], name=p.name)
        return out

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, cfg: TrainConfig | None = None) -> str:
        """Save the engine + per-rank state as tag `step{N}` and commit it (all ranks call this);
        the commit protocol is `training.checkpoint.CheckpointManager`'s. `cfg`: this config with
        other resumable fields (a shorter io_timeout_s under preemption)."""
        def state() -> dict[str, Any]:
            return {"loader": self._batches.loader_state(), "bad_steps": self.bad_steps,
                    "faults": self.faults.to_dict()}

        self.watchdog.beat("checkpoint", self._step)
        t0 = time.monotonic()
        tag = self.checkpoints.save(self._step, cfg or self.cfg, state)
        self.preemption.save_s = max(self.preemption.save_s, time.monotonic() - t0)  # for a notice's last save
        self.console.saved(self._step, tag, time.monotonic() - t0)
        self._saved_step = self._step
        self.watchdog.beat("collective", self._step)
        return tag

    def restore(self, resume: str | int) -> bool:
        """Load a checkpoint (see `fit`; `CheckpointManager.restore`); False when "auto" finds none."""
        state = self.checkpoints.restore(resume, self.cfg)
        if state is None:
            return False
        self._step = int(state["step"])
        self._saved_step = self._step
        self.bad_steps = int(state.get("bad_steps", 0))
        self.faults = FaultStats.restored(state.get("faults"), saved_world=int(state.get("world_size", 0)),
                                          world=self.dist.world_size, step=self._step, progress=state["progress"])
        self.sink.log_metrics({**self.faults.metrics(), "fault/damaged_checkpoints_skipped": float(len(state["damaged"]))},
                              self._step)
        if state["loader"] is not None:
            self.train_loader.load_state_dict(state["loader"])
        self._epoch_iter = None
        self._batches.reset()
        return True

    # ------------------------------------------------------------------ helpers
    def _broadcast_params(self, model: nn.Module) -> None:
        if self.dist.world_size == 1:
            return
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                torch.distributed.broadcast(t.data, src=0)

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


def _poison(loss: torch.Tensor) -> torch.Tensor:
    """`loss`, whose gradients are all NaN when it is not finite (bitwise unchanged when it is).

    A NaN/Inf loss does not always give non-finite gradients (cross-entropy's gradient stays
    finite at an infinite loss); this makes DeepSpeed's gradient-norm check, which already
    runs once per step on every rank, skip such a step too, without reading the loss on the
    host.
    """
    bad = torch.where(torch.isfinite(loss.detach()), 0.0, float("nan"))
    return loss * (1.0 + bad)

