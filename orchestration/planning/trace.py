"""What one training micro-batch holds in memory, found by running it on the meta device.

The trained module of an experiment (the network plus its objective's modules: MAE's decoder)
is built under ``torch.device("meta")`` in the run's precision and one micro-batch goes
through the objective's loss and ``backward()``: shapes and dtypes flow, nothing is allocated
or computed, so ViT-H/14 at micro batch 32 costs well under a second on a laptop. A
``TorchDispatchMode`` sees every tensor an operator creates and a weak reference on its storage
tells when the last user lets go (autograd's saved tensors included), so the peak of live
bytes above the weights is the micro-batch's activation memory, with or without activation
checkpointing (the recomputation of a block during backward is traced too). The same tracker
on real CPU tensors agrees with torch's profiler's allocation events to the byte
(tests/test_plan.py), and the meta trace with the real CPU run within a few percent.

Two things the meta device does differently from a GPU run, corrected here:

* attention: ``F.scaled_dot_product_attention`` on meta takes the math path, which stores the
  (B, heads, N, N) probabilities; the flash / memory-efficient kernels the GPU profiles use store
  only q, k, v, the output and a log-sum-exp. While tracing, SDPA without a mask runs torch's
  fused CPU flash operator (meta-capable, it saves exactly that); a masked call (Swin's shifted
  windows, BEiT's relative position bias) keeps the math path, so those are over-estimated by
  the probabilities, said in the plan's notes;
* parameter gradients are dropped as soon as they are accumulated: DeepSpeed moves them into
  its ZeRO buffers, which the model-state accounting counts (``planning.memory``).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from model import build_network
from model.network import NetConfig
from training.objectives import ObjectiveConfig, objective_for

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelTrace:
    """The trained module of one experiment at one micro batch.

    ``params``: trained parameters; ``buffers``: bytes of persistent buffers (MAE's fixed position
    embeddings); ``largest_layer``: parameters of the largest leaf module (what ZeRO-3 gathers at
    once); ``activations`` / ``activations_ckpt``: peak live bytes above the weights during one
    micro-batch's forward and backward without / with activation checkpointing;
    ``masked_attention``: some attention call had a mask (its probabilities are counted).
    """

    params: int
    buffers: int
    largest_layer: int
    activations: int
    activations_ckpt: int
    masked_attention: bool
    checkpointing_supported: bool


class LiveBytes(TorchDispatchMode):
    """Live storage bytes created inside the mode, and their peak. A storage an operator returns
    that one of its inputs already had (in-place ops, views) is not new."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0
        self._refs: dict[int, Any] = {}

    @staticmethod
    def _key(t: Tensor) -> int:
        return t.untyped_storage()._cdata

    def _gone(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        seen = {self._key(t) for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if (key := self._key(t)) in seen or key in self.live:
                continue
            st = t.untyped_storage()
            self.live[key] = st.nbytes()
            self.now += st.nbytes()
            self.peak = max(self.peak, self.now)
            self._refs[key] = weakref.ref(st, functools.partial(_call_gone, weakref.ref(self), key))
        return out


def _tensors(x: Any) -> Iterator[Tensor]:
    """The tensors in an operator's arguments or results (flat lists and dicts: cheaper than pytree)."""
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, list | tuple):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _call_gone(tracker: weakref.ref, key: int, _ref: Any) -> None:
    t = tracker()
    if t is not None:
        t._gone(key)


class _FusedAttention:
    """``F.scaled_dot_product_attention`` that, on meta tensors without a mask or dropout, runs
    torch's fused flash operator (what a GPU's flash / memory-efficient kernel saves)."""

    def __init__(self, original: Callable[..., Tensor]) -> None:
        self.original = original
        self.masked = False

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                 is_causal: bool = False, scale: float | None = None, **kw: Any) -> Tensor:
        if q.device.type == "meta" and attn_mask is None and not kw:
            out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                           scale=scale)
            return out[0]
        self.masked = self.masked or attn_mask is not None
        return self.original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                             **kw)


@contextlib.contextmanager
def fused_attention() -> Iterator[_FusedAttention]:
    """Route SDPA through :class:`_FusedAttention` while tracing (models look it up on ``F``
    at call time; restored on exit)."""
    original = F.scaled_dot_product_attention
    fused = _FusedAttention(original)
    F.scaled_dot_product_attention = fused  # type: ignore[assignment]
    try:
        yield fused
    finally:
        F.scaled_dot_product_attention = original  # type: ignore[assignment]


def _classification_loss(objective: Any, module: nn.Module, images: Tensor, net: NetConfig) -> Tensor:
    classes = net.num_classes
    b = images.shape[0]
    if getattr(objective.cfg, "loss", "softmax") == "sigmoid":
        targets = torch.zeros(b, classes, device=images.device)
    else:
        targets = torch.zeros(b, dtype=torch.long, device=images.device)
    return objective.loss(module, (images, targets))


def _mae_loss(objective: Any, module: nn.Module, images: Tensor, net: NetConfig) -> Tensor:
    # MaskedAutoencoder.forward reads the mask's counts (data-dependent: not on meta); its parts
    # take the visible indices and the restoring permutation, whose shapes are known.
    n = net.num_patches
    visible = n - int(n * objective.cfg.mask_ratio)
    b = images.shape[0]
    keep = torch.zeros(b, visible, dtype=torch.long, device=images.device)
    restore = torch.zeros(b, n, dtype=torch.long, device=images.device)
    latent = module.encoder.forward_features(images, keep=keep)  # type: ignore[operator, union-attr]
    pred = module.decode(latent, restore)  # type: ignore[operator]
    return ((pred.float() - module.target(images)) ** 2).mean()  # type: ignore[operator]


def _distill_loss(objective: Any, module: nn.Module, images: Tensor, net: NetConfig) -> Tensor:
    # The student's forward and backward through both heads (DeiT's class and distillation
    # token). The teacher's forward runs under no_grad: its transient activations are freed
    # layer by layer and its weights are not the student's (not counted here).
    out = module(images)
    outs = out if isinstance(out, tuple) else (out,)
    return sum(o.float().logsumexp(-1).mean() for o in outs)  # the shape of a cross-entropy per head


def _beit_loss(objective: Any, module: nn.Module, images: Tensor, net: NetConfig) -> Tensor:
    # The masked positions come from the mask's counts (data-dependent: not on meta); every image
    # masks as many, so the MIM head's input is a known (B, M, D). The tokenizer runs under
    # no_grad outside the engine (its weights are not counted here, as a teacher's).
    from model.beit import MaskedImageModel
    from pipeline.masking import masked_count

    assert isinstance(module, MaskedImageModel)
    gh, gw = net.grid  # type: ignore[union-attr]
    b, n = images.shape[0], gh * gw
    m = masked_count(n, objective.cfg.mask_ratio)
    mask = torch.zeros(b, n, dtype=torch.bool, device=images.device)
    positions = torch.zeros(b, m, dtype=torch.long, device=images.device)
    logits = module.logits_at(module.forward_features(images, mask), positions)
    return logits.float().logsumexp(-1).mean()  # the shape of a cross-entropy over the vocabulary


def _dvae_loss(objective: Any, module: nn.Module, images: Tensor, net: NetConfig) -> Tensor:
    # The dVAE's relaxed forward and backward: encoder, (B, V, h, w) soft codes, decoder. Its
    # Gumbel noise is drawn on the host (not device memory): a zero of the same broadcast here.
    recon, logits = module(images, 1.0, noise=torch.zeros((), device=images.device))
    return recon.float().pow(2).mean() + logits.float().logsumexp(1).mean()


#: Objective kind -> one micro-batch's loss on the meta device. A new objective adds its step here
#: (a teacher forward for distillation runs under ``torch.no_grad()``: weights only, no activations).
STEPS: dict[str, Callable[[Any, nn.Module, Tensor, NetConfig], Tensor]] = {
    "classification": _classification_loss, "mae": _mae_loss, "distill": _distill_loss, "beit": _beit_loss,
    "dvae": _dvae_loss}


def _build(net: NetConfig, objective_cfg: ObjectiveConfig, dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        # Distillation adds no module to the student (its teacher stays outside the engine).
        net_module = build_network(net)
        module = net_module if objective_cfg.kind == "distill" else objective_for(objective_cfg).wrap(net_module)
    return module.to(dtype).train()


def _trace_step(module: nn.Module, net: NetConfig, objective_cfg: ObjectiveConfig, dtype: torch.dtype,
                micro_batch: int) -> tuple[int, bool]:
    """(peak activation bytes, saw a masked attention) of one forward + backward of ``module``."""
    objective = None if objective_cfg.kind == "distill" else objective_for(objective_cfg)  # no teacher here
    step = STEPS[objective_cfg.kind]
    size = net.image_size
    with fused_attention() as fused, LiveBytes() as live:
        images = torch.zeros(micro_batch, net.in_chans, size, size, dtype=dtype, device="meta")
        loss = step(objective, module, images, net)
        loss.backward()
        del loss, images
    return live.peak, fused.masked


def profiled_peak_bytes(step: Callable[[Any, nn.Module, Tensor, NetConfig], Tensor], objective: Any,
                        module: nn.Module, make_images: Callable[[], Tensor], net: NetConfig) -> int:
    """Peak live bytes of one real CPU forward + backward (``step``) on ``make_images()`` (made
    inside, so the batch counts as the trace counts it), from torch's profiler (allocations and
    frees in time order): what the meta-device trace is checked against."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        images = make_images()
        loss = step(objective, module, images, net)
        loss.backward()
        del loss, images
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak


@functools.lru_cache(maxsize=256)
def trace_model(net: NetConfig, objective_cfg: ObjectiveConfig, precision: str, micro_batch: int) -> ModelTrace:
    """:class:`ModelTrace` of ``net`` trained with ``objective_cfg`` at ``precision`` and ``micro_batch``."""
    if objective_cfg.kind not in STEPS:
        raise ValueError(f"train.objective.kind={objective_cfg.kind!r} has no trace step in "
                         f"orchestration/planning/trace.py (known: {', '.join(STEPS)}); add one")
    dtype = DTYPES[precision]
    module = _build(net, objective_cfg, dtype)
    params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    state = module.state_dict()
    buffers = sum(b.numel() * b.element_size() for name, b in module.named_buffers() if name in state)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)
    for p in (p for p in module.parameters() if p.requires_grad):  # DeepSpeed takes each gradient
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    full, masked = _trace_step(module, net, objective_cfg, dtype, micro_batch)
    supported = hasattr(module, "set_grad_checkpointing")
    ckpt = full
    if supported:
        module.set_grad_checkpointing(True)  # type: ignore[operator]
        ckpt, _ = _trace_step(module, net, objective_cfg, dtype, micro_batch)
    return ModelTrace(params=params, buffers=buffers, largest_layer=largest, activations=full, activations_ckpt=ckpt,
                      masked_attention=masked, checkpointing_supported=supported)
