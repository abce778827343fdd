"""Per-GPU memory of a run: model states under ZeRO, communication buffers, activations, the fit.

Model states follow DeepSpeed's own accounting (Rajbhandari et al. 2019, "ZeRO", Section 3.1;
``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs`` and its stage-3
twin), per parameter and with W the ranks (w = 2 bytes at bf16/fp16, 4 at fp32):

==================  =======================  ========================================================
state               bytes per parameter      divided by W from
==================  =======================  ========================================================
weights             w                        ZeRO-3 (+ the gathered largest layer, w per parameter)
gradients           w                        ZeRO-2 (+ the largest layer's full gradient at ZeRO-3)
fp32 gradients      4 (optimizer step only)  ZeRO-1 (none at ZeRO-0 fp32: torch's optimizer reads .grad;
                                             ZeRO-3 frees its 16-bit gradients as it makes them)
fp32 master         4 (none at ZeRO-0 fp32)  ZeRO-1
Adam moments        8 (SGD momentum: 4)      ZeRO-1
==================  =======================  ========================================================

``offload="cpu"`` moves the fp32 gradients, master weights and moments (and ZeRO-2's gradient
partition, accumulated on the host) to host memory. The fp32 gradients exist only while the
optimizer steps, when the activations are gone, so the peak is
``max(states + activations, states + fp32 gradients)`` plus DeepSpeed's communication buckets
(``training/deepspeed_config.py``: 5e7-element reduce / prefetch buckets).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Elements of DeepSpeed's reduce bucket (and ZeRO-3's prefetch bucket): training/deepspeed_config.py.
BUCKET_ELEMENTS = int(5e7)
#: Kept free on every card: the CUDA context, NCCL's buffers and cuBLAS workspaces (~1 GB) and
#: the caching allocator's fragmentation (5 % of the card).
CONTEXT_BYTES = 1.0e9
FRAGMENTATION = 0.05


@dataclass(frozen=True)
class ModelStates:
    """Bytes of each model state on one GPU. ``gathered``: ZeRO-3's working set, the largest layer's
    full 16-bit weights and gradients (counted in ``weights`` / ``gradients``, gone at the step);
    ``host``: per rank, on the host under offload."""

    weights: float
    gradients: float
    fp32_gradients: float
    master: float
    moments: float
    gathered: float
    host: float
    zero: int

    @property
    def during_backward(self) -> float:
        return self.weights + self.gradients + self.master + self.moments

    @property
    def during_step(self) -> float:
        """At the optimizer step: the fp32 gradients exist; ZeRO-3 has turned its 16-bit gradient
        partition into them (DeepSpeed frees it) and released the gathered layer."""
        grads = 0.0 if self.zero >= 3 else self.gradients
        return self.weights - self.gathered / 2 + grads + self.fp32_gradients + self.master + self.moments

    @property
    def peak(self) -> float:
        """What DeepSpeed's estimators estimate: the states' own peak, no activations."""
        return max(self.during_backward, self.during_step)


def model_states(params: int, largest_layer: int, *, zero: int, precision: str, workers: int, offload: str,
                 optimizer: str = "adamw", buffers: int = 0) -> ModelStates:
    """The model states of ``params`` trained parameters on each of ``workers`` GPUs."""
    w = 4 if precision == "fp32" else 2
    P, W = float(params), float(workers)
    moments = 8.0 if optimizer == "adamw" else 4.0
    master = 0.0 if (zero == 0 and w == 4) else 4.0
    fp32_grads = 0.0 if (zero == 0 and w == 4) else 4.0
    opt_div = W if zero >= 1 else 1.0
    gathered = float(2 * w * largest_layer) if zero >= 3 else 0.0  # one layer's full 16-bit weights + gradients
    weights = w * P / (W if zero >= 3 else 1.0) + gathered / 2 + buffers
    grads_partition = w * P / (W if zero >= 2 else 1.0)
    host = 0.0
    if offload == "cpu":
        host = (master + moments + fp32_grads) * P / opt_div
        if zero >= 2:  # DeepSpeed accumulates the gradient partition in pinned host memory
            host += grads_partition
            grads_partition = 0.0
        master, moments, fp32_grads = 0.0, 0.0, 0.0
    return ModelStates(weights=weights, gradients=grads_partition + gathered / 2,
                       fp32_gradients=fp32_grads * P / opt_div, master=master * P / opt_div,
                       moments=moments * P / opt_div, gathered=gathered, host=host, zero=zero)


def bucket_bytes(zero: int, precision: str) -> float:
    """DeepSpeed's communication buckets on one GPU: the reduce bucket (ZeRO >= 1) and ZeRO-3's
    prefetch bucket, in the gradients' dtype."""
    w = 4 if precision == "fp32" else 2
    return float(BUCKET_ELEMENTS * w * ((zero >= 1) + (zero >= 3)))


def usable_bytes(memory_gb: float) -> float:
    """What a card of ``memory_gb`` leaves for the run (see CONTEXT_BYTES, FRAGMENTATION)."""
    return memory_gb * 1e9 * (1 - FRAGMENTATION) - CONTEXT_BYTES


@dataclass(frozen=True)
class MemoryPlan:
    """One GPU's memory at the plan's settings; ``peak`` uses the run's activation checkpointing."""

    states: ModelStates
    buffers: float
    activations: float  # without activation checkpointing
    activations_ckpt: float  # with it
    checkpointing: bool
    usable: float

    @property
    def activations_used(self) -> float:
        return self.activations_ckpt if self.checkpointing else self.activations

    @property
    def peak(self) -> float:
        s = self.states
        return max(s.during_backward + self.activations_used, s.during_step) + self.buffers

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable
