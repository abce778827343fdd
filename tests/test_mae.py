"""MAE (model/mae.py, training/objectives/mae.py): the algorithm of facebookresearch/mae's
``models_mae.py``, checked against a step-by-step re-statement of it in this file."""

from __future__ import annotations

import pytest
import torch

from model import VisionTransformer, ViTConfig
from model.mae import MAEDecoderConfig, MaskedAutoencoder, mask_order, patchify, unpatchify


def _mae(norm_pix: bool = True) -> MaskedAutoencoder:
    torch.manual_seed(0)
    enc = VisionTransformer(ViTConfig(image_size=32, patch_size=4, width=32, depth=2, heads=2, mlp_dim=64,
                                      num_classes=0, posemb="sincos2d"))
    return MaskedAutoencoder(enc, MAEDecoderConfig(width=16, depth=2, heads=2, mlp_dim=32), norm_pix_loss=norm_pix).eval()


def _reference(m: MaskedAutoencoder, imgs: torch.Tensor, noise: torch.Tensor, ratio: float) -> tuple:
    """models_mae.py's forward with its random_masking driven by ``noise``: the visible tokens
    go through the encoder in noise order (not position order), then are unshuffled."""
    enc = m.encoder
    x = enc.patch_embed(imgs) + enc.pos_embed  # our sincos covers the patches only (MAE's cls pos is 0)
    B, L, D = x.shape
    keep_n = int(L * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep_n, None].repeat(1, 1, D))
    mask = torch.ones(B, L)
    mask[:, :keep_n] = 0
    mask = torch.gather(mask, 1, ids_restore)
    x = torch.cat([enc.cls_token.expand(B, -1, -1), x], dim=1)
    x = enc.norm(enc.blocks(x))
    x = m.decoder_embed(x)
    tokens = m.mask_token.repeat(B, L + 1 - x.shape[1], 1)
    x_ = torch.gather(torch.cat([x[:, 1:], tokens], 1), 1, ids_restore[..., None].repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1], x_], 1) + m.decoder_pos_embed
    for blk in m.decoder_blocks:
        x = blk(x)
    pred = m.decoder_pred(m.decoder_norm(x))[:, 1:]
    target = patchify(imgs, 4)
    if m.norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum(), pred, mask.bool()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_matches_the_reference_algorithm_whatever_the_order_of_visible_tokens(norm_pix: bool) -> None:
    m = _mae(norm_pix)
    imgs = torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, 64)
    with torch.no_grad():
        want_loss, want_pred, mask = _reference(m, imgs, noise, 0.75)
        loss, pred = m(imgs, mask)
    assert int(mask.sum(1)[0]) == 64 - int(64 * 0.25) and (mask.sum(1) == mask.sum(1)[0]).all()
    torch.testing.assert_close(pred, want_pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-5)


def test_loss_counts_only_masked_patches_and_gradients_reach_both_halves() -> None:
    m = _mae().train()
    imgs = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, 16:] = True
    loss, pred = m(imgs, mask)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    # A visible patch's pixels never enter the loss: changing them moves the loss only through the encoder.
    with torch.no_grad():
        target = m.target(imgs)
        per_patch = ((pred - target) ** 2).mean(-1)
        torch.testing.assert_close(loss, per_patch[:, 16:].mean(), atol=1e-6, rtol=1e-6)


def test_patchify_round_trip_and_mask_order() -> None:
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(x, 4), 4), x)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    keep, restore, k = mask_order(mask)
    assert k == 2 and keep.tolist() == [[1, 3], [0, 1]]
    with pytest.raises(ValueError, match="same number of patches"):
        mask_order(torch.tensor([[True, False], [True, True]]))
    with pytest.raises(ValueError, match="no visible patch"):
        mask_order(torch.ones(2, 4, dtype=torch.bool))


def test_encoder_must_be_maes() -> None:
    enc = VisionTransformer(ViTConfig(image_size=32, patch_size=4, width=32, depth=1, heads=2, mlp_dim=64,
                                      num_classes=10))
    with pytest.raises(ValueError, match="pool='cls', posemb='sincos2d' and num_classes=0"):
        MaskedAutoencoder(enc, MAEDecoderConfig(width=16, depth=1, heads=2, mlp_dim=32))


def test_mae_flops_are_below_supervised_at_224() -> None:
    from model import vit_config
    from model.flops import macs_per_image, mae_macs_per_image

    enc = vit_config("B/16", num_classes=0, image_size=224)
    mae = mae_macs_per_image(enc, 512, 8, 2048, visible=49)
    sup = macs_per_image(vit_config("B/16", num_classes=1000, image_size=224))
    assert 0.5 < mae / sup < 0.6  # the decoder (8 x 512 on all 197 tokens) is ~a third of MAE's compute


def test_masks_hide_an_exact_count_and_blocks_are_blocks() -> None:
    import numpy as np

    from pipeline.masking import MaskConfig, draw_mask, masked_count

    rng = np.random.default_rng(0)
    rand = [draw_mask(MaskConfig(kind="random", ratio=0.75), 14, rng) for _ in range(50)]
    assert {int(m.sum()) for m in rand} == {masked_count(196, 0.75)} == {147}
    assert np.mean(rand, axis=0).min() > 0.4  # every position gets hidden sometimes (uniform)
    block_cfg = MaskConfig(kind="block", ratio=75 / 196 + 1e-9, min_block=16)
    blocks = [draw_mask(block_cfg, 14, rng) for _ in range(50)]
    assert {int(m.sum()) for m in blocks} == {masked_count(196, block_cfg.ratio)}
    # Blockwise masks are spatially clumped: a hidden patch's right neighbour is hidden far more
    # often than under random masking of the same count.
    def neighbours(ms: list) -> float:
        g = np.stack(ms).reshape(-1, 14, 14)
        return float((g[:, :, :-1] & g[:, :, 1:]).sum() / g[:, :, :-1].sum())
    same_count = [draw_mask(MaskConfig(kind="random", ratio=block_cfg.ratio), 14, rng) for _ in range(50)]
    assert neighbours(blocks) > neighbours(same_count) + 0.25
    # The same seed draws the same mask.
    assert np.array_equal(draw_mask(block_cfg, 14, np.random.default_rng(7)),
                          draw_mask(block_cfg, 14, np.random.default_rng(7)))


def test_mask_configs_that_cannot_work_say_why() -> None:
    from pipeline.masking import MaskConfig

    with pytest.raises(ValueError, match=r"ratio=1.0 must be a finite number in \(0, 1\)"):
        MaskConfig(kind="random", ratio=1.0)
    assert "no visible patch" in MaskConfig(kind="random", ratio=0.99, patch_size=16).problems(32)[0]
    assert "no block fits" in MaskConfig(kind="block", ratio=0.2, patch_size=16, min_block=16).problems(64)[0]
    assert MaskConfig(kind="random", ratio=0.75, patch_size=16).problems(224) == []


def test_mae_trains_on_an_unlabelled_dataset_through_the_real_loader(tmp_path) -> None:  # noqa: ANN001
    """write_shards --unlabelled -> the loader serves (images, -1, mask) -> the Trainer's MAE objective
    trains and evaluates; a supervised Experiment on the same dataset is refused before training."""
    import dataclasses

    from orchestration.experiment import apply_overrides, get_recipe
    from orchestration.experiment.validation import experiment_data_problems
    from orchestration.launch.build import build_loaders, build_model
    from pipeline import write_dataset
    from pipeline.demo_data import make_digits_folder
    from training import Trainer

    src = make_digits_folder(tmp_path / "src", image_size=16, limit=300)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted(src.rglob("*.jpg"))):
        (flat / f"{i:05d}.jpg").write_bytes(p.read_bytes())
    url = str(tmp_path / "ds")
    write_dataset(flat, url, val_fraction=0.2, samples_per_shard=100, unlabelled=True, progress=False)
    exp = apply_overrides(get_recipe("mae_vit_mu_digits"), [
        f"data.source.url={url}", "image_size=16", "resources.workers=1", "data.io.num_workers=0",
        "train.global_batch=32", "train.micro_batch=32", "train.schedule.total_steps=12", "train.schedule.warmup_steps=2",
        "train.eval_every=12", "train.checkpoint.every=0", "train.log_every=4"])
    assert experiment_data_problems(exp, url) == []
    loaders = build_loaders(exp, rank=0, world=1)
    assert loaders.num_classes == 0
    images, targets, mask = next(iter(loaders.train))
    assert images.shape == (32, 3, 16, 16) and (targets == -1).all()
    assert mask.shape == (32, 16) and mask.dtype == torch.bool and (mask.sum(1) == 12).all()
    trainer = Trainer(build_model(exp, loaders.num_classes), exp.train, loaders.train, eval_loader=loaders.eval,
                      console=False)
    out = trainer.fit()
    assert out["step"] == 12 and out["eval_samples"] == 60 and 0 < out["eval_loss"] < 5
    supervised = dataclasses.replace(get_recipe("vit_mu_smoke"), data=exp.data, image_size=16)
    problems = experiment_data_problems(supervised, url)
    assert any("has no labels" in p for p in problems), problems
