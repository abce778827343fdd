"""MAE pre-training (He et al. 2021; facebookresearch/mae): reconstruct the pixels of masked
patches from the visible quarter. The objective owns the decoder (``model.mae``); the masks
come from the data pipeline (``DataConfig.mask``, drawn per sample from its own seed), so a
batch is masked the same way on any number of ranks and after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from confkit import Checker
from model.mae import MAEDecoderConfig, MaskedAutoencoder
from training.objectives.base import Objective, as_sums, valid_rows


@dataclass(frozen=True, kw_only=True)
class MAEConfig:
    """``mask_ratio`` of the patches are hidden from the encoder (MAE: 0.75, exactly
    ``N - int(N * (1 - mask_ratio))`` patches in every sample); the decoder is ``decoder_depth``
    blocks of ``decoder_width`` (MAE: 8 x 512, 16 heads, for B, L and H); ``norm_pix_loss``:
    predict per-patch normalised pixels (MAE's default for its released models)."""

    kind: Literal["mae"] = "mae"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_dim: int = 2048

    def __post_init__(self) -> None:
        c = Checker(self)
        c.choice("kind", ("mae",))
        c.number("mask_ratio", gt=0, lt=1, why=" (the fraction of patches the encoder does not see)")
        c.flag("norm_pix_loss")
        decoder_ok = all([c.int(name, ge=1) for name in ("decoder_width", "decoder_depth", "decoder_heads",
                                                          "decoder_mlp_dim")])
        if decoder_ok:
            try:
                _ = self.decoder  # MAEDecoderConfig checks the combination
            except ValueError as e:
                for line in str(e).splitlines()[1:]:
                    c.fail(f"decoder: {line.strip()}")
        c.done()

    @property
    def decoder(self) -> MAEDecoderConfig:
        return MAEDecoderConfig(width=self.decoder_width, depth=self.decoder_depth, heads=self.decoder_heads,
                                mlp_dim=self.decoder_mlp_dim)


class MAEObjective(Objective):
    """The model is MAE's encoder (no head); the trained module is encoder + decoder; the
    exported one is the encoder. Evaluation: the same masked reconstruction loss on the eval
    split, its masks fixed per sample."""

    eval_keys = ("loss", "samples")
    exported_prefix = "encoder."

    def num_classes(self, dataset_classes: int) -> int:
        return 0

    def wrap(self, model: nn.Module) -> nn.Module:
        return MaskedAutoencoder(model, self.cfg.decoder, norm_pix_loss=self.cfg.norm_pix_loss)

    def flops_per_image(self, module: nn.Module) -> float | None:
        encoder = self.exported(module)
        cfg = getattr(encoder, "cfg", None)
        if cfg is None:
            return None
        from model.flops import mae_macs_per_image

        visible = int(cfg.num_patches * (1 - self.cfg.mask_ratio))
        d = self.cfg.decoder
        return 3.0 * 2.0 * mae_macs_per_image(cfg, d.width, d.depth, d.mlp_dim, visible)

    @staticmethod
    def _mask(batch: tuple[Tensor, ...], position: int) -> Tensor:
        if len(batch) <= position or batch[position].dtype.is_floating_point:
            raise ValueError("the MAE objective needs patch masks from the loader: build it with a data config "
                             "whose mask section draws them (DataConfig(mask=MaskConfig(kind='random', ...)); "
                             "an Experiment with an MAE objective sets this itself)")
        return batch[position]

    def loss(self, module: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        loss, _ = module(batch[0], self._mask(batch, 2))
        return loss

    def eval_sums(self, module: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        valid = valid_rows(batch)
        n = int(valid.sum())
        if n == 0:
            return as_sums([0, 0])
        loss, _ = module(batch[0][valid], self._mask(batch, 3)[valid])
        return as_sums([loss * n, n])  # every row masks as many patches: the mean of row means

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        n = max(sums[1].item(), 1.0)
        return {"eval_loss": sums[0].item() / n, "eval_samples": sums[1].item()}
