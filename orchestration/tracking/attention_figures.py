"""[CLS] attention maps per layer/head and attention rollout, as matplotlib figures / PNG files.

:func:`attention_figures` writes ``<out>/<stem>_cls_attention.png`` (rows = layers, columns =
heads; each cell the class token's attention to every patch, upsampled over the image) and
``<out>/<stem>_rollout.png`` (the image, the rollout map and their overlay; Abnar & Zuidema
2020, as in the ViT paper's Figure 6). Used by the ``visualize.py`` CLI and by the MLflow sink
at every evaluation; it imports nothing of orchestration, so both can depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from model import VisionTransformer, attention_rollout, cls_attention_maps  # noqa: E402
from model.attention import attention_grid, forward_with_attention  # noqa: E402


class NonFiniteAttention(ValueError):
    """The model's attention or logits hold NaN/Inf (damaged or diverged weights): no map to draw."""


DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


def load_image(
    path: str | Path,
    image_size: int,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> torch.Tensor:
    """An image file as a normalised (1, 3, S, S) float tensor (short side resize, centre crop)."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = image_size / min(w, h)
    img = img.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0)


def _to_display(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, S, S) normalised tensor -> (S, S, 3) float image in [0, 1]."""
    img = x.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def _upsample(m: torch.Tensor, size: int) -> np.ndarray:
    """(gh, gw) map -> (size, size) numpy array normalised to [0, 1]."""
    up = F.interpolate(m[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    up = up - up.min()
    return (up / up.max().clamp_min(1e-12)).cpu().numpy()


def overlay(img: np.ndarray, heat: np.ndarray, alpha: float = 0.7, cmap: str = "inferno") -> np.ndarray:
    """``img`` (S, S, 3) in [0, 1] with ``heat`` (S, S) in [0, 1] painted over it in colour.

    Each pixel is blended towards the colour map in proportion to its attention: where the model
    does not look the image stays as it is (not darkened, as ``img * heat`` would: a dim grey
    picture for grey digits), where it looks the map's colour shows.
    """
    colour = plt.get_cmap(cmap)(heat)[..., :3]  # (S, S, 3)
    a = alpha * np.clip(heat, 0, 1)[..., None]
    return np.clip(img * (1 - a) + colour * a, 0, 1)


@torch.no_grad()
def compute_attention(model: VisionTransformer, images: torch.Tensor, discard_ratio: float = 0.0) -> dict[str, Any]:
    """Run ``forward_with_attention`` and reduce it to plottable maps.

    Returns ``{"logits": (B, C), "cls": (L, B, heads, gh, gw), "rollout": (B, gh, gw)}``.
    The rollout map is the class token's row (or, for ``pool="gap"``, the mean row) of
    :func:`model.attention_rollout` over the patch tokens. NaN/Inf attention or logits raise
    :class:`NonFiniteAttention` (normalising them would draw blank maps that look like results).
    """
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    logits, attns = forward_with_attention(model, images.to(device=p.device, dtype=p.dtype))
    model.train(was_training)
    bad = [f"layer {i}" for i, a in enumerate(attns) if not bool(torch.isfinite(a).all())]
    if bad or not bool(torch.isfinite(logits).all()):
        raise NonFiniteAttention(
            f"the model's attention holds NaN/Inf values ({', '.join(bad[:4]) or 'logits only'}{' ...' * (len(bad) > 4)}): "
            "its weights are damaged or it diverged; use an earlier checkpoint")
    gh, gw = attention_grid(model)
    cls = cls_attention_maps(attns, (gh, gw))  # (L, B, heads, gh, gw)
    roll = attention_rollout(attns, discard_ratio=discard_ratio)  # (B, N, N)
    n_prefix = roll.shape[-1] - gh * gw
    row = roll[:, 0, n_prefix:] if n_prefix else roll.mean(dim=1)  # (B, gh*gw)
    return {"logits": logits.float().cpu(), "cls": cls.cpu(), "rollout": row.reshape(-1, gh, gw).cpu()}


def attention_figures(
    model: VisionTransformer,
    images: torch.Tensor,
    out_dir: Path,
    *,
    stem: str = "image",
    max_images: int = 1,
    discard_ratio: float = 0.0,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> list[Path]:
    """Write the per-layer/head [CLS] grid and the rollout overlay for the first ``max_images``.

    ``images`` are normalised (B, 3, S, S) as the model sees them. Returns the PNG paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    att = compute_attention(model, images[:max_images], discard_ratio=discard_ratio)
    size = images.shape[-1]
    L, B, H = att["cls"].shape[:3]
    probs = att["logits"].softmax(-1)
    paths: list[Path] = []
    for b in range(B):
        name = stem if B == 1 else f"{stem}{b}"
        img = _to_display(images[b], mean, std)
        top = int(probs[b].argmax())
        # Grid: rows = layers, columns = heads.
        fig, axes = plt.subplots(L, H, figsize=(1.6 * H + 0.6, 1.6 * L + 0.6), squeeze=False)
        for layer in range(L):
            for head in range(H):
                ax = axes[layer][head]
                ax.imshow(img)
                ax.imshow(_upsample(att["cls"][layer, b, head], size), cmap="inferno", alpha=0.6)
                ax.set_xticks([])
                ax.set_yticks([])
                if layer == 0:
                    ax.set_title(f"head {head}", fontsize=8)
                if head == 0:
                    ax.set_ylabel(f"layer {layer}", fontsize=8)
        fig.suptitle(f"[CLS] attention per layer/head (pred {top}, p={float(probs[b, top]):.2f})", fontsize=9)
        fig.tight_layout()
        grid_path = out_dir / f"{name}_cls_attention.png"
        fig.savefig(grid_path, dpi=80)
        plt.close(fig)
        # Rollout.
        roll = _upsample(att["rollout"][b], size)
        fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
        axes[0].imshow(img)
        axes[0].set_title("image")
        axes[1].imshow(roll, cmap="inferno")
        axes[1].set_title("attention rollout")
        axes[2].imshow(overlay(img, roll))
        axes[2].set_title("overlay")
        for ax in axes:
            ax.axis("off")
        fig.tight_layout()
        roll_path = out_dir / f"{name}_rollout.png"
        fig.savefig(roll_path, dpi=80)
        plt.close(fig)
        paths += [grid_path, roll_path]
    return paths
