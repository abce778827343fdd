"""The plan of one experiment on N devices: memory, time, data, checkpoints, cost, and fixes.

Pure computation (no Ray, no MLflow, no storage but the optional dataset index read by the
caller): ``estimate(exp, device, gpus=N, data=facts)`` returns a :class:`Plan`, whose ``to_dict()``
is the JSON the CLI writes and whose fields the report prints (``planning.planner.plan`` adds the
fixes of a run that does not fit and the speed-ups of one that fits with room).

Time: a step's useful FLOPs (``model.flops``: the analytic ViT count, MAE's encoder on the
visible quarter plus its decoder, timm networks through the generic counter; x3 for forward +
backward) over the devices' peak x the Trainer's measured MFU (``planning.devices``), x4/3 with
activation checkpointing (the forward runs twice), plus the gradient / parameter collectives
ZeRO needs per step that the backward pass cannot hide (ring collectives at the node's assumed
bus bandwidth). Everything else is in ``planning.memory`` (memory), ``planning.trace`` (the
activations) and ``planning.dataset`` (the data).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from model.flops import macs_per_image, mae_macs_per_image
from model.network import NetConfig
from orchestration.experiment import Experiment
from orchestration.planning import devices as dv
from orchestration.planning.dataset import DataFacts
from orchestration.planning.memory import MemoryPlan, bucket_bytes, model_states, usable_bytes
from orchestration.planning.trace import ModelTrace, trace_model

#: A save may cost at most this share of the run; the plan names the interval that keeps it there.
CHECKPOINT_BUDGET = 0.02


@dataclass(frozen=True)
class Plan:
    """Everything the plan says; see :meth:`to_dict` for the JSON layout."""

    exp: Experiment
    device: dv.Device
    gpus: int
    data: DataFacts
    trace: ModelTrace
    memory: MemoryPlan
    flops_per_image: float  # useful training FLOPs (forward + backward), no recomputation
    compute_s: float  # one optimizer step's compute
    comm_s: float  # its collectives, in all
    exposed_comm_s: float  # the part the backward pass does not hide
    storage_gbs: float
    price: float | None
    notes: tuple[str, ...] = ()
    fixes: tuple[dict[str, Any], ...] = field(default=())
    speedups: tuple[dict[str, Any], ...] = field(default=())

    # ------------------------------------------------------------------ derived numbers
    @property
    def nodes(self) -> int:
        return -(-self.gpus // self.device.per_node)

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_comm_s

    @property
    def images_per_s(self) -> float:
        return self.exp.global_batch / self.step_s

    @property
    def checkpoint_bytes(self) -> dict[str, float]:
        """Bytes of one checkpoint: the rank-0 model file (16/32-bit weights and buffers; nothing
        at ZeRO-3, whose weights live in the optimizer partitions) and every rank's optimizer
        partition (fp32 master weights and moments)."""
        s, P = self.exp.train, self.trace.params
        w = 4 if s.engine.precision == "fp32" else 2
        moments = 8 if s.optim.name == "adamw" else 4
        master = 0 if (s.engine.zero_stage == 0 and w == 4) else 4
        model = 0.0 if s.engine.zero_stage >= 3 else float(w * P)
        return {"model_file": model + self.trace.buffers, "optimizer_files": float((master + moments) * P)}

    @property
    def checkpoint_save_s(self) -> float:
        """A save is synchronous (training.checkpoint.manager): every node writes its ranks' share,
        node 0 also the model file, at ``storage_gbs`` per node."""
        b = self.checkpoint_bytes
        return (b["optimizer_files"] / self.nodes + b["model_file"]) / (self.storage_gbs * 1e9)

    def checkpoint_share(self, every: int) -> float:
        if every <= 0:
            return 0.0
        return self.checkpoint_save_s / (every * self.step_s + self.checkpoint_save_s)

    @property
    def checkpoint_every_for_budget(self) -> int:
        """The smallest interval (steps) whose saves cost <= CHECKPOINT_BUDGET of the run."""
        return max(1, math.ceil(self.checkpoint_save_s * (1 - CHECKPOINT_BUDGET) / (CHECKPOINT_BUDGET * self.step_s)))

    @property
    def run_s(self) -> float:
        every = self.exp.train.checkpoint.every
        steps = self.exp.train.schedule.total_steps
        saves = steps // every if every else 1
        return steps * self.step_s + saves * self.checkpoint_save_s

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-able numbers (bytes, seconds), the fixes and the notes."""
        e, m, d, dev = self.exp, self.memory, self.data, self.device
        img_s = self.images_per_s
        node_img_s = img_s / self.nodes
        gpu_hours = self.gpus * self.run_s / 3600
        ck = self.checkpoint_bytes
        st = m.states
        return {
            "recipe": e.name, "device": dev.key, "device_title": dev.title, "gpus": self.gpus, "nodes": self.nodes,
            "model": e.model.variant, "objective": e.train.objective.kind, "image_size": e.image_size,
            "params": self.trace.params, "zero_stage": e.train.engine.zero_stage, "offload": e.train.engine.offload,
            "precision": e.train.engine.precision, "activation_checkpointing": m.checkpointing,
            "global_batch": e.global_batch, "micro_batch": e.train.micro_batch, "grad_accum": e.grad_accum,
            "memory": {
                "weights": st.weights, "gradients": st.gradients, "fp32_gradients_at_step": st.fp32_gradients,
                "master_weights": st.master, "optimizer_moments": st.moments, "buckets": m.buffers,
                "activations": m.activations, "activations_checkpointed": m.activations_ckpt,
                "peak": m.peak, "usable": m.usable, "card": dev.memory_gb * 1e9, "fits": m.fits,
                "host_per_node_offload": st.host * min(self.gpus, dev.per_node),
            },
            "compute": {
                "flops_per_image": self.flops_per_image, "step_s": self.step_s, "compute_s": self.compute_s,
                "comm_s": self.comm_s, "exposed_comm_s": self.exposed_comm_s, "images_per_s": img_s,
                "tflops_per_device": dev.tflops(e.train.engine.precision, e.train.engine.compile),
                "mfu": None if dev.achieved_tflops is not None else
                (dev.mfu_compiled if e.train.engine.compile else dev.mfu),
                "mfu_source": dev.mfu_source, "total_steps": e.train.schedule.total_steps,
                "run_s": self.run_s, "epochs": e.train.schedule.total_steps * e.global_batch / d.images,
            },
            "data": {
                "images": d.images, "classes": d.classes, "sample_bytes": d.sample_bytes, "shards": d.shards,
                "source": d.source, "bytes_per_s": img_s * d.sample_bytes,
                "bytes_per_s_per_node": node_img_s * d.sample_bytes,
                "decode_cores_per_node": node_img_s * dv.DECODE_S, "decode_source": dv.DECODE_SOURCE,
                "cpus_per_node": e.resources.cpus_per_worker * min(self.gpus, dev.per_node),
                "shards_per_rank": d.shards / self.gpus,
                "shards_per_loader_worker": d.shards / (self.gpus * max(e.data.io.num_workers, 1)),
                "s3_requests_per_s": img_s / d.samples_per_shard * dv.REQUESTS_PER_SHARD,
                "epoch_s": d.images / img_s,
            },
            "checkpoint": {
                "bytes": ck["model_file"] + ck["optimizer_files"], **{f"{k}_bytes": v for k, v in ck.items()},
                "save_s": self.checkpoint_save_s, "storage_gbs_per_node": self.storage_gbs,
                "every": e.train.checkpoint.every, "share": self.checkpoint_share(e.train.checkpoint.every),
                "every_for_2pct": self.checkpoint_every_for_budget,
                "traffic_bytes_per_hour": (ck["model_file"] + ck["optimizer_files"]) * 3600
                / max(e.train.checkpoint.every * self.step_s, 1e-9) if e.train.checkpoint.every else 0.0,
            },
            "cost": {"gpu_hours": gpu_hours, "price_per_gpu_hour": self.price,
                     "total": None if self.price is None else gpu_hours * self.price},
            "fixes": list(self.fixes), "speedups": list(self.speedups), "notes": list(self.notes),
        }


def flops_per_image(exp: Experiment, net: NetConfig) -> float:
    """Useful training FLOPs per image (forward + backward = 3 forwards, 2 FLOPs per MAC)."""
    o = exp.train.objective
    if o.kind == "mae":
        visible = net.num_patches - int(net.num_patches * o.mask_ratio)  # type: ignore[union-attr]
        return 6.0 * mae_macs_per_image(net, o.decoder_width, o.decoder_depth, o.decoder_mlp_dim, visible)  # type: ignore[arg-type]
    return 6.0 * macs_per_image(net)


def comm_seconds(exp: Experiment, params: int, device: dv.Device, gpus: int) -> float:
    """Seconds of ZeRO's collectives per optimizer step (ring: (W-1)/W of the bytes per rank, at
    the inter-node bandwidth as soon as the ranks span nodes). ZeRO-0/1: one all-reduce (or
    reduce-scatter + all-gather) of the gradients per step; ZeRO-2: a reduce-scatter every
    micro-batch and one all-gather; ZeRO-3: two all-gathers and a reduce-scatter every micro-batch."""
    if gpus <= 1:
        return 0.0
    w = 4 if exp.train.engine.precision == "fp32" else 2
    accum, zero = exp.grad_accum, exp.train.engine.zero_stage
    volumes = {0: 2, 1: 2, 2: accum + 1, 3: 3 * accum}[zero]
    gbs = device.intra_gbs if gpus <= device.per_node else device.inter_gbs
    return volumes * (gpus - 1) / gpus * params * w / (gbs * 1e9)


def at_scale(exp: Experiment, gpus: int) -> tuple[Experiment, list[str]]:
    """``exp`` on ``gpus`` ranks, keeping the global batch: the micro batch is lowered to the
    largest that splits it when the recipe's no longer does (said in the returned notes)."""
    g, micro = exp.train.global_batch, exp.train.micro_batch
    if gpus > g:
        raise ValueError(f"--gpus {gpus} is more than the global batch {g}: every GPU needs at least one image per "
                         f"step; use at most {g} GPUs or --set train.global_batch=N with N >= {gpus}")
    m = next(m for m in range(min(micro, g // gpus), 0, -1) if g % (m * gpus) == 0) if g % gpus == 0 else 0
    if not m:
        raise ValueError(f"global batch {g} cannot be split evenly over {gpus} GPUs; choose a GPU count that "
                         f"divides {g} (e.g. {_divisor_near(g, gpus)}) or --set train.global_batch=N")
    notes = [] if m == micro else [f"micro batch lowered from {micro} to {m}: {gpus} GPUs x {micro} is more than "
                                   f"the global batch {g}, or does not divide it"]
    train = exp.train.replace(micro_batch=m, grad_accum=None)
    return dataclasses.replace(exp, train=train, resources=dataclasses.replace(exp.resources, workers=gpus,
                                                                                 min_workers=None)), notes


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


def estimate(exp: Experiment, device: dv.Device, *, gpus: int, data: DataFacts, storage_gbs: float = 1.0,
             price: float | None = None) -> Plan:
    """The plan of ``exp`` on ``gpus`` devices of ``device`` (see the module docstring), without
    fixes (``planning.planner.plan`` adds them)."""
    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: need at least 1")
    exp, notes = at_scale(exp, gpus)
    e = exp.train.engine
    net = exp.model_config(num_classes=max(data.classes, 1))
    trace = trace_model(net, exp.train.objective, e.precision, exp.train.micro_batch)
    states = model_states(trace.params, trace.largest_layer, zero=e.zero_stage, precision=e.precision,
                          workers=gpus, offload=e.offload, optimizer=exp.train.optim.name, buffers=trace.buffers)
    ckpt = e.activation_checkpointing and trace.checkpointing_supported
    memory = MemoryPlan(states=states, buffers=bucket_bytes(e.zero_stage, e.precision),
                        activations=trace.activations, activations_ckpt=trace.activations_ckpt, checkpointing=ckpt,
                        usable=usable_bytes(device.memory_gb))
    fpi = flops_per_image(exp, net)
    compute = exp.global_batch / gpus * fpi * (4 / 3 if ckpt else 1) / (device.tflops(e.precision, e.compile) * 1e12)
    comm = comm_seconds(exp, trace.params, device, gpus)
    hidden = 0.0 if e.zero_stage <= 1 else compute * (1.0 if e.zero_stage == 3 else 2 / 3)
    if e.activation_checkpointing and not trace.checkpointing_supported:
        notes.append(f"{exp.model.variant} has no set_grad_checkpointing: planned without activation checkpointing")
    if trace.masked_attention:
        notes.append("some attention takes a mask (shifted windows / relative position bias): its (B, heads, N, N) "
                     "probabilities are counted as stored, so activations are an upper bound")
    if e.offload == "cpu":
        notes.append("offload: host Adam and PCIe copies are not in the step time (it is a lower bound)")
    if exp.train.micro_batch < 64 and device.achieved_tflops is None:
        notes.append(f"the MFU was measured at micro batch 256; at {exp.train.micro_batch} kernels are smaller and "
                     "the step time is optimistic")
    return Plan(exp=exp, device=device, gpus=gpus, data=data, trace=trace, memory=memory, flops_per_image=fpi,
                compute_s=compute, comm_s=comm, exposed_comm_s=max(0.0, comm - hidden), storage_gbs=storage_gbs,
                price=price, notes=tuple(notes))
