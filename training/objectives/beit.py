"""BEiT pre-training (Bao et al. 2021, "BEiT: BERT Pre-Training of Image Transformers"; microsoft/unilm
``beit/engine_for_pretraining.py``): predict, at blockwise-masked patches, the visual token a
frozen tokenizer assigns to each patch.

The model is timm's BEiT backbone (``model.kind="timm"``, a ``beit_*`` name: relative position
bias, LayerScale, no absolute position embedding) without a head; the trained module is
``model.beit.MaskedImageModel`` (a learnt mask token, the final norm, a linear MIM head over the
vocabulary); the exported one is the backbone, for fine-tuning. The masks come from the data
pipeline (``DataConfig.mask``, kind "block": an Experiment with a BEiT objective derives them).

The tokenizer is any ``model.tokenizer.ImageTokenizer`` (the pipeline's dVAE), given to the
Trainer as the objective's frozen model (``Trainer(..., teacher=tokenizer)``, loaded by
orchestration from ``train.objective.tokenizer``). Its tokens are computed on the fly from the
very images the backbone sees, under ``no_grad``, in its own dtype, on every rank: it is not in
the module DeepSpeed trains (no optimizer state, not in checkpoints, not exported). See
docs/beit.md for why it is replicated rather than sharded by ZeRO-3.

Loss: cross-entropy over the masked positions (every image masks as many, so the batch mean is
the mean of the per-image means, on any number of ranks). Masked-token accuracy is logged in
training (``mim_acc``, over each log window) and evaluation (``eval_mim_acc``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from confkit import Checker
from training.objectives.base import Objective, as_sums, valid_rows

#: BEiT masks 75 of the 196 patches of a 224 px image (``--num_mask_patches 75``); with
#: ``pipeline.masking.masked_count``'s rule this ratio hides exactly 75 of 196.
BEIT_MASK_RATIO = 0.3826


@dataclass(frozen=True, kw_only=True)
class BEiTConfig:
    """BEiT's masked image modelling; see the module docstring. ``mask_ratio``: the fraction of
    patches masked in blocks (BEiT: 75 of 196, :data:`BEIT_MASK_RATIO`); ``vocab_size``: the
    tokenizer's vocabulary, the MIM head's width (BEiT v1: 8192; checked against the tokenizer
    before Ray starts, and part of the checkpoint's config: a run cannot resume with another);
    ``tokenizer``: where orchestration loads the frozen tokenizer from (``models:/NAME@ALIAS``,
    ``models:/NAME/VERSION``, ``runs:/``, a run's export or a model folder / ``.safetensors`` file;
    never a pickle)."""

    kind: Literal["beit"] = "beit"
    mask_ratio: float = BEIT_MASK_RATIO
    vocab_size: int = 8192
    tokenizer: str = ""

    def __post_init__(self) -> None:
        c = Checker(self)
        c.choice("kind", ("beit",))
        c.number("mask_ratio", gt=0, lt=1, why=" (the fraction of patches masked in blocks)")
        c.int("vocab_size", ge=2, why=" (the tokenizer's vocabulary)")
        c.text("tokenizer", why=": the frozen tokenizer whose tokens BEiT predicts (models:/NAME@ALIAS, "
                                "models:/NAME/VERSION, a run's export, a model folder or .safetensors file)")
        c.done()


def tokenizer_fit_problem(tokenizer: object, vocab_size: int, patch_size: int, image_size: int) -> str | None:
    """Why ``tokenizer`` cannot give the targets of a BEiT with this MIM head, patch size and image
    size (None: it can): one token per student patch, over the head's vocabulary."""
    have = (getattr(tokenizer, "vocab_size", None), getattr(tokenizer, "patch_size", None),
            getattr(tokenizer, "image_size", None))
    if have[1] != patch_size:
        return (f"the tokenizer gives one token per {have[1]}x{have[1]} patch, the student's patches are "
                f"{patch_size}x{patch_size}: train the tokenizer with patch_size {patch_size} (one token per patch)")
    if have[2] != image_size:
        return (f"the tokenizer was trained on {have[2]}x{have[2]} images, the student sees {image_size}x{image_size}: "
                f"train the tokenizer at image_size {image_size} (or pre-train at {have[2]})")
    if have[0] != vocab_size:
        return (f"the tokenizer's vocabulary has {have[0]} tokens, the MIM head predicts {vocab_size}: set "
                f"train.objective.vocab_size={have[0]}")
    return None


class BEiTObjective(Objective):
    """BEiT's MIM of a frozen ``tokenizer``'s tokens; see the module docstring."""

    eval_keys = ("loss", "hits", "masked", "samples")
    exported_prefix = "encoder."

    def __init__(self, cfg: BEiTConfig, tokenizer: nn.Module | None = None) -> None:
        super().__init__(cfg)
        self.tokenizer = tokenizer
        if tokenizer is not None:
            tokenizer.eval()
            tokenizer.requires_grad_(False)  # frozen: no gradient is ever computed or stored for it
        self._hits: Tensor | None = None  # this rank's masked-token hits and count since the last log
        self._count: Tensor | None = None

    def num_classes(self, dataset_classes: int) -> int:
        return 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The backbone with BEiT's mask token, norm and MIM head (the tokenizer stays outside:
        DeepSpeed never sees its parameters). Without a tokenizer (the planner's trace) only the
        module is built."""
        from model.beit import MaskedImageModel

        mim = MaskedImageModel(model, self.cfg.vocab_size)
        if self.tokenizer is not None:
            patch = int(model.patch_embed.patch_size[0])
            size = int(model.patch_embed.img_size[0])
            problem = tokenizer_fit_problem(self.tokenizer, self.cfg.vocab_size, patch, size)
            if problem:
                raise ValueError(f"tokenizer {self.cfg.tokenizer!r}: {problem}")
        return mim

    def _tokens(self, images: Tensor) -> Tensor:
        """The tokenizer's (B, N) int64 tokens of ``images``, in its own dtype, on their device (moved once)."""
        if self.tokenizer is None:
            raise ValueError("the BEiT objective needs its tokenizer: Trainer(..., teacher=tokenizer) "
                             "(orchestration loads it from train.objective.tokenizer)")
        p = next(self.tokenizer.parameters(), None)
        if p is not None and p.device != images.device:
            self.tokenizer.to(images.device)
            p = next(self.tokenizer.parameters())
        with torch.no_grad():
            return self.tokenizer.tokenize(images.to(p.dtype) if p is not None else images)

    @staticmethod
    def _mask(batch: tuple[Tensor, ...], position: int) -> Tensor:
        if len(batch) <= position or batch[position].dtype.is_floating_point:
            raise ValueError("the BEiT objective needs block masks from the loader: build it with a data config "
                             "whose mask section draws them (DataConfig(mask=MaskConfig(kind='block', ...)); an "
                             "Experiment with a BEiT objective sets this itself)")
        return batch[position]

    def _forward(self, module: nn.Module, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(MIM logits (B*M, V) in fp32, the tokenizer's tokens there (B*M,))."""
        from model.beit import masked_positions

        tokens = self._tokens(images)  # (B, N): the same (augmented) images the backbone sees
        logits = module(images, mask)  # (B, M, V)
        targets = tokens.gather(1, masked_positions(mask))  # (B, M), the same position order
        return logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)

    def loss(self, module: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        logits, targets = self._forward(module, batch[0], self._mask(batch, 2))
        hits = (logits.detach().argmax(-1) == targets).sum().double()
        count = torch.tensor(float(targets.numel()), dtype=torch.float64, device=hits.device)
        self._hits = hits if self._hits is None else self._hits + hits  # on the device: no host sync
        self._count = count if self._count is None else self._count + count
        return F.cross_entropy(logits, targets)

    def train_sums(self) -> Tensor | None:
        if self._hits is None or self._count is None:
            return None
        out = torch.stack([self._hits, self._count])
        self._hits = self._count = None
        return out

    def train_metrics(self, sums: Tensor) -> dict[str, float]:
        return {"mim_acc": sums[0].item() / max(sums[1].item(), 1.0)}

    def eval_sums(self, module: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        valid = valid_rows(batch)
        n = int(valid.sum())
        if n == 0:
            return as_sums([0, 0, 0, 0])
        logits, targets = self._forward(module, batch[0][valid], self._mask(batch, 3)[valid])
        loss = F.cross_entropy(logits, targets, reduction="sum")
        return as_sums([loss, (logits.argmax(-1) == targets).sum(), targets.numel(), n])

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        masked = max(sums[2].item(), 1.0)
        return {"eval_loss": sums[0].item() / masked, "eval_mim_acc": sums[1].item() / masked,
                "eval_samples": sums[3].item()}
