"""Patch masks drawn per sample in the data pipeline, for masked image modelling.

MAE (He et al. 2021) hides a random ``ratio`` of the patches of every image; BEiT (Bao et al.
2021) hides about 40 % of them in rectangular blocks. Both are drawn here, from each sample's
own seed, rather than in the model: a sample is masked the same way whatever the number of
ranks or loader workers, and again after a resume, so masked runs stay exactly reproducible
(BEiT's reference code draws its masks in the data transform too).

A mask is a (N,) bool array over the patch grid in row-major order, True = hidden from the
encoder. Every mask of a config hides exactly :func:`masked_count` patches, so a batch's
visible tokens are one dense tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from confkit import Checker


def masked_count(num_patches: int, ratio: float) -> int:
    """Patches hidden per image: ``N - int(N * (1 - ratio))`` (MAE's ``len_keep`` rule)."""
    return num_patches - int(num_patches * (1 - ratio))


@dataclass(frozen=True, kw_only=True)
class MaskConfig:
    """``kind``: "none" (no masks in the batches), "random" (MAE: a uniformly random subset per
    image) or "block" (BEiT: blocks of at least ``min_block`` patches with aspect ratio in
    [``min_aspect``, 1 / ``min_aspect``], placed until the count is reached, then topped up with
    random patches if the last block cannot fit, so the count is exact). ``patch_size`` is the
    model's (an Experiment sets it from the model and ``ratio`` from its objective)."""

    kind: Literal["none", "random", "block"] = "none"
    ratio: float = 0.75
    patch_size: int = 16
    min_block: int = 16
    min_aspect: float = 0.3

    def __post_init__(self) -> None:
        c = Checker(self)
        c.choice("kind", ("none", "random", "block"))
        c.number("ratio", gt=0, lt=1, why=" (the fraction of patches hidden)")
        c.int("patch_size", ge=1)
        c.int("min_block", ge=1)
        c.number("min_aspect", gt=0, le=1)
        c.done()

    def problems(self, image_size: int) -> list[str]:
        """What makes this config impossible at ``image_size``, one line each (empty: fine)."""
        if self.kind == "none":
            return []
        if image_size % self.patch_size:
            return [f"image_size {image_size} is not divisible by the mask's patch_size {self.patch_size}"]
        n = (image_size // self.patch_size) ** 2
        hidden = masked_count(n, self.ratio)
        if hidden >= n:
            return [f"mask ratio {self.ratio} hides all {n} patches of a {image_size}px image: no visible patch "
                    "is left for the encoder; lower the ratio"]
        if hidden < 1:
            return [f"mask ratio {self.ratio} hides no patch of the {n} of a {image_size}px image; raise it"]
        if self.kind == "block" and hidden < self.min_block:
            return [f"mask ratio {self.ratio} hides {hidden} of {n} patches, fewer than one block of min_block="
                    f"{self.min_block}: no block fits; raise the ratio or lower min_block"]
        return []


def draw_mask(cfg: MaskConfig, grid: int, rng: np.random.Generator) -> np.ndarray:
    """One (grid * grid,) bool mask hiding exactly ``masked_count(grid**2, cfg.ratio)`` patches."""
    n = grid * grid
    hidden = masked_count(n, cfg.ratio)
    if cfg.kind == "random":
        out = np.zeros(n, dtype=bool)
        out[rng.permutation(n)[:hidden]] = True
        return out
    if cfg.kind == "block":
        return _block_mask(grid, hidden, cfg.min_block, cfg.min_aspect, rng)
    raise ValueError(f"mask kind {cfg.kind!r} draws no masks")


def _block_mask(grid: int, hidden: int, min_block: int, min_aspect: float, rng: np.random.Generator) -> np.ndarray:
    """BEiT's blockwise masking: rectangles of a random area in [min_block, what is left] and a
    log-uniform aspect ratio, each adding at least one new patch and never overshooting the
    count (a block that would is redrawn, 10 tries per block); what blocks cannot place is
    topped up with random patches."""
    mask = np.zeros((grid, grid), dtype=bool)
    count = 0
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    while count < hidden:
        room = hidden - count
        added = 0
        for _ in range(10):
            area = rng.uniform(min(min_block, room), room)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (1 <= h < grid and 1 <= w < grid):
                continue
            top, left = int(rng.integers(0, grid - h + 1)), int(rng.integers(0, grid - w + 1))
            block = mask[top:top + h, left:left + w]
            new = int(block.size - block.sum())
            if 0 < new <= room:
                block[:] = True
                added = new
                break
        if added == 0:
            break
        count += added
    flat = mask.reshape(-1)
    if count < hidden:  # the last blocks did not fit: the rest at random, so every mask hides as many
        free = np.flatnonzero(~flat)
        flat[rng.choice(free, size=hidden - count, replace=False)] = True
    return flat
