"""BEiT pre-training and fine-tuning (#26, the second stage): the masked forward around timm's BEiT,
the MIM loss against a frozen tokenizer, ZeRO 1 vs 2 processes and kill + resume, the bad inputs
refused before Ray, a run through the real loader and the Trainer, and the fine-tune at a higher
resolution (relative position bias tables resized, layer-wise lr decay).

The tokenizer is a seeded, randomly initialised ``model.tokenizer.DiscreteVAE`` saved as a run's
export would be (a ``.safetensors`` file carrying its config): the mechanics do not need a trained
one. Whether BEiT learns something real is the lead's test after both stages merge.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_training_dist's workers and shared check
os.environ.setdefault("DS_ACCELERATOR", "cpu")
IMAGE = 16  # beit_mu_digits: 4 x 4 patches of 4 px


def _backbone(image_size: int = IMAGE, seed: int = 0) -> torch.nn.Module:
    from model import TimmSpec, build_network

    torch.manual_seed(seed)
    spec = TimmSpec(name="beit_base_patch16_224", patch_size=4, embed_dim=(32,), depths=(2,), num_heads=(2,))
    return build_network(spec.config(num_classes=0, image_size=image_size))


def _tokenizer(vocab: int = 32, patch: int = 4, image: int = IMAGE) -> torch.nn.Module:
    from model.tokenizer import DiscreteVAE, DVAEConfig

    torch.manual_seed(3)
    return DiscreteVAE(DVAEConfig(vocab_size=vocab, patch_size=patch, image_size=image, hidden=8, embed_dim=8))


def _save(model: torch.nn.Module, path: Path) -> str:
    from model.weights import save_weights

    save_weights(model, path)
    return str(path)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    """160 train / 40 val digits, 10 classes."""
    from conftest import small_digits_dataset

    return small_digits_dataset(tmp_path_factory, IMAGE)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tokenizer files: the recipe's fit, and one of each misfit."""
    tmp = tmp_path_factory.mktemp("tokenizers")
    from model import create_model

    return {
        "ok": _save(_tokenizer(), tmp / "ok.safetensors"),
        "patch": _save(_tokenizer(patch=8), tmp / "patch8.safetensors"),
        "size": _save(_tokenizer(image=32), tmp / "size32.safetensors"),
        "vocab": _save(_tokenizer(vocab=64), tmp / "vocab64.safetensors"),
        "vit": _save(create_model("mu/4", num_classes=10, image_size=IMAGE), tmp / "vit.safetensors"),
    }


# ----------------------------------------------------------------------------- the network and the loss
def test_masked_patches_are_hidden_and_the_unmasked_forward_is_timms() -> None:
    """With no mask the trunk is timm's own forward_features (the wrapper runs timm's modules); the
    pixels of a masked patch change nothing at all (its embedding is replaced), a visible one's do."""
    from model.beit import MaskedImageModel

    mim = MaskedImageModel(_backbone(), vocab_size=64).eval()
    x = torch.randn(2, 3, IMAGE, IMAGE)
    none = torch.zeros(2, 16, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(mim.forward_features(x, none), mim.norm(mim.encoder.forward_features(x)))
        mask = none.clone()
        mask[:, [0, 1, 4, 5, 6]] = True  # patch 0 is the top-left 4x4 pixels
        base = mim(x, mask)
        hidden, shown = x.clone(), x.clone()
        hidden[:, :, :4, :4] += 5.0
        shown[:, :, 12:, 12:] += 5.0  # patch 15: visible
        torch.testing.assert_close(mim(hidden, mask), base, rtol=0, atol=0)
        assert not torch.allclose(mim(shown, mask), base)
    assert base.shape == (2, 5, 64)
    assert not mim.encoder.fc_norm.weight.requires_grad  # the fine-tuning pooling norm: no gradient here


def test_loss_is_cross_entropy_on_masked_positions_against_the_frozen_tokenizer() -> None:
    """The objective's loss is CE of the MIM logits at the masked positions against the tokenizer's
    tokens there (reference computed by hand); the tokenizer gets no gradient; accuracy sums add up."""
    import torch.nn.functional as F

    from model.beit import masked_positions
    from training.objectives import BEiTConfig, objective_for

    tok = _tokenizer()
    obj = objective_for(BEiTConfig(mask_ratio=0.4, vocab_size=32, tokenizer="t"), teacher=tok)
    mim = obj.wrap(_backbone())
    x = torch.randn(3, 3, IMAGE, IMAGE)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, :7], mask[1, 3:10], mask[2, 9:] = True, True, True
    loss = obj.loss(mim, (x, torch.zeros(3), mask))
    loss.backward()
    pos = masked_positions(mask)
    ref = F.cross_entropy(mim(x, mask).reshape(-1, 32), tok.tokenize(x).gather(1, pos).reshape(-1))
    torch.testing.assert_close(loss, ref)
    assert all(p.grad is None for p in tok.parameters()) and mim.lm_head.weight.grad is not None
    sums = obj.train_sums()
    assert sums is not None and sums[1].item() == 21 and 0 <= sums[0].item() <= 21
    assert obj.train_sums() is None  # reset by the read: one log window each
    with pytest.raises(ValueError, match="same number of patches"):
        masked_positions(torch.tensor([[True, False], [True, True]]))


# ----------------------------------------------------------------------------- ZeRO, 1 vs 2 processes, resume
@pytest.fixture(scope="module")
def beit_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_training_dist's "beit" scenario on 1 and 2 processes (ZeRO stages BEIT_STAGES)."""
    from test_training_dist import _spawn, _tail, _wait

    out = tmp_path_factory.mktemp("beit_dist")
    logs = {w: out / f"beit{w}.log" for w in (1, 2)}
    procs = {w: _spawn("beit", out, w, logs[w]) for w in (2, 1)}
    for w, ps in procs.items():
        codes = _wait(ps, logs[w])
        assert codes == [0] * w, "\n".join(_tail(logs[w], r) for r in range(w))
    return out


@pytest.mark.integration
@pytest.mark.parametrize("stage", [1, 3])
def test_beit_two_ranks_match_one_rank_and_resume_exactly(beit_runs: Path, stage: int) -> None:
    """BEiT under ZeRO-1 and ZeRO-3: 2 ranks == 1 rank x accumulation 2 (same block masks, the same
    tokenizer on every rank) to fp32 round-off, a resumed run is the straight one loss for loss,
    the checkpointed module holds no tokenizer tensor, and masked-token accuracy is logged."""
    from test_training_dist import BEIT_STAGES, TOTAL, _ranks_agree_and_resume_exactly

    assert stage in BEIT_STAGES
    w1 = _ranks_agree_and_resume_exactly(beit_runs, "beit", stage)
    assert {"mask_token", "lm_head.weight", "norm.weight"} <= set(w1)
    assert all(k.startswith(("encoder.", "mask_token", "lm_head.", "norm.")) for k in w1), sorted(w1)
    for world in (1, 2):
        acc = json.loads((beit_runs / f"beit_w{world}.json").read_text())[str(stage)]["mim_acc"]
        assert len(acc) == TOTAL and all(0 <= a <= 1 for a in acc) and max(acc) > 0


# ----------------------------------------------------------------------------- bad input, before Ray
def _check(digits: str, tmp: Path, *sets: str) -> tuple[int, str, str]:
    """pretrain.py --dry-run of beit_mu_digits with ``--set``s: (exit status, stdout, stderr)."""
    import contextlib
    import io

    from orchestration import pretrain

    out, err = io.StringIO(), io.StringIO()
    argv = ["--recipe", "beit_mu_digits", "--data", digits, "--dry-run", "--storage", str(tmp / "runs"),
            "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    for s in sets:
        argv += ["--set", s]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = pretrain.main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_bad_tokenizers_and_masks_are_refused_before_ray(digits: str, tokenizers: dict[str, str],
                                                         tmp_path: Path) -> None:
    """pretrain.py refuses, one line each and exit 2: a tokenizer of another patch size, image size or
    vocabulary, a model that is not a tokenizer (named), a pickle, a mask ratio that leaves no
    block, and a student that is not timm's BEiT. The fitting tokenizer passes."""
    key = "train.objective.tokenizer="
    rc, out, err = _check(digits, tmp_path, key + tokenizers["ok"])
    assert rc == 0, err
    resolved = json.loads(out[out.index("{"):])
    assert resolved["data.mask.kind"] == "block" and resolved["data.mask.min_block"] == 4
    cases = {
        "patch": "one token per 8x8 patch, the student's patches are 4x4",
        "size": "trained on 32x32 images, the student sees 16x16",
        "vocab": "vocabulary has 64 tokens, the MIM head predicts 32: set train.objective.vocab_size=64",
        "vit": "is a ViT classifier (10 classes), not an image tokenizer",
    }
    for name, words in cases.items():
        rc, _, err = _check(digits, tmp_path, key + tokenizers[name])
        assert rc == 2 and "error: train.objective.tokenizer:" in err and words in err, (name, err)
    torch.save(_tokenizer().state_dict(), tmp_path / "tok.pt")
    rc, _, err = _check(digits, tmp_path, key + str(tmp_path / "tok.pt"))
    assert rc == 2 and "never unpickles" in err, err
    rc, _, err = _check(digits, tmp_path, key + tokenizers["ok"], "train.objective.mask_ratio=0.1")
    assert rc == 2 and "train.objective.mask_ratio=0.1" in err and "no block fits" in err, err
    from orchestration.experiment import experiment_problems, get_recipe
    from orchestration.experiment.recipes import vit_mu_smoke

    exp = get_recipe("beit_mu_digits")
    vit = dataclasses.replace(exp, model=vit_mu_smoke().model, image_size=32)
    assert any("pre-trains timm's BEiT backbone" in p for p in experiment_problems(vit))


def test_a_checkpoint_with_another_vocabulary_cannot_resume(tmp_path: Path) -> None:
    """The MIM head's vocabulary is part of the checkpoint's config: a resume with another is refused
    naming it (the head's shape could not load anyway)."""
    from orchestration.experiment import get_recipe
    from training.checkpoint.manager import resume_refusal

    train = get_recipe("beit_mu_digits").train
    other = train.replace(**{"objective.vocab_size": 128})
    why = resume_refusal(tmp_path / "step100", train.to_dict(), other)
    assert "objective.vocab_size" in why and "32" in why and "128" in why, why


def test_a_registered_tokenizer_is_pinned_to_its_version(digits: str, tmp_path: Path) -> None:
    """models:/NAME@ALIAS is resolved once on the driver to models:/NAME/VERSION (every rank and every
    restart tokenizes with the same version)."""
    from orchestration import tracking
    from orchestration.tracking.registry import register_model_dir, write_model_dir

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run("tokenizers", run_name="dvae", uri=uri)
    # the registry's plain layout (model.safetensors + config.json): what a tokenizer run registers
    # (its serving spec is the tokenizer stage's business, not BEiT's)
    register_model_dir(write_model_dir(_tokenizer(), tmp_path / "tok"), run_id=run_id, name="dvae-v32p4-digits",
                       tags={}, uri=uri)
    tracking.client(uri).set_registered_model_alias("dvae-v32p4-digits", "champion", "1")
    rc, out, err = _check(digits, tmp_path, "train.objective.tokenizer=models:/dvae-v32p4-digits@champion")
    assert rc == 0, err
    assert json.loads(out[out.index("{"):])["train.objective.tokenizer"] == "models:/dvae-v32p4-digits/1"


# ----------------------------------------------------------------------------- a run, then the fine-tune
def test_pretrain_through_the_loader_then_finetune_at_a_higher_resolution(digits: str, tokenizers: dict[str, str],
                                                                         tmp_path: Path) -> None:
    """beit_mu_digits through build_run (the loader's block masks, the tokenizer loaded by URI on the
    rank, masked-token accuracy in training and eval), its backbone exported as a run exports it;
    finetune.py picks BEiT's protocol for it (layer decay 0.65, mean pooling) and the staged weights
    at 32 px have the relative position bias tables of an 8 x 8 grid; two fine-tuning steps run."""
    from orchestration import finetune
    from orchestration.experiment import apply_overrides, get_recipe
    from orchestration.launch.build import build_model, build_run
    from training.checkpoint import export_weights

    exp = apply_overrides(get_recipe("beit_mu_digits"), [
        f"train.objective.tokenizer={tokenizers['ok']}", f"data.source.url={digits}", "resources.workers=1",
        "train.global_batch=16", "train.micro_batch=16", "train.schedule.total_steps=4",
        "train.schedule.warmup_steps=1", "train.log_every=2", "train.eval_every=4", "data.io.num_workers=0"])
    sinks: list[Any] = []

    def make_sink(model: torch.nn.Module) -> Any:
        from test_training_dist import ListSink

        sinks.append(ListSink())
        return sinks[-1]

    trainer, _ = build_run(exp, rank=0, world=1, checkpoint_url=str(tmp_path / "ck"), checkpoint_key="beit",
                           make_sink=make_sink)
    result = trainer.fit()
    assert 0 <= result["eval_mim_acc"] <= 1 and result["eval_loss"] > 0
    assert [s for s, m in sinks[0].metrics if "mim_acc" in m] == [2, 4]
    exported = trainer.objective.exported(trainer.model)
    meta = {"vitscale.config": json.dumps(dataclasses.asdict(exported.cfg)), "vitscale.objective": "beit"}
    src = export_weights(trainer.engine, tmp_path / "beit.safetensors", metadata=meta, prefix="encoder.")
    assert src is not None
    del trainer

    rc = finetune.main(["--from", str(src), "--data", digits, "--image-size", "32", "--dry-run",
                        "--storage", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert rc == 0
    ft = finetune.finetune_experiment(exported.cfg, image_size=32, source_recipe="beit_mu_digits",
                                      dataset_name="digits", source_model_name="beit-mu-digits", protocol="beit")
    assert finetune.choose_protocol("auto", "beit") == "beit"
    assert ft.train.optim.layer_decay == 0.65 and ft.model.drop_path == 0.1 and ft.image_size == 32
    from model import load_network_weights
    from orchestration.tracking import model_from_path

    source = model_from_path(Path(src), str(src))
    staged = finetune._stage_weights(source, str(tmp_path / "stage" / "init.safetensors"), 32, spec=ft.model)
    ft = apply_overrides(ft, [f"data.source.url={digits}", "train.global_batch=8", "train.micro_batch=8",
                              "train.schedule.total_steps=2", "train.schedule.warmup_steps=1", "train.eval_every=0",
                              "data.io.num_workers=0", "eval.split=none"])
    model = build_model(ft, 10, init_weights=staged)
    table = "blocks.0.attn.relative_position_bias_table"
    assert source.state_dict()[table].shape[0] == 7 * 7 + 3 and model.state_dict()[table].shape[0] == 15 * 15 + 3
    torch.testing.assert_close(model.state_dict()["blocks.1.mlp.fc1.weight"], source.state_dict()["blocks.1.mlp.fc1.weight"])
    load_network_weights(model, staged, ignore_head=True)  # the same check the workers make
    trainer, _ = build_run(ft, rank=0, world=1, checkpoint_url=str(tmp_path / "ck_ft"), checkpoint_key="ft",
                           init_weights=staged)
    scales = sorted({g.get("lr_scale", 1.0) for g in trainer.optimizer.param_groups})
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.65 ** 3)  # stem, 2 blocks, head
    res = trainer.fit()
    assert res["step"] == 2 and res["loss"] == res["loss"]


def test_colour_jitter_is_seeded_per_sample() -> None:
    """BEiT's ColorJitter(0.4, 0.4, 0.4) (AugmentConfig.color_jitter): it changes the pixels, the same
    way for the same sample seed (a resume replays nothing), differently for another."""
    import numpy as np

    from pipeline.transforms import make_randaugment, sample_transform

    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    jitter = make_randaugment(None, 0.4)
    assert make_randaugment(None, 0.0) is None
    a, b, c = (sample_transform(img, jitter, seed) for seed in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, torch.from_numpy(img).permute(2, 0, 1))
