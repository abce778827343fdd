"""MAE reconstructions as a figure: one row per image, original | masked | reconstruction.

The MLflow sink draws one at every evaluation of an MAE run, from the same few validation images
with the same masks (drawn by ``pipeline.masking.draw_mask`` from a fixed seed), so the figures
of a run show the decoder learning on one fixed problem. The reconstruction panel is the
decoder's raw prediction of every patch, as the MAE paper's Figure 2 shows it (no loss is
computed on the visible patches, so they are blurrier there; the paper chose not to paste the
visible pixels back). With ``norm_pix_loss`` the decoder predicts per-patch normalised pixels:
each predicted patch is de-normalised with the mean and standard deviation of the original
patch before it is drawn (the inverse of ``models_mae.py``'s target; MAE's own
``demo/mae_visualize.ipynb`` sidesteps this by showing a model "trained with pixels as targets
for visualization", whose prediction it draws as is). So with ``norm_pix_loss`` each patch's
brightness and contrast in the reconstruction are the original's, whatever the model: even an
untrained decoder draws the silhouette of the image; only the pattern inside each patch is the
model's (compare the figures of successive steps, not one figure with the original). The masked panel is the notebook's
``x * (1 - mask)``: hidden patches at 0 in the model's input space, the dataset mean once drawn.
Like :mod:`.attention_figures` it imports nothing of orchestration.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from model.mae import MaskedAutoencoder, patchify, unpatchify  # noqa: E402
from pipeline.masking import MaskConfig, draw_mask  # noqa: E402

PANELS = ("original", "masked", "reconstruction")
#: MAE's target normalisation (models_mae.py ``forward_loss``: (x - mean) / (var + 1e-6) ** .5).
_VAR_EPS = 1.0e-6


def fixed_masks(cfg: MaskConfig, grid: int, count: int, seed: int = 0) -> torch.Tensor:
    """(count, grid * grid) bool masks, image ``i``'s from ``seed + i``: the same at every evaluation."""
    return torch.from_numpy(np.stack([draw_mask(cfg, grid, np.random.default_rng(seed + i)) for i in range(count)]))


def denormalise_prediction(pred: torch.Tensor, images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per-patch normalised predictions (B, N, P) -> the model's input space, with each original
    patch's mean and (unbiased) variance: the inverse of ``MaskedAutoencoder.target``."""
    target = patchify(images.float(), patch_size)  # (B, N, P)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return pred.float() * (var + _VAR_EPS) ** 0.5 + mean


@torch.no_grad()
def reconstruction_panels(mae: MaskedAutoencoder, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, 3, C, S, S) in the model's input space: the images, the images with the masked patches
    at 0 (the dataset mean once displayed), and the decoder's reconstruction (de-normalised when
    ``norm_pix_loss``)."""
    was_training = mae.training
    mae.eval()
    try:
        p = next(mae.parameters())
        _, pred = mae(images.to(device=p.device, dtype=p.dtype), masks.to(p.device))  # (B, N, P)
    finally:
        mae.train(was_training)
    images = images.float().cpu()
    pred = pred.float().cpu()
    ps, chans = mae.patch_size, images.shape[1]
    if mae.norm_pix_loss:
        pred = denormalise_prediction(pred, images, ps)
    hidden = unpatchify(masks.cpu()[..., None].expand(-1, -1, ps * ps * chans).float(), ps, chans)  # (B, C, S, S)
    return torch.stack([images, images * (1 - hidden), unpatchify(pred, ps, chans)], dim=1)


def to_display(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(C, S, S) in the model's input space -> (S, S, C) in [0, 1]: ``x * std + mean``, clipped."""
    img = x.float() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def plot_reconstructions(panels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                         title: str = "") -> Figure:
    """A figure of (B, 3, C, S, S) panels: a row per image, :data:`PANELS` as columns."""
    rows = panels.shape[0]
    fig, axes = plt.subplots(rows, len(PANELS), figsize=(2.2 * len(PANELS), 2.2 * rows + 0.4), squeeze=False)
    for r in range(rows):
        for c, name in enumerate(PANELS):
            ax = axes[r][c]
            ax.imshow(to_display(panels[r, c], mean, std))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def reconstruction_figure(
    mae: MaskedAutoencoder,
    images: torch.Tensor,
    out: Path,
    *,
    mask: MaskConfig,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
    title: str = "",
) -> Path:
    """Write the PNG of ``images`` (normalised (B, C, S, S), as the model sees them) masked by
    :func:`fixed_masks` of ``mask`` and reconstructed by ``mae``; returns its path."""
    grid = images.shape[-1] // mae.patch_size
    panels = reconstruction_panels(mae, images, fixed_masks(mask, grid, images.shape[0], seed))
    fig = plot_reconstructions(panels, mean, std, title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
