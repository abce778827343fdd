"""model/: parity with timm, paper numbers, weights interop, errors a user can act on.

All CPU and fast (the whole file runs in well under a minute on 2 cores).
"""

from __future__ import annotations

import math

import pytest
import timm  # a dev dependency: a missing install must fail, not skip
import torch
import torch.nn.functional as F

from model import (
    VARIANTS,
    VisionTransformer,
    ViTConfig,
    attention_rollout,
    cls_attention_maps,
    create_model,
    from_timm_state_dict,
    load_weights,
    macs_per_image,
    parse_variant,
    resample_pos_embed,
    save_weights,
    to_timm_state_dict,
    train_flops_per_image,
    vit_config,
)
from model.layers import posemb_sincos_2d
from model.weights import read_config, timm_kwargs


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def mu(**kw) -> VisionTransformer:
    """A tiny model with a random (non-zero) head so gradients flow everywhere."""
    m = create_model("mu/8", num_classes=kw.pop("num_classes", 5), image_size=kw.pop("image_size", 32), **kw)
    with torch.no_grad():
        m.head.weight.normal_()
    return m


# -- variants and config ------------------------------------------------------------------


def test_parse_variant() -> None:
    assert parse_variant("B/16") == dict(width=768, depth=12, heads=12, mlp_dim=3072, patch_size=16)
    assert parse_variant("H/14")["patch_size"] == 14
    assert parse_variant("S/32")["width"] == 384
    assert parse_variant("L/16")["depth"] == 24
    assert {"mu", "Ti", "S", "B", "L", "H"} <= set(VARIANTS)


@pytest.mark.parametrize("bad", ["X/16", "B", "B/0", "B/x", "b/16", "B/16/2", ""])
def test_parse_variant_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match=r"B/P|'B/16'"):
        parse_variant(bad)


def test_unknown_variant_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown ViT size 'Q'.*mu/P, Ti/P, S/P, B/P, L/P, H/P"):
        create_model("Q/16", num_classes=10)


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (dict(image_size=230), "image_size 230 is not divisible by patch_size 16"),
        (dict(width=30, heads=4), "width 30 is not divisible by heads 4"),
        (dict(pool="max"), "pool must be 'cls', 'gap' or 'avg'"),
        (dict(posemb="rope"), "posemb must be 'learn' or 'sincos2d'"),
        (dict(posemb="sincos2d", width=18, heads=2), "divisible by 4"),
        (dict(drop_path=1.0), r"drop_path must be in \[0, 1\)"),
        (dict(representation_size=0), "representation_size"),
        (dict(depth=0), "depth must be a positive int"),
    ],
)
def test_config_validation(kw: dict, msg: str) -> None:
    base = dict(width=32, depth=2, heads=2, mlp_dim=64)
    with pytest.raises(ValueError, match=msg):
        ViTConfig(**{**base, **kw})


def test_config_properties_and_overrides() -> None:
    cfg = vit_config("B/16", num_classes=10, image_size=384, drop_path=0.1)
    assert cfg.grid == (24, 24) and cfg.num_patches == 576 and cfg.seq_len == 577
    assert cfg.variant == "B/16" and cfg.drop_path == 0.1
    assert vit_config("mu/8", num_classes=2, image_size=32, pool="gap").seq_len == 16
    with pytest.raises(ValueError, match="unknown ViTConfig field"):
        vit_config("mu/8", num_classes=2, widht=3)


# -- paper / timm numbers -----------------------------------------------------------------

TIMM_PARAMS = {"S/16": 22_050_664, "B/16": 86_567_656, "L/16": 304_326_632, "H/14": 632_045_800}
TIMM_GMACS = {"S/16": 4.61, "B/16": 17.58, "L/16": 61.6, "H/14": 167.4}


@pytest.mark.parametrize("name", list(TIMM_PARAMS))
def test_param_count_equals_timm(name: str) -> None:
    with torch.device("meta"):
        m = create_model(name, num_classes=1000)
    assert sum(p.numel() for p in m.parameters()) == TIMM_PARAMS[name]


@pytest.mark.parametrize("name", list(TIMM_GMACS))
def test_macs_agree_with_timm_published(name: str) -> None:
    cfg = vit_config(name, num_classes=1000)
    gmacs = macs_per_image(cfg) / 1e9
    assert abs(gmacs / TIMM_GMACS[name] - 1) < 0.02, gmacs
    assert train_flops_per_image(cfg) == 6 * macs_per_image(cfg)


# -- timm parity --------------------------------------------------------------------------


@pytest.mark.parametrize(("timm_name", "variant", "batch"),
                         [("vit_small_patch16_224", "S/16", 2), ("vit_base_patch16_224", "B/16", 1)])
def test_logits_equal_timm_both_directions(timm_name: str, variant: str, batch: int) -> None:
    ref = timm.create_model(timm_name, pretrained=False).eval()  # random init, no download
    with torch.no_grad():
        ref.head.weight.normal_(std=0.05)
        ref.head.bias.normal_(std=0.05)
    with torch.device("meta"):  # skip our own init: every tensor is overwritten
        ours = create_model(variant, num_classes=1000).eval()
    sd = {k: v.clone() for k, v in from_timm_state_dict(ref.state_dict()).items()}
    ours.load_state_dict(sd, strict=True, assign=True)
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        feats = ours.forward_features(x)
        torch.testing.assert_close(feats, ref.forward_features(x), atol=1e-4, rtol=0)
        want = ref(x)
        assert want.abs().max() > 0.1  # the head is exercised
        torch.testing.assert_close(ours.forward_head(feats), want, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours(x), want, atol=1e-4, rtol=0)

        # ours -> timm: change ours (embeddings, a block, the final norm, the head), export,
        # and timm must follow.
        for name, p in ours.named_parameters():
            if not name.startswith(("blocks.1.", "blocks.2.", "blocks.3.", "blocks.4.", "blocks.5.")):
                p.add_(torch.randn_like(p) * 0.01)
        ref.load_state_dict(to_timm_state_dict(ours.state_dict()), strict=True)
        torch.testing.assert_close(ref(x), ours(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("pool", ["cls", "gap", "avg"])
@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_timm_kwargs_build_the_same_function(pool: str, posemb: str) -> None:
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    ours = mu(pool=pool, posemb=posemb).eval()
    ref = TimmViT(**timm_kwargs(ours.cfg)).eval()
    ref.load_state_dict(to_timm_state_dict(ours.state_dict()), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
        back = mu(pool=pool, posemb=posemb).eval()
        back.load_state_dict(from_timm_state_dict(ref.state_dict()), strict=True)
        torch.testing.assert_close(back(x), ours(x), atol=1e-6, rtol=0)


def test_unsupported_timm_features_are_named() -> None:
    sd = mu().state_dict()
    sd["blocks.0.ls1.gamma"] = torch.ones(32)
    with pytest.raises(ValueError, match=r"layer scale: \['blocks.0.ls1.gamma'\]"):
        from_timm_state_dict(sd)
    with pytest.raises(ValueError, match="drop_pre_logits=True"):
        to_timm_state_dict(mu(representation_size=16).state_dict())
    assert not any(k.startswith("pre_logits") for k in
                   to_timm_state_dict(mu(representation_size=16).state_dict(), drop_pre_logits=True))


# -- forward paths ------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, dict(pool="gap", posemb="sincos2d"), dict(representation_size=24)])
def test_forward_with_attention_matches_forward(overrides: dict) -> None:
    m = mu(**overrides).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, attns = m.forward_with_attention(x)
        torch.testing.assert_close(logits, m(x), atol=1e-5, rtol=0)
    n = m.cfg.seq_len
    assert len(attns) == m.cfg.depth
    for a in attns:
        assert a.shape == (2, m.cfg.heads, n, n)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, m.cfg.heads, n))


def test_forward_with_attention_matches_forward_s16() -> None:
    m = create_model("S/16", num_classes=10).eval()
    with torch.no_grad():
        m.head.weight.normal_(std=0.05)  # logits of order 1, so 1e-5 is a fair fp32 tolerance
        x = torch.randn(1, 3, 224, 224)
        logits, attns = m.forward_with_attention(x)
        torch.testing.assert_close(logits, m(x), atol=1e-5, rtol=0)
    assert attns[0].shape == (1, 6, 197, 197)


def test_attention_rollout_and_cls_maps() -> None:
    m = mu().eval()
    with torch.no_grad():
        _, attns = m.forward_with_attention(torch.randn(2, 3, 32, 32))
    n = m.cfg.seq_len
    for ratio in (0.0, 0.5):
        r = attention_rollout(attns, discard_ratio=ratio)
        assert r.shape == (2, n, n)
        torch.testing.assert_close(r.sum(-1), torch.ones(2, n))
        assert (r >= 0).all()
    maps = cls_attention_maps(attns, m.cfg.grid)
    assert maps.shape == (m.cfg.depth, 2, m.cfg.heads, 4, 4)
    with pytest.raises(ValueError, match="does not match grid"):
        cls_attention_maps(attns, (5, 5))


def test_forward_head_pre_logits_and_features() -> None:
    m = mu(representation_size=24)
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_features(x)
    assert feats.shape == (2, 17, 32)
    assert m.forward_head(feats, pre_logits=True).shape == (2, 24)
    assert m.forward_head(feats).shape == (2, 5)


@pytest.mark.parametrize(
    ("shape", "msg"),
    [
        ((2, 1, 32, 32), "expected 3 input channels, got 1"),
        ((2, 3, 64, 64), "expected 32x32 images, got 64x64"),
        ((3, 32, 32), r"expected images of shape \(B, 3, H, W\)"),
    ],
)
def test_bad_inputs_raise(shape: tuple[int, ...], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        mu()(torch.randn(*shape))


def test_gradients_reach_every_parameter() -> None:
    m = mu(representation_size=16, drop_path=0.1, dropout=0.1, attention_dropout=0.1).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(m(x), y).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    m = mu().train()
    x = torch.randn(2, 3, 32, 32)
    m(x).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    assert m.cfg.activation_checkpointing
    m(x).square().sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)


# -- init and weight decay ----------------------------------------------------------------


def test_initialisation_follows_big_vision() -> None:
    m = create_model("S/16", num_classes=10, head_bias_init=-10.0)
    assert (m.head.weight == 0).all() and (m.head.bias == -10.0).all()
    assert (m.cls_token == 0).all()
    assert abs(m.pos_embed.std().item() - 0.02) < 0.002
    w = m.patch_embed.proj.weight  # lecun normal: var 1/fan_in
    assert abs(w.var().item() * w[0].numel() - 1) < 0.05
    qkv = m.blocks[0].attn.qkv.weight  # xavier per q/k/v: var 2/(D+D)
    assert abs(qkv.var().item() * (384 + 384) / 2 - 1) < 0.05
    assert (m.blocks[0].attn.qkv.bias == 0).all()
    assert 0 < m.blocks[0].mlp.fc1.bias.abs().max() < 1e-5


def test_no_weight_decay_names() -> None:
    m = mu(representation_size=16)
    nwd = m.no_weight_decay()
    names = dict(m.named_parameters())
    assert nwd <= set(names)
    expected = {"pos_embed", "cls_token"}
    expected |= {n for n in names if n.endswith(".bias") or ".norm" in n or n.startswith("norm.")}
    assert nwd == expected
    assert not any(n.endswith(".weight") and names[n].ndim > 1 for n in nwd)


def test_headless_model_returns_pooled_features() -> None:
    m = create_model("mu/8", num_classes=0, image_size=32, pool="gap")
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_reset_classifier() -> None:
    m = mu()
    m.reset_classifier(7)
    assert m.cfg.num_classes == 7 and m.head.weight.shape == (7, 32) and (m.head.weight == 0).all()
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_meta_build_then_materialise() -> None:
    with torch.device("meta"):
        m = create_model("mu/8", num_classes=3, image_size=32, posemb="sincos2d")
    m.to_empty(device="cpu")
    m.init_weights()
    torch.testing.assert_close(m.pos_embed, posemb_sincos_2d((4, 4), 32))
    assert torch.isfinite(m(torch.randn(1, 3, 32, 32))).all()


def test_posemb_sincos_2d_layout() -> None:
    pe = posemb_sincos_2d((2, 3), 8)  # (1, 6, 8); omega = [1, 1e-4]
    assert pe.shape == (1, 6, 8)
    y, x = 1, 2  # token 5
    omega = torch.tensor([1.0, 1e-4])
    want = torch.cat([torch.sin(x * omega), torch.cos(x * omega), torch.sin(y * omega), torch.cos(y * omega)])
    torch.testing.assert_close(pe[0, 5], want)


# -- weights files ------------------------------------------------------------------------


def test_resample_same_grid_is_identity_and_prefix_kept() -> None:
    pe = torch.randn(1, 1 + 14 * 14, 16)
    torch.testing.assert_close(resample_pos_embed(pe, (14, 14)), pe, atol=0, rtol=0)
    up = resample_pos_embed(pe, (24, 24))
    assert up.shape == (1, 1 + 576, 16)
    torch.testing.assert_close(up[:, :1], pe[:, :1], atol=0, rtol=0)
    down = resample_pos_embed(pe, (7, 7))
    assert down.shape == (1, 50, 16)
    const = torch.ones(1, 196, 4)  # a constant field stays constant under bicubic resampling
    torch.testing.assert_close(resample_pos_embed(const, (24, 24), 0), torch.ones(1, 576, 4))
    with pytest.raises(ValueError, match="not a square"):
        resample_pos_embed(torch.randn(1, 1 + 15, 4), (4, 4))


def test_224_checkpoint_loads_into_384_model(tmp_path) -> None:
    src = create_model("mu/16", num_classes=4)
    with torch.no_grad():
        src.pos_embed.normal_()
    path = tmp_path / "mu.safetensors"
    save_weights(src, path, metadata={"step": "100"})
    assert read_config(path) == src.cfg

    with pytest.raises(ValueError, match=r"pos_embed: checkpoint is for a 14x14 patch grid.*allow_resample=True"):
        load_weights(create_model("mu/16", num_classes=4, image_size=384), path)  # never converted silently
    dst = load_weights(create_model("mu/16", num_classes=4, image_size=384), path, allow_resample=True)
    torch.testing.assert_close(dst.pos_embed, resample_pos_embed(src.pos_embed.detach(), (24, 24)))
    torch.testing.assert_close(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    assert dst(torch.randn(1, 3, 384, 384)).shape == (1, 4)


def test_load_weights_errors_name_tensor_and_shapes(tmp_path) -> None:
    path = tmp_path / "mu.safetensors"
    save_weights(mu(num_classes=5), path)
    with pytest.raises(ValueError, match=r"head.weight: checkpoint has shape \(5, 32\), model expects \(9, 32\).*ignore_head=True"):
        load_weights(mu(num_classes=9), path)
    m = load_weights(mu(num_classes=9), path, ignore_head=True)
    assert (m.head.weight != 0).any()  # the model's own head is kept
    wide = create_model("mu/8", num_classes=5, image_size=32, width=64, heads=2)
    with pytest.raises(ValueError, match=r"patch_embed.proj.weight: checkpoint has shape \(32, 3, 8, 8\), "
                                         r"model expects \(64, 3, 8, 8\)"):
        load_weights(wide, path)
    with pytest.raises(ValueError, match=r"missing \['pre_logits.fc.bias', 'pre_logits.fc.weight'\]"):
        load_weights(mu(num_classes=5, representation_size=32), path)
    sd = mu(num_classes=5).state_dict()
    load_weights(mu(num_classes=5), {"module." + k: v for k, v in sd.items()})  # DDP prefix stripped
    with pytest.raises(ValueError, match="str -> str"):
        save_weights(sd, path, metadata={"step": 3})  # type: ignore[dict-item]


def test_sincos_model_keeps_its_own_posemb_across_resolutions(tmp_path) -> None:
    path = tmp_path / "s.safetensors"
    save_weights(mu(posemb="sincos2d"), path)
    dst = load_weights(mu(posemb="sincos2d", image_size=64), path)
    torch.testing.assert_close(dst.pos_embed, posemb_sincos_2d((8, 8), 32))


def test_macs_formula_by_hand() -> None:
    cfg = vit_config("mu/8", num_classes=5, image_size=32)
    n, d, m = 17, 32, 64
    want = 16 * d * 3 * 64 + 2 * (n * d * 4 * d + 2 * n * n * d + 2 * n * d * m) + d * 5
    assert macs_per_image(cfg) == want
    assert math.isclose(train_flops_per_image(cfg), 6 * want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sdpa_paths_agree_and_train_in_bf16() -> None:
    m = create_model("S/16", num_classes=10).cuda().eval()
    with torch.no_grad():
        m.head.weight.normal_(std=0.05)
        x = torch.randn(2, 3, 224, 224, device="cuda")
        logits, _ = m.forward_with_attention(x)
        torch.testing.assert_close(logits, m(x), atol=1e-4, rtol=0)  # fp32 SDPA kernel vs explicit
    m.train().set_grad_checkpointing(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # flash attention path
        loss = F.cross_entropy(m(x).float(), torch.tensor([1, 2], device="cuda"))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
