"""What an MAE encoder is for (#24): MAE's fine-tuning protocol chosen from the source's objective,
MAE's linear probe, reconstruction figures at every eval (and on the registered version), studies
over MAE runs, and the bad inputs refused before Ray: another patch size, a decoder too big for
the profile's GPU, a checkpoint of another objective.

Everything runs on a mu ViT at 32 px and a 200-image digits dataset; the MAE "export" is written
by the same ``training.export_weights(..., prefix="encoder.")`` call a run's export makes.
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

from model import VisionTransformer, create_model
from model.mae import MaskedAutoencoder, patchify
from orchestration.experiment import ConfigError, apply_overrides, get_recipe
from pipeline.masking import MaskConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_training_dist's in-memory loader
os.environ.setdefault("DS_ACCELERATOR", "cpu")
IMAGE = 32
DECODER = {"decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2, "decoder_mlp_dim": 64}  # mae_vit_mu_digits'


def _encoder(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return create_model("mu/4", num_classes=0, image_size=IMAGE, posemb="sincos2d")


def _mae(seed: int = 0, norm_pix_loss: bool = True) -> MaskedAutoencoder:
    from training.objectives import MAEConfig

    return MaskedAutoencoder(_encoder(seed), MAEConfig(**DECODER).decoder, norm_pix_loss=norm_pix_loss)


def _export(mae: MaskedAutoencoder, path: Path) -> Path:
    """What ``ray_train._export`` writes for an MAE run: the encoder alone, its config and objective."""
    from training.checkpoint import export_weights

    meta = {"vitscale.config": json.dumps(dataclasses.asdict(mae.encoder.cfg)), "vitscale.objective": "mae"}
    out = export_weights(mae, path, metadata=meta, prefix="encoder.")
    assert out is not None
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    """160 train / 40 val digits at 32 px, 10 classes."""
    from conftest import small_digits_dataset

    return small_digits_dataset(tmp_path_factory, IMAGE)


@pytest.fixture(scope="module")
def mae_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(_mae(), tmp_path_factory.mktemp("mae") / "model.safetensors")


@pytest.fixture(scope="module")
def supervised_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.weights import save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit") / "model.safetensors"
    save_weights(create_model("mu/4", num_classes=10, image_size=IMAGE), path)
    return path


def _dry_run(capsys: pytest.CaptureFixture[str], tmp: Path, source: Path | str, data: str, *extra: str,
             gpus: int = 1) -> tuple[int, dict[str, Any], str]:
    from orchestration import finetune

    rc = finetune.main(["--from", str(source), "--data", data, "--image-size", str(IMAGE), "--storage",
                        str(tmp / "runs"), "--tracking-uri", f"sqlite:///{tmp / 'none.db'}", "--gpus-per-worker",
                        str(gpus), *extra, "--dry-run"])
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if rc == 0 else {}), cap.err


# ------------------------------------------------------------------------------ fine-tuning
def test_an_mae_export_is_fine_tuned_with_maes_protocol(digits: str, mae_file: Path, supervised_file: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, exp, err = _dry_run(capsys, tmp_path, mae_file, digits)
    assert rc == 0, err
    assert "the mae fine-tuning protocol" in err and "vitscale.objective" in err
    # FINETUNE.md's ViT-B row (mu is below B), batch 1024, epochs of the 160 training images.
    epoch = 1  # round(160 / 1024) -> at least one step per epoch
    expected = {
        "model.pool": "avg", "model.drop_path": 0.1, "model.posemb": "sincos2d", "model.patch_size": 4,
        "train.global_batch": 1024, "train.optim.name": "adamw", "train.optim.lr": 5e-4 * 1024 / 256,
        "train.optim.betas": [0.9, 0.999], "train.optim.weight_decay": 0.05, "train.optim.layer_decay": 0.65,
        "train.optim.grad_clip": 0.0, "train.schedule.decay": "cosine", "train.schedule.min_lr": 1e-6,
        "train.schedule.warmup_steps": 5 * epoch, "train.schedule.total_steps": 100 * epoch,
        "train.objective.kind": "classification", "train.objective.label_smoothing": 0.1,
        "data.augment.randaugment": [2, 9], "data.augment.mixup_alpha": 0.8, "data.augment.cutmix_alpha": 1.0,
        "data.augment.crop_scale": [0.08, 1.0],
    }
    assert {k: exp[k] for k in expected} == expected
    assert exp["registered_model_name"] == "mae-vit-mu4-ft32"
    # On a CPU: the machine's size, with MAE's optimizer.
    rc, cpu, err = _dry_run(capsys, tmp_path, mae_file, digits, gpus=0)
    assert rc == 0, err
    assert (cpu["train.global_batch"], cpu["train.schedule.total_steps"], cpu["train.optim.lr"]) == (64, 300, 5e-4 / 4)
    # A supervised model gets the ViT paper's protocol; --protocol mae is allowed and says what it does.
    rc, vit, err = _dry_run(capsys, tmp_path, supervised_file, digits)
    assert rc == 0 and (vit["train.optim.name"], vit["model.pool"]) == ("sgd", "cls"), err
    rc, forced, err = _dry_run(capsys, tmp_path, supervised_file, digits, "--protocol", "mae")
    assert rc == 0 and (forced["model.pool"], forced["train.optim.layer_decay"]) == ("avg", 0.65), err
    assert "--protocol mae" in err and "pre-trained with classification" in err


def test_fine_tuning_at_another_patch_size_is_one_line_naming_both(digits: str, mae_file: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _dry_run(capsys, tmp_path, mae_file, digits, "--set", "model.patch_size=8")
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1, err
    assert "model.patch_size=8" in lines[0] and "patch size 4" in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing started


def test_staged_encoder_loads_into_the_mean_pooling_model_the_workers_build(tmp_path: Path) -> None:
    """main_finetune.py --global_pool: the encoder's final norm is dropped, fc_norm is new (1, 0), the
    head zero; the workers' strict load (build_model: ignore_head=True) takes the staged file."""
    from model.weights import load_weights
    from orchestration import finetune
    from orchestration.experiment.finetune_protocols import finetune_experiment

    src = _mae().encoder
    exp = finetune_experiment(src.cfg, image_size=IMAGE, source_recipe=None, dataset_name="digits",
                              source_model_name="mae-vit-mu4-digits", protocol="mae")
    url = finetune._stage_weights(src, str(tmp_path / "init" / "w.safetensors"), IMAGE, pool=exp.model.pool)
    worker = load_weights(VisionTransformer(exp.model_config(10)), url, ignore_head=True)
    assert torch.equal(worker.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert torch.equal(worker.fc_norm.weight, torch.ones(src.cfg.width)) and not list(worker.norm.parameters())
    assert worker.cfg.drop_path == 0.1 and not worker.head.weight.any()


# ------------------------------------------------------------------------------ linear probe
def test_mae_probe_standardises_as_batchnorm_in_eval_with_the_train_statistics() -> None:
    from orchestration.evaluation.linear import FeatureStandardiser

    g = torch.Generator().manual_seed(0)
    train = torch.randn(200, 16, generator=g) * torch.linspace(0.01, 5, 16) + torch.linspace(-3, 3, 16)
    test = torch.randn(50, 16, generator=g) * 2
    bn = torch.nn.BatchNorm1d(16, affine=False, eps=1e-6, momentum=1.0)  # main_linprobe.py's, one full batch
    bn.train()
    bn(train)
    bn.eval()
    ours = FeatureStandardiser.fit(train)(test)
    assert torch.allclose(ours, bn(test).double(), atol=1e-5)
    assert not torch.allclose(ours, (test.double() - train.double().mean(0)), atol=1e-2)  # it does scale


def test_fewshot_and_both_probes_run_on_an_mae_encoder(digits: str, mae_file: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from orchestration import evaluate
    from orchestration.evaluation.fewshot import pre_logits
    from orchestration.evaluation.linear import class_token
    from orchestration.tracking import load_model

    enc = load_model(str(mae_file))
    x = torch.randn(2, 3, IMAGE, IMAGE)
    assert enc.cfg.num_classes == 0 and torch.equal(class_token(enc, x), pre_logits(enc, x))
    base = ["--model", str(mae_file), "--data", f"digits={digits}", "--device", "cpu"]
    assert evaluate.main(["fewshot", *base, "--shots", "1,5"]) == 0
    assert evaluate.main(["linear", *base, "--protocol", "mae", "--out", str(Path(digits).parent / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "fewshot/digits/5shot" in out and "linear_probe/digits/full" in out
    rows = json.loads((Path(digits).parent / "r.json").read_text())["rows"]
    assert rows[0]["details"]["protocol"] == "mae"


# ------------------------------------------------------------------------------ reconstructions
def test_reconstruction_figure_has_three_panels_and_denormalised_pixels(tmp_path: Path) -> None:
    from orchestration.tracking.reconstruction_figures import (
        denormalise_prediction,
        fixed_masks,
        plot_reconstructions,
        reconstruction_figure,
        reconstruction_panels,
    )

    mae = _mae()
    images = torch.randn(3, 3, IMAGE, IMAGE)
    mask = MaskConfig(kind="random", ratio=0.75, patch_size=4)
    masks = fixed_masks(mask, 8, 3)
    assert torch.equal(masks, fixed_masks(mask, 8, 3)) and int(masks[0].sum()) == 48  # same at every eval
    # A perfect norm_pix prediction (the normalised target) is drawn as the original pixels.
    assert torch.allclose(denormalise_prediction(mae.target(images), images, 4), patchify(images, 4), atol=1e-4)
    panels = reconstruction_panels(mae, images, masks)  # (B, 3 panels, C, S, S)
    assert panels.shape == (3, 3, 3, IMAGE, IMAGE) and torch.equal(panels[:, 0], images)
    hidden = masks[0].view(8, 8).repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert not panels[0, 1][:, hidden].any() and torch.equal(panels[0, 1][:, ~hidden], images[0][:, ~hidden])
    _, pred = mae(images, masks)
    assert torch.allclose(panels[:, 2], torch.stack([p for p in _unpatch(denormalise_prediction(pred, images, 4))]))
    assert len(plot_reconstructions(panels, (0.5,) * 3, (0.5,) * 3).axes) == 9
    path = reconstruction_figure(mae, images, tmp_path / "r.png", mask=mask, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _unpatch(p: torch.Tensor) -> torch.Tensor:
    from model.mae import unpatchify

    return unpatchify(p, 4, 3)


def test_every_eval_logs_a_figure_and_the_version_names_the_last(tmp_path: Path, mae_file: Path,
                                                                 digits: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """MLflowSink.on_eval with the trained module (a MaskedAutoencoder) logs the reconstructions;
    the registered MAE encoder carries the objective (tag and file metadata) and names the last
    figure; fine-tuning it from the registry picks MAE's protocol by its tag."""
    import mlflow

    from model.weights import read_header
    from orchestration import finetune, tracking
    from orchestration.launch.pretrain_run import register_from_run
    from orchestration.launch.ray_train import EXPORT_KEY, probe_settings
    from pipeline.storage import open_storage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run("mae-use", run_name="mae", uri=uri)
    exp = apply_overrides(get_recipe("mae_vit_mu_digits"), [f"data.source.url={digits}"])
    probe = probe_settings(exp, {"probe_images": None})  # what rank 0 of an MAE run gives its sink
    assert probe["attention_images"].shape == (4, 3, IMAGE, IMAGE) and probe["probe_mask"].ratio == 0.75
    sink = tracking.MLflowSink(run_id, uri=uri, system_metrics=False, **probe)
    mae = _mae()
    for step in (5, 10):
        sink.on_eval(mae, step)
    files = [f.path for f in tracking.client(uri).list_artifacts(run_id, "reconstruction/step_0000010")]
    assert files == ["reconstruction/step_0000010/reconstruction.png"]
    run_dir = str(tmp_path / "run")
    open_storage(run_dir).upload_file(mae_file, EXPORT_KEY)
    version = register_from_run(exp, run_id=run_id, run_dir=run_dir, report={"step": 10}, lineage={}, uri=uri)
    mv = tracking.client(uri).get_model_version(exp.model_name, str(version))
    assert mv.tags["objective"] == "mae"
    assert mv.tags["reconstruction_figure"] == f"runs:/{run_id}/reconstruction/step_0000010/reconstruction.png"
    local = Path(tracking.client(uri).download_artifacts(run_id, "reconstruction/step_0000010", str(tmp_path)))
    assert (local / "reconstruction.png").stat().st_size > 0
    registered = tracking.resolve_model_source(f"models:/{exp.model_name}/{version}", uri)
    folder = mlflow.artifacts.download_artifacts(artifact_uri=registered["uri"], dst_path=str(tmp_path / "dl"),
                                                 tracking_uri=uri)
    (weights,) = Path(folder).rglob("model.safetensors")  # the pyfunc's artifacts/ folder
    assert read_header(weights)[1]["vitscale.objective"] == "mae"
    rc = finetune.main(["--from", registered["uri"], "--data", digits, "--image-size", str(IMAGE), "--storage",
                        str(tmp_path / "runs"), "--tracking-uri", uri, "--gpus-per-worker", "0", "--dry-run"])
    cap = capsys.readouterr()
    assert rc == 0 and json.loads(cap.out)["model.pool"] == "avg" and "its objective tag" in cap.err, cap.err


# ------------------------------------------------------------------------------ studies
def test_an_mae_study_fits_eval_loss_and_refuses_eval_error(digits: str, tmp_path: Path) -> None:
    from model.flops import mae_macs_per_image
    from orchestration import sweep
    from orchestration.studies.points import make_point
    from orchestration.studies.spec import trial_experiment
    from orchestration.studies.table import points_from_table, points_table
    from orchestration.studies.trial import _trial_sink

    argv = ["--recipe", "mae_vit_mu_digits", "--variants", "mu", "--steps", "20", "--data", digits,
            "--storage", str(tmp_path / "studies"), "--gpus-per-trial", "0", "--no-tracking"]
    spec, problems = sweep.check_study(sweep.build_parser().parse_args(argv))
    assert spec is not None and spec.metric == "eval_loss" and not problems, problems  # the default for MAE
    with pytest.raises(ValueError, match=r"metric 'eval_error'.*eval_loss"):
        sweep.spec_from_args(sweep.build_parser().parse_args([*argv, "--metric", "eval_error"]))
    fewshot = [*argv, "--fewshot-data", f"digits={digits}", "--set", "eval.fewshot_shots=1,5", "--metric",
               "fewshot/digits/5shot"]
    spec, problems = sweep.check_study(sweep.build_parser().parse_args(fewshot))
    assert spec is not None and not problems, problems
    # A trial's points count MAE's compute (a quarter of the patches through the encoder).
    exp = trial_experiment(spec, variant="mu", steps=20, samples=None, seed=0)
    model = create_model("mu/4", num_classes=0, image_size=IMAGE, posemb="sincos2d")
    sink, _ = _trial_sink(spec, exp, model, key="k", variant="mu", steps=20, samples=None, seed=0,
                          study_run_id=None, report=lambda _: None, points_dir=None)
    assert sink.flops_per_image == 6.0 * mae_macs_per_image(model.cfg, 32, 1, 64, 16)
    # Its points have eval_loss and no eval_error: a table of them fits the one and names it for the other.
    rows = [make_point(sink.info, step=s, global_batch=64, flops_per_image=1e6, eval_metrics={"eval_loss": 1 / s})
            for s in (5, 10, 20)]
    assert list(points_from_table(points_table(rows), "eval_loss").error) == [0.2, 0.1, 0.05]
    with pytest.raises(ValueError, match=r"'eval_error' has no value.*\['eval_loss'\]"):
        points_from_table(points_table(rows), "eval_error")


# ------------------------------------------------------------------------------ bad input
def test_a_decoder_too_big_for_the_profiles_gpu_is_refused_before_ray() -> None:
    from orchestration.experiment.checks import mae_decoder_params

    base = get_recipe("mae_vit_mu_digits")
    exact = sum(p.numel() for n, p in _mae().named_parameters() if not n.startswith("encoder."))
    assert mae_decoder_params(base) == exact  # the estimate's parameter count is the decoder's
    huge = ["train.objective.decoder_width=4096", "train.objective.decoder_depth=8",
            "train.objective.decoder_heads=16", "train.objective.decoder_mlp_dim=16384"]
    with pytest.raises(ConfigError) as e:
        apply_overrides(base, [*huge, "train.profile=t4"])
    assert len(e.value.problems) == 1
    assert "decoder_width=4096" in e.value.problems[0] and "t4 profile's 16 GB" in e.value.problems[0]
    apply_overrides(base, [*huge, "train.profile=cpu"])  # host memory: not checked
    for name in ("mae_vit_b16_i21k", "mae_vit_l16_i21k", "mae_vit_h14_i21k"):  # MAE's own decoders fit
        apply_overrides(get_recipe(name), ["train.profile=t4"])


def test_a_checkpoint_of_another_objective_cannot_resume_an_mae_run(tmp_path: Path) -> None:
    """A supervised run's checkpoint has no decoder: resuming an MAE run from it is refused, naming
    both objectives and what to do instead, before DeepSpeed loads anything."""
    from test_training_dist import ListSink, MemLoader

    from training import TrainConfig, Trainer
    from training.config import CheckpointConfig, EngineConfig, OptimConfig, ScheduleConfig
    from training.objectives import MAEConfig

    cfg = TrainConfig(global_batch=4, micro_batch=4, log_every=1, profile="cpu", optim=OptimConfig(lr=1e-3),
                      schedule=ScheduleConfig(warmup_steps=1, total_steps=2), engine=EngineConfig(zero_stage=1),
                      checkpoint=CheckpointConfig(every=2))
    torch.manual_seed(0)
    supervised = create_model("mu/4", num_classes=10, image_size=IMAGE, posemb="sincos2d")
    Trainer(supervised, cfg, MemLoader(0, 1, micro=4), sink=ListSink(), checkpoint_dir=str(tmp_path)).fit()
    mae = Trainer(_encoder(), dataclasses.replace(cfg, objective=MAEConfig(**DECODER)), MemLoader(0, 1, micro=4), sink=ListSink(),
                  checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError) as e:
        mae.restore("auto")
    assert ("objective: classification -> mae: a checkpoint of another objective cannot resume this run; start a "
            "new run, or fine-tune from its exported weights") in str(e.value)
