"""A dVAE tokenizer's figures (docs/tokenizer.md), drawn by the MLflow sink at every evaluation:

* ``reconstruction.png``: one row per probe image, original | reconstruction from its hard
  (argmax) tokens, the very tokens BEiT predicts | the token ids on the patch grid;
* ``codebook_usage.png``: how often each code was chosen over the whole eval split (sorted,
  log scale), with the used fraction, dead codes and perplexity in the title.

Like :mod:`.reconstruction_figures` it imports nothing of orchestration.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from model.tokenizer import DiscreteVAE, codebook_usage  # noqa: E402
from orchestration.tracking.reconstruction_figures import to_display  # noqa: E402

PANELS = ("original", "from tokens", "tokens")


@torch.no_grad()
def token_reconstructions(dvae: DiscreteVAE, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, C, S, S) reconstructions from the hard tokens, (B, h, w) token ids), on the CPU."""
    was_training = dvae.training
    dvae.eval()
    try:
        p = next(dvae.parameters())
        x = images.to(device=p.device, dtype=p.dtype)
        tokens = dvae.tokenize(x)  # (B, h*w)
        grid = (x.shape[-2] // dvae.patch_size, x.shape[-1] // dvae.patch_size)
        recon = dvae.decode_tokens(tokens, grid)
    finally:
        dvae.train(was_training)
    return recon.float().cpu(), tokens.reshape(-1, *grid).cpu()


def reconstruction_figure(dvae: DiscreteVAE, images: torch.Tensor, out: Path, *, mean: Sequence[float],
                          std: Sequence[float], title: str = "") -> Path:
    """Write the PNG of ``images`` (normalised (B, C, S, S)) and their token reconstructions."""
    recon, tokens = token_reconstructions(dvae, images)
    rows = images.shape[0]
    fig, axes = plt.subplots(rows, len(PANELS), figsize=(2.2 * len(PANELS), 2.2 * rows + 0.4), squeeze=False)
    for r in range(rows):
        axes[r][0].imshow(to_display(images[r].float().cpu(), mean, std))
        axes[r][1].imshow(to_display(recon[r], mean, std))
        axes[r][2].imshow(tokens[r].numpy(), cmap="tab20", vmin=0, vmax=dvae.vocab_size - 1)
        if tokens.shape[-1] <= 8:  # small grids: the ids themselves
            for (i, j), t in _cells(tokens[r]):
                axes[r][2].text(j, i, str(int(t)), ha="center", va="center", fontsize=7)
        for c, name in enumerate(PANELS):
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
            if r == 0:
                axes[r][c].set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def _cells(grid: torch.Tensor) -> list[tuple[tuple[int, int], int]]:
    return [((i, j), int(grid[i, j])) for i in range(grid.shape[0]) for j in range(grid.shape[1])]


def usage_figure(counts: torch.Tensor, out: Path, *, title: str = "") -> Path:
    """Write the PNG of the per-code counts (V,) sorted from the most used, log scale."""
    usage = codebook_usage(counts)
    v = counts.numel()
    ordered = counts.double().sort(descending=True).values.numpy()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(v), ordered + 1e-9, width=1.0, color="tab:blue")  # dead codes stay at the axis
    ax.set_yscale("log")
    ax.set_xlabel(f"code (sorted by use), {v} in the codebook")
    ax.set_ylabel("tokens in the eval split")
    ax.set_title(f"{title + ': ' if title else ''}used {usage['used']:.1%}, {int(usage['dead'])} dead, "
                 f"perplexity {usage['perplexity']:.1f}", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def _save(fig: plt.Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
