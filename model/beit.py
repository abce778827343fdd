"""BEiT's masked image modelling network (Bao et al. 2021, "BEiT: BERT Pre-Training of Image
Transformers"; microsoft/unilm ``beit/modeling_pretrain.py``) around timm's BEiT backbone.

The backbone is timm's ``Beit`` (``model.zoo``, family "beit": relative position bias in every
block, LayerScale, no absolute position embedding) built without a head. timm's ``Beit`` has no
mask token, so the masked forward is written here around its modules, as BEiT's
``VisionTransformerForMaskedImageModeling.forward_features`` does: the patch embeddings of the
masked patches are replaced by one learnt mask token *before* the class token is prepended,
every token goes through the blocks (BEiT, unlike MAE, encodes the masked positions), then a
final LayerNorm and a linear MIM head over the tokenizer's vocabulary, read at the masked
positions only.

The final norm and the head belong to this wrapper, not to the backbone: the exported backbone
(what fine-tuning loads) carries no pre-training norm, and fine-tuning with mean pooling starts
a fresh ``fc_norm`` as BEiT's ``run_class_finetuning.py`` does (its checkpoint's ``norm.*`` has
no place in a mean-pooling model). The backbone's own ``fc_norm`` gets no gradient here and is
frozen, so ZeRO never waits for a gradient that never comes.

Which patches are masked is given ((B, N) bool, True = masked, row-major like the patch tokens),
drawn per sample by the data pipeline (``pipeline.masking``, kind "block"); every row masks the
same number of patches, so the masked positions of a batch are one dense (B, M) index.

Shape legend: B batch, N patches, M masked patches per image, D width, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def masked_positions(mask: Tensor) -> Tensor:
    """(B, N) bool -> (B, M) indices of the masked patches in position order. Raises when rows
    mask different numbers of patches (the pipeline's masks never do) or none."""
    counts = mask.sum(1)
    if (counts != counts[0]).any():
        raise ValueError(f"every sample must mask the same number of patches, got {sorted(set(counts.tolist()))}")
    m = int(counts[0])
    if m < 1:
        raise ValueError("the mask hides no patch: BEiT has nothing to predict")
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # masked first, each group in order
    return order[:, :m]


class MaskedImageModel(nn.Module):
    """BEiT's pre-training network around a timm ``Beit`` ``encoder`` (no head: ``num_classes=0``):
    ``forward(images, mask) -> (B, M, V)`` MIM logits at the masked positions (position order).
    ``vocab_size``: the tokenizer's vocabulary (BEiT v1: DALL-E's 8192)."""

    def __init__(self, encoder: nn.Module, vocab_size: int, *, init_std: float = 0.02) -> None:
        super().__init__()
        if not hasattr(encoder, "rel_pos_bias") or not hasattr(encoder, "blocks"):
            raise ValueError(f"BEiT's masked image modelling needs timm's BEiT backbone (model.kind='timm', a "
                             f"beit_* name); got {type(encoder).__name__}")
        if getattr(encoder, "num_classes", 0):
            raise ValueError(f"the BEiT backbone must have no head (num_classes=0), got {encoder.num_classes}")
        self.encoder = encoder
        self.vocab_size = vocab_size
        D = encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        eps = getattr(encoder.fc_norm, "eps", 1e-6)
        self.norm = nn.LayerNorm(D, eps=eps)  # BEiT's pre-training ``norm`` (LayerNorm, eps 1e-6)
        self.lm_head = nn.Linear(D, vocab_size)
        self._checkpointing = False
        encoder.fc_norm.requires_grad_(False)  # the fine-tuning pooling norm: unused here (module docstring)
        with torch.no_grad():  # BEiT's init (trunc_normal_ clipped at one std, zero bias)
            for t in (self.mask_token, self.lm_head.weight):
                nn.init.trunc_normal_(t, std=init_std, a=-init_std, b=init_std)
            nn.init.zeros_(self.lm_head.bias)

    def no_weight_decay(self) -> set[str]:
        """BEiT's pre-training skip list (``modeling_pretrain.py``: ``{'pos_embed', 'cls_token'}``):
        the relative position bias tables and the mask token *are* decayed there, unlike timm's
        fine-tuning list; biases and norms are 1-d and never decayed (``training.optim.param_groups``)."""
        return {"encoder.cls_token", "encoder.pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self._checkpointing = enable

    def forward_features(self, images: Tensor, mask: Tensor) -> Tensor:
        """(B, C, H, W), (B, N) bool -> normalised tokens (B, 1 + N, D), masked patches' embeddings
        replaced by the mask token."""
        enc = self.encoder
        x = enc.patch_embed(images)  # (B, N, D)
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat([enc.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # (B, 1 + N, D)
        if enc.pos_embed is not None:  # BEiT's own backbones have none; a timm variant with one still works
            x = x + enc.pos_embed
        x = enc.pos_drop(x)
        rel = enc.rel_pos_bias() if enc.rel_pos_bias is not None else None
        for blk in enc.blocks:
            if self._checkpointing and self.training:
                x = checkpoint(blk, x, shared_rel_pos_bias=rel, use_reentrant=False)
            else:
                x = blk(x, shared_rel_pos_bias=rel)
        return self.norm(x)

    def logits_at(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Normalised tokens (B, 1 + N, D), masked positions (B, M) -> MIM logits (B, M, V)."""
        patches = tokens[:, 1:]
        picked = torch.gather(patches, 1, positions.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return self.lm_head(picked)

    def forward(self, images: Tensor, mask: Tensor) -> Tensor:
        return self.logits_at(self.forward_features(images, mask), masked_positions(mask))
