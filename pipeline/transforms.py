"""Per-sample and per-batch transforms (torchvision.transforms.v2) after decoding.

* :func:`sample_transform` - optional colour jitter and RandAugment on the uint8 crop (seeded per sample, so
  resume never needs to replay earlier samples' randomness).
* :func:`stack_uint8` - a worker's batch stays uint8 until it reaches the main process
  (a quarter of the bytes through shared memory).
* :func:`to_float_batch` - ``ToDtype(float32, scale=True)`` + ``Normalize`` over a whole
  ``(B, 3, S, S)`` uint8 batch at once (one vectorised op instead of B small ones).
* :func:`normalize_uint8` - the same map on the consumer's device (``DataConfig.output="uint8"``).
* :func:`mix_batch` - batch-level mixup / cutmix producing soft targets, seeded per batch.

The geometric part of the train/eval presets (Inception crop + flip; resize + center crop)
is fused with JPEG decoding in :mod:`pipeline.decode`, where it can use draft mode.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import threading
import weakref

import numpy as np
import torch
from torchvision.transforms import v2


def make_randaugment(randaugment: tuple[int, int] | None, color_jitter: float = 0.0) -> v2.Transform | None:
    """The per-sample photometric transform: ``v2.ColorJitter(j, j, j)`` (brightness, contrast,
    saturation; BEiT: 0.4) then ``v2.RandAugment(num_ops, magnitude)``, each when configured, or
    ``None``. The jitter is applied to the crop (BEiT jitters the whole image before cropping:
    the same per-pixel maps, contrast measured on the crop instead of the image)."""
    steps: list[v2.Transform] = []
    if color_jitter:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    if randaugment:
        num_ops, magnitude = randaugment
        steps.append(v2.RandAugment(num_ops=int(num_ops), magnitude=int(magnitude)))
    return None if not steps else steps[0] if len(steps) == 1 else v2.Compose(steps)


def sample_transform(img: np.ndarray, randaug: v2.Transform | None, sample_seed: int,
                     erase: float = 0.0) -> torch.Tensor:
    """``(S, S, 3)`` uint8 array -> ``(3, S, S)`` uint8 tensor, RandAugment'ed and randomly erased
    (probability ``erase``) if configured."""
    # pipeline.decode returns an HWC view of CHW memory, so this permute is free (no copy).
    t = torch.from_numpy(img).permute(2, 0, 1)  # (3, S, S)
    if randaug is not None:
        # v2 transforms draw from torch's global RNG: reseed it per sample (worker-local state).
        torch.manual_seed(sample_seed & ((1 << 63) - 1))
        t = randaug(t)
    if erase > 0:
        t = random_erase(t, erase, np.random.default_rng([sample_seed & ((1 << 63) - 1), 0x657261]))
    return t


def random_erase(img: torch.Tensor, prob: float, rng: np.random.Generator, *,
                 area: tuple[float, float] = (0.02, 1 / 3), log_ratio: tuple[float, float] = (-1.2, 1.2)) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017) as DeiT and MAE fine-tuning use it (timm's
    ``RandomErasing(prob, mode="pixel")``: one rectangle of 2-33 % of the area, aspect ratio
    log-uniform in [0.3, 3.3], filled with per-pixel noise). timm draws the noise as N(0, 1) in
    the normalised space; on uint8 images before normalisation that is per-channel noise around
    mid-grey with the spread of natural images (mean 124, std 58 grey levels), clipped. Ten tries
    to fit the rectangle, as timm; ``img`` (3, S, S) uint8 is changed in a copy."""
    if rng.random() >= prob:
        return img
    c, h, w = img.shape
    for _ in range(10):
        target = rng.uniform(*area) * h * w
        aspect = math.exp(rng.uniform(*log_ratio))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < eh < h and 0 < ew < w:
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            out = img.clone()
            noise = rng.normal(124.0, 58.0, size=(c, eh, ew)).clip(0, 255).astype(np.uint8)
            out[:, top:top + eh, left:left + ew] = torch.from_numpy(noise)
            return out
    return img


def stack_uint8(samples: list[torch.Tensor], *, shared: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """``B`` uint8 ``(3, S, S)`` tensors -> one uint8 ``(B, 3, S, S)`` batch.

    With ``shared=True`` the batch is allocated in shared memory, so a DataLoader worker hands
    it to the main process without another copy; uint8 is a quarter of float32's bytes. ``out``:
    write into this ``(B, 3, S, S)`` uint8 tensor instead (a recycled shared buffer); a sample that
    already is its row of ``out`` (decoded in place) is not copied.
    """
    c, h, w = samples[0].shape
    shape = (len(samples), c, h, w)
    if out is None:
        out = empty_shared_uint8(shape) if shared else torch.empty(shape, dtype=torch.uint8)
    for k, t in enumerate(samples):
        row = out[k]
        if t.data_ptr() != row.data_ptr() or t.stride() != row.stride() or t.shape != row.shape:
            row.copy_(t)
    return out


def empty_shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor allocated in shared memory from the start, as DataLoader's default_collate
    does: ``torch.empty(...).share_memory_()`` would allocate, then copy into a new shm segment
    (~5 ms per 9.6 MB batch)."""
    try:
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    except (AttributeError, RuntimeError):
        return torch.empty(shape, dtype=torch.uint8).share_memory_()


def to_float_batch(batch: list[torch.Tensor] | torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], *,
                   shared: bool = False) -> torch.Tensor:
    """uint8 images (``B`` ``(3, S, S)`` tensors or one ``(B, 3, S, S)`` batch) -> normalized float32.

    Equivalent to ``v2.ToDtype(float32, scale=True)`` + ``v2.Normalize(mean, std)`` per sample,
    but done as one in-place affine map on a single output allocation: fresh 38 MB tensors
    (B=64 at 224 px) cost more in page faults than the arithmetic. With ``shared=True`` the
    output is allocated in shared memory (for a DataLoader worker's return value).
    """
    n, (c, h, w) = len(batch), tuple(batch[0].shape)
    if shared:
        out = torch.empty((n, c, h, w), dtype=torch.float32).share_memory_()
    else:
        out = BATCH_MEMORY.empty((n, c, h, w))
    if isinstance(batch, torch.Tensor):
        out.copy_(batch)  # uint8 -> float32, one vectorised op
    else:
        for k, t in enumerate(batch):
            out[k].copy_(t)  # uint8 -> float32 while copying
    scale, shift = affine_for(mean, std, c, out.device)
    return out.mul_(scale).sub_(shift)  # (B, C, S, S)


#: Batches at least this large come from :class:`BatchMemory` (see there).
LARGE_BATCH_BYTES = 8 << 20


class BatchMemory:
    """A small caching allocator for large host batch tensors (Linux; plain ``torch.empty`` elsewhere).

    A fresh 38 MB float32 batch (B=64 at 224 px) comes from a new anonymous mapping (glibc's
    mmap threshold is at most 32 MB) and first-touching it costs ~9,400 page faults and the
    kernel's zeroing of every page: measured on the 2-core dev machine, uint8 -> float32 +
    normalize costs 0.31 ms per image into fresh memory and 0.06 ms into reused memory.

    So, like PyTorch's CUDA caching allocator: each batch is a view of one of our own
    mappings (``madvise(MADV_HUGEPAGE)`` so a first touch is ~20 faults, not 9,400), and a
    mapping is handed out again only once *no* storage uses it any more. Each hand-out is a
    fresh ctypes array over the mapping: ``torch.frombuffer`` keeps that array alive for as long
    as any tensor, view or numpy array of the batch lives, and we hold only a weak reference to
    it, so "dead weak reference" means "unused" (documented behaviour of weakref, ctypes and
    torch.frombuffer; no reference-count arithmetic). Nothing is overwritten behind a caller's
    back. At most ``keep`` mappings are cached.
    """

    def __init__(self, keep: int = 6) -> None:
        self.keep = keep
        self._maps: list[_Mapping] = []
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialized tensor of ``shape`` and ``dtype`` (the main process's float32 batches)."""
        nbytes = dtype.itemsize * math.prod(shape)
        if nbytes < LARGE_BATCH_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
            return torch.empty(shape, dtype=dtype)
        with self._lock:  # check-and-hand-out must be atomic across threads
            for m in self._maps:
                if m.nbytes == nbytes and not m.in_use():
                    return m.hand_out(shape, dtype)
            try:
                new = _Mapping(nbytes)
            except (OSError, ValueError):
                return torch.empty(shape, dtype=dtype)
            unused = [m for m in self._maps if not m.in_use()]
            if len(self._maps) >= self.keep and unused:
                self._maps.remove(unused[0])  # the oldest unused one goes (unmapped once unreferenced)
            if len(self._maps) < self.keep:
                self._maps.append(new)
            return new.hand_out(shape, dtype)


class _Mapping:
    """One anonymous huge-page mapping and a weak reference to its current hand-out."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.map = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.map.madvise(mmap.MADV_HUGEPAGE)
        self._out: weakref.ref[ctypes.Array[ctypes.c_char]] | None = None

    def in_use(self) -> bool:
        return self._out is not None and self._out() is not None

    def hand_out(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        export = (ctypes.c_char * self.nbytes).from_buffer(self.map)
        self._out = weakref.ref(export)
        return torch.frombuffer(export, dtype=dtype).view(shape)  # the storage keeps `export` alive


#: The process's batch memory (the loader's main-process float batches).
BATCH_MEMORY = BatchMemory()


def affine_for(mean: tuple[float, ...], std: tuple[float, ...], c: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / 255 - mean) / std == x * scale - shift``: the (1, C, 1, 1) scale and shift."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    return (1.0 / (255.0 * sd)).to(device), (m / sd).to(device)


def normalize_uint8(images: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """uint8 ``(B, C, S, S)`` -> normalized float32 on the same device (meant for the accelerator);
    ``affine`` is :func:`affine_for` on that device."""
    scale, shift = affine
    return images.float().mul_(scale).sub_(shift)


def mix_batch(images: torch.Tensor, targets: torch.Tensor, *, mixup_alpha: float, cutmix_alpha: float,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix (one per batch, chosen at random when both are on) with the reversed batch.

    ``targets`` must already be float ``(B, C)`` (one-hot or multi-hot); returns soft targets
    ``lam * y + (1 - lam) * y.flip(0)`` with ``lam`` the exact mixed-area fraction for cutmix.
    """
    rng = np.random.default_rng(seed)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    if alpha <= 0:
        return images, targets
    lam = float(rng.beta(alpha, alpha))
    flipped = images.flip(0)
    if use_cutmix:
        _, _, h, w = images.shape
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    else:
        images = images * lam + flipped * (1.0 - lam)
    return images, targets * lam + targets.flip(0) * (1.0 - lam)
