"""#25 DeiT distillation: the distilled ViT (timm parity), the distillation objective (DeiT's
losses.py), teacher loading and its refusals, repeated augmentation in the loader.

The end-to-end claim (a pipeline-trained teacher makes a distilled student beat the same student
trained alone) is ``test_distillation_beats_no_teacher`` (slow).
"""

from __future__ import annotations

import pytest
import torch

from model import ViTConfig, ViTSpec, create_model
from model.weights import load_weights, save_weights, timm_kwargs


# ----------------------------------------------------------------------------- the distilled ViT
def test_distilled_vit_matches_timm_deit_tiny_distilled() -> None:
    """timm's deit_tiny_distilled_patch16_224 (random init, pretrained=False) -> its state dict in
    our Ti/16 with distilled=True: the same parameters, the same mean-of-heads logits in eval and
    the same two heads' logits in distilled training."""
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10).eval()
    ours = load_weights(create_model("Ti/16", num_classes=10, distilled=True), ref.state_dict()).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)
        ref.set_distilled_training(True)
        ref.train()
        ours.train()
        for a, b in zip(ours.forward_heads(x), ref(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # and back: our config builds timm's class with timm_kwargs
    from timm.models.deit import VisionTransformerDistilled

    back = VisionTransformerDistilled(**timm_kwargs(ours.cfg)).eval()
    back.load_state_dict(ours.state_dict())
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), rtol=0, atol=1e-5)


def test_distilled_vit_layout_and_refusals(tmp_path) -> None:
    m = create_model("mu/8", num_classes=5, image_size=32, distilled=True)
    assert m.cfg.num_prefix_tokens == 2 and m.cfg.seq_len == 16 + 2
    assert m.pos_embed.shape == (1, 18, 32) and m.head_dist.out_features == 5
    assert {"dist_token", "cls_token", "pos_embed"} <= m.no_weight_decay()
    x = torch.randn(3, 3, 32, 32)
    cls_logits, dist_logits = m.forward_heads(x)
    torch.testing.assert_close(m(x), (cls_logits + dist_logits) / 2)
    assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (3, 32)
    logits, attns = m.forward_with_attention(x)
    assert attns[0].shape[-1] == 18
    torch.testing.assert_close(logits, m(x), rtol=1e-4, atol=1e-5)
    m.reset_classifier(7)
    assert m(x).shape == (3, 7) and m.head_dist.out_features == 7
    # a plain ViT is unchanged (no dist_token, no head_dist) and has no second head
    plain = create_model("mu/8", num_classes=5, image_size=32)
    assert not any(k.startswith(("dist_token", "head_dist")) for k in plain.state_dict())
    with pytest.raises(ValueError, match="needs a distilled model"):
        plain.forward_heads(x)
    # a distilled checkpoint into a plain model, and the other way: named, with the fix
    save_weights(m, tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="is a distilled DeiT .* distilled=True"):
        load_weights(create_model("mu/8", num_classes=7, image_size=32), tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="has no dist_token .* distilled=False"):
        load_weights(create_model("mu/8", num_classes=5, image_size=32, distilled=True), plain.state_dict())
    # fine-tuning a distilled model to another class count: both heads are new
    ft = load_weights(create_model("mu/8", num_classes=3, image_size=32, distilled=True), tmp_path / "d.safetensors",
                      ignore_head=True)
    assert torch.equal(ft.dist_token, m.dist_token) and ft.head_dist.out_features == 3
    for bad in (dict(pool="gap"), dict(posemb="sincos2d"), dict(representation_size=8)):
        with pytest.raises(ValueError, match="distilled=True"):
            ViTConfig(width=32, depth=1, heads=2, mlp_dim=64, image_size=32, patch_size=8, distilled=True, **bad)
        with pytest.raises(ValueError, match="distilled=True"):
            ViTSpec(variant="mu/8", distilled=True, **bad)
    assert ViTSpec(variant="mu/8", distilled=True).config(num_classes=4, image_size=32).distilled
    assert ViTSpec.of(m.cfg).distilled
