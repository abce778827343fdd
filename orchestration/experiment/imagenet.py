"""ImageNet-1k numbers the recipes share (the MAE, DeiT-family and convnet recipes count their
schedules in its epochs and normalise with its statistics)."""

from __future__ import annotations

#: ILSVRC-2012 train split, the number every "N epochs of ImageNet-1k" schedule is counted in.
IN1K_IMAGES = 1_281_167
#: torchvision's / timm's IMAGENET_DEFAULT_MEAN / _STD (MAE main_pretrain.py, DeiT, Swin, PVT, CaiT, BEiT).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def epochs_to_steps(epochs: float, batch: int, images: int = IN1K_IMAGES) -> int:
    """Optimizer steps of ``epochs`` passes over ``images`` at global ``batch``."""
    return int(round(epochs * images / batch))
