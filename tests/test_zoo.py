"""timm's zoo through our pipeline (#25): DeiT, Swin, PVT-v2, CaiT, BEiT and convnet teachers.

Parity: a network built by our pipeline (``TimmSpec`` -> ``TimmConfig`` -> ``build_network``) from a
timm state dict gives timm's own model's logits on held-out digits; the registry round trip keeps
them. Then what our ViT gets must hold for them too: FLOPs from one generic counter (equal to our
analytic ViT formula where both apply), another resolution at fine-tuning (timm's own resizing),
pooled pre-logits, attention maps for the class-token architectures, layer-wise lr decay by timm's
group matcher, and every bad input refused with a line that names the fix, before Ray.

Tiny sizes (32 px, widths of 16-32) keep the whole module to seconds per test.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from model import TimmConfig, TimmSpec, build_network, load_network_weights, macs_per_image
from model.zoo import FAMILIES

IMAGE = 32
CLASSES = 10

# Our spec of each architecture and the same network in timm's own keyword arguments (written out
# here, independently of model.zoo's mapping, so a wrong mapping fails the parity test).
ARCHS: dict[str, tuple[TimmSpec, dict[str, Any]]] = {
    "deit": (TimmSpec(name="deit_tiny_patch16_224", patch_size=4, embed_dim=(32,), depths=(2,), num_heads=(2,)),
             dict(img_size=IMAGE, patch_size=4, embed_dim=32, depth=2, num_heads=2)),
    "swin": (TimmSpec(name="swin_tiny_patch4_window7_224", patch_size=2, embed_dim=(16,), depths=(1, 1),
                      num_heads=(1, 2), window_size=4),
             dict(img_size=IMAGE, patch_size=2, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)),
    "pvt_v2": (TimmSpec(name="pvt_v2_b0", embed_dim=(16, 32), depths=(1, 1), num_heads=(1, 2), sr_ratios=(4, 1),
                        mlp_ratio=4.0),
               dict(embed_dims=(16, 32), depths=(1, 1), num_heads=(1, 2), sr_ratios=(4, 1), mlp_ratios=(4.0, 4.0))),
    "cait": (TimmSpec(name="cait_xxs24_224", patch_size=4, embed_dim=(32,), depths=(2,), num_heads=(2,),
                      class_depth=1),
             dict(img_size=IMAGE, patch_size=4, embed_dim=32, depth=2, num_heads=2, depth_token_only=1)),
    "beit": (TimmSpec(name="beit_base_patch16_224", patch_size=4, embed_dim=(32,), depths=(2,), num_heads=(2,)),
             dict(img_size=IMAGE, patch_size=4, embed_dim=32, depth=2, num_heads=2)),
    "resnet": (TimmSpec(name="resnet18", depths=(1, 1, 1, 1)), dict(layers=(1, 1, 1, 1))),
    "regnet": (TimmSpec(name="regnety_002"), {}),
}


def _cfg(arch: str, image_size: int = IMAGE, **fields: Any) -> TimmConfig:
    spec = ARCHS[arch][0]
    if fields:
        spec = TimmSpec.of(spec.config(num_classes=CLASSES, image_size=image_size), **fields)
    return spec.config(num_classes=CLASSES, image_size=image_size)


def _timm_reference(arch: str, seed: int = 0) -> torch.nn.Module:
    import timm

    spec, kwargs = ARCHS[arch]
    torch.manual_seed(seed)
    return timm.create_model(spec.name, pretrained=False, num_classes=CLASSES, drop_rate=0.0, drop_path_rate=0.0,
                             **kwargs).eval()


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    """16 real digits the networks never saw (scikit-learn's last ones), 3 channels at 32 px, normalised."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[-16:], dtype=torch.float32)[:, None] / 16.0  # (16, 1, 8, 8)
    x = torch.nn.functional.interpolate(x, size=(IMAGE, IMAGE), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_pipeline_network_from_a_timm_state_dict_gives_timms_logits(arch: str, held_out: torch.Tensor,
                                                                    tmp_path: Path) -> None:
    """Parity (#25): timm's own model -> its state dict as safetensors -> our spec, build and loader
    (another seed, so nothing is shared but the file) -> the same logits, max abs diff <= 1e-5; and
    again after the registry's write/read (config.json names the timm model and version)."""
    import timm
    from safetensors.torch import save_file

    from orchestration.tracking.registry import model_from_path, write_model_dir

    ref = _timm_reference(arch)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    torch.manual_seed(123)
    ours = build_network(_cfg(arch))
    assert any(not torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values(),
                                                      strict=True) if a.is_floating_point())
    load_network_weights(ours, tmp_path / "timm.safetensors").eval()
    with torch.no_grad():
        want = ref(held_out)
        got = ours(held_out)
    assert (got - want).abs().max().item() <= 1e-5
    folder = write_model_dir(ours, tmp_path / "registered")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["kind"] == "timm" and cfg["name"] == ARCHS[arch][0].name and cfg["timm_version"] == timm.__version__
    back = model_from_path(folder, "test").eval()
    with torch.no_grad():
        assert (back(held_out) - want).abs().max().item() <= 1e-5


def test_counted_flops_equal_the_analytic_vit_formula_and_every_architecture_has_them() -> None:
    """One generic counter (FlopCounterMode on the meta device): our ViT counted == its analytic
    formula; timm's DeiT-Ti == the formula of the same ViT-Ti/16 (within 0.1%); every architecture
    gets MFU's FLOPs, and timm's published GMACs come out for the paper sizes."""
    from model import count_forward_macs, create_model, train_flops_per_image
    from model.vit import vit_config
    from training.objectives import ClassificationConfig, objective_for

    vit = vit_config("Ti/16", num_classes=1000, image_size=224)
    assert count_forward_macs(lambda: create_model("Ti/16", num_classes=1000, image_size=224), 3, 224) == \
        macs_per_image(vit)
    deit = TimmSpec(name="deit_tiny_patch16_224").config(num_classes=1000, image_size=224)
    assert abs(macs_per_image(deit) / macs_per_image(vit) - 1) < 1e-3
    swin = TimmSpec(name="swin_tiny_patch4_window7_224").config(num_classes=1000, image_size=224)
    assert macs_per_image(swin) / 1e9 == pytest.approx(4.51, rel=0.01)  # timm's table: 4.51 GMACs
    for arch in ARCHS:
        cfg = _cfg(arch)
        assert train_flops_per_image(cfg) == 6.0 * macs_per_image(cfg) > 0
        flops = objective_for(ClassificationConfig()).flops_per_image(build_network(cfg))  # the Trainer's MFU
        assert flops == train_flops_per_image(cfg)


def test_unknown_names_tags_hub_names_and_unsupported_families_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="did you mean swin_tiny_patch4_window7_224"):
        TimmSpec(name="swin_tiny_patch4_windw7_224")
    with pytest.raises(ValueError, match="pretrained-weights tag.*name='vit_base_patch16_224'"):
        TimmSpec(name="vit_base_patch16_224.augreg_in21k")
    with pytest.raises(ValueError, match="hub name; vitscale never downloads"):
        TimmSpec(name="hf-hub:timm/vit_base_patch16_224")
    with pytest.raises(ValueError, match="convnext family, which vitscale does not drive.*Swin"):
        TimmSpec(name="convnext_tiny")
    with pytest.raises(ValueError, match="cait_xxs24_224 is a CaiT .* takes no window_size"):
        TimmSpec(name="cait_xxs24_224", window_size=4)
    with pytest.raises(ValueError, match="one value for embed_dim"):
        TimmSpec(name="swin_tiny_patch4_window7_224", embed_dim=(16, 32))
    with pytest.raises(ValueError, match="same number of stages"):
        TimmSpec(name="pvt_v2_b0", depths=(1, 1), num_heads=(1, 2, 4))


def test_an_image_size_the_architecture_cannot_take_is_refused_before_ray() -> None:
    """Non-overlapping patches need a multiple of the patch size (timm would crop silently); PVT-v2's
    spatial-reduction convolutions need enough pixels; the experiment's launch checks say so."""
    from dataclasses import replace

    from orchestration.experiment import ConfigError, get_recipe
    from orchestration.experiment.checks import experiment_problems, validate

    with pytest.raises(ValueError, match="image_size 30 is not divisible by deit_tiny_patch16_224's patch size 4.*"
                                         "use image_size=28 or 32"):
        ARCHS["deit"][0].config(num_classes=CLASSES, image_size=30)
    with pytest.raises(ValueError, match="pvt_v2_b0 .* cannot take image_size 16"):
        TimmSpec(name="pvt_v2_b0").config(num_classes=CLASSES, image_size=16)
    exp = replace(get_recipe("swin_digits"), image_size=31)  # patches of 2 px
    problems = experiment_problems(exp)
    assert len(problems) == 1 and problems[0].startswith("model: image_size 31 is not divisible"), problems
    with pytest.raises(ConfigError, match="not divisible"):
        validate(exp)


def test_networks_are_built_without_any_network_access(monkeypatch: pytest.MonkeyPatch) -> None:
    """pretrained=False always: every family's paper-size model builds with the hub offline and every
    socket connection failing."""
    from model import create_timm_model

    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a network connection was attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for fam in FAMILIES:
        cfg = TimmSpec(name=fam.example).config(num_classes=CLASSES, image_size=224)
        with torch.device("meta"):
            assert create_timm_model(cfg).cfg is cfg


@pytest.mark.parametrize("arch", ["deit", "swin", "beit", "cait"])
def test_another_resolution_resizes_like_timm_and_only_when_asked(arch: str, tmp_path: Path) -> None:
    """A 32 px checkpoint into a 48 px network: refused without allow_resample; with it, position
    embeddings and relative position bias tables are resized, for DeiT, Swin and BEiT exactly as
    timm's own checkpoint_filter_fn does (a Swin also to another window size)."""
    import importlib

    from model.weights import save_weights

    src = build_network(_cfg(arch))
    save_weights(src, tmp_path / "w.safetensors")
    fields = {"window_size": 6} if arch == "swin" else {}
    big = _cfg(arch, 48, **fields)
    with pytest.raises(ValueError, match="allow_resample=True"):
        load_network_weights(build_network(big), tmp_path / "w.safetensors")
    ours = load_network_weights(build_network(big), tmp_path / "w.safetensors", allow_resample=True).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        out = ours(x)
    assert out.shape == (2, CLASSES) and torch.isfinite(out).all()
    module = {"deit": "vision_transformer", "swin": "swin_transformer", "beit": "beit"}.get(arch)
    if module is None:  # CaiT's filter does not resize: the grid was resampled by ours (no prefix rows)
        assert ours.pos_embed.shape == (1, 144, 32)
        return
    ref = build_network(big)
    filtered = importlib.import_module(f"timm.models.{module}").checkpoint_filter_fn(src.state_dict(), ref)
    ref.load_state_dict(filtered, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref.eval()(x), rtol=0, atol=1e-5)


def test_a_registered_file_of_another_architecture_is_refused_from_its_header(tmp_path: Path) -> None:
    from model.network import check_network_file
    from model.weights import save_weights

    save_weights(build_network(_cfg("swin")), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="do not match the config.*build the architecture the checkpoint came from"):
        check_network_file(tmp_path / "w.safetensors", _cfg("deit"))
    other = _cfg("swin", depths=(1, 2))
    with pytest.raises(ValueError, match="missing"):
        check_network_file(tmp_path / "w.safetensors", other)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_pooled_pre_logits_feed_fewshot_and_linear_probes(arch: str) -> None:
    from orchestration.evaluation.fewshot import model_image_size, pre_logits
    from orchestration.evaluation.linear import class_token

    m = build_network(_cfg(arch)).eval()
    x = torch.randn(3, 3, IMAGE, IMAGE)
    with torch.no_grad():
        feats = pre_logits(m, x)
        assert feats.shape == (3, m.num_features)
        assert torch.equal(m.get_classifier()(feats) if arch != "swin" else m.head.fc(feats), m(x))
        assert class_token(m, x).shape == (3, m.num_features)
    assert model_image_size(m) == IMAGE


@pytest.mark.parametrize("arch", ["deit", "cait", "beit"])
def test_attention_maps_and_rollout_of_the_class_token_architectures(arch: str, tmp_path: Path) -> None:
    """DeiT and BEiT: every block's self-attention; CaiT: its class-attention layers. The logits are
    the fused path's, the maps are probabilities, the fused kernels are switched back on."""
    from model.attention import forward_with_attention
    from orchestration.tracking.attention_figures import attention_figures, compute_attention

    m = build_network(_cfg(arch)).eval()
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        want = m(x)
    logits, attns = forward_with_attention(m, x)
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
    assert len(attns) == (1 if arch == "cait" else 2) and all(a.shape[-1] == 1 + 64 for a in attns)
    assert all(a.fused_attn for a in (b.attn for b in m.blocks) if hasattr(a, "fused_attn"))
    out = compute_attention(m, x)
    assert out["cls"].shape[-2:] == (8, 8) and out["rollout"].shape == (2, 8, 8)
    assert len(attention_figures(m, x, tmp_path)) == 2


def test_attention_maps_are_refused_for_architectures_without_a_class_token() -> None:
    from model.attention import forward_with_attention

    with pytest.raises(ValueError, match="need a global class token; swin_tiny_patch4_window7_224"):
        forward_with_attention(build_network(_cfg("swin")), torch.randn(1, 3, IMAGE, IMAGE))


def test_layer_decay_follows_timms_group_matcher_and_refuses_what_it_cannot_map() -> None:
    """Swin's and CaiT's parameters get timm's own layer-decay scales (param_groups_layer_decay), not
    ViT-name guesses; a network that neither ViT naming nor a group matcher maps is refused."""
    from timm.optim import param_groups_layer_decay

    from training.optim import param_groups

    for arch in ("swin", "cait", "pvt_v2"):
        m = build_network(_cfg(arch))
        ours = {id(p): g["lr_scale"] for g in param_groups(m, 0.05, layer_decay=0.5) for p in g["params"]}
        theirs = {id(p): g["lr_scale"] for g in param_groups_layer_decay(m, 0.05, layer_decay=0.5)
                  for p in g["params"]}
        assert ours == theirs and len(set(ours.values())) > 2
    cait = build_network(_cfg("cait"))
    scales = {n: s for g in param_groups(cait, 0.05, layer_decay=0.5) for n, p in cait.named_parameters()
              for s in [g["lr_scale"]] if any(p is q for q in g["params"])}
    assert scales["blocks_token_only.0.attn.q.weight"] < scales["head.weight"] == 1.0
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    with pytest.raises(ValueError, match="has neither: set train.optim.layer_decay=none"):
        param_groups(plain, 0.05, layer_decay=0.5)


def test_an_mae_objective_is_refused_for_a_timm_model() -> None:
    from dataclasses import replace

    from orchestration.experiment import get_recipe

    mae = get_recipe("mae_vit_mu_digits")
    with pytest.raises(ValueError, match="needs our ViT"):
        replace(mae, model=ARCHS["swin"][0])


# ------------------------------------------------------------------------------ through the pipeline
@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    """160 train / 40 val digits at 32 px, 10 classes."""
    from conftest import small_digits_dataset

    return small_digits_dataset(tmp_path_factory, IMAGE)


def test_a_registered_swin_is_evaluated_and_fine_tuned_at_another_resolution(
        digits: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run's export of a timm Swin (what ray_train._export writes) is registered with its timm
    name and version, loads back from the registry, is evaluated few-shot and by a linear probe,
    and is fine-tuned at 48 px with other windows: the staged weights (relative position bias
    tables resized) are what the fine-tune's workers load; its architecture may not change."""
    import dataclasses

    import timm

    from orchestration import evaluate, finetune, tracking
    from orchestration.experiment import apply_overrides, get_recipe
    from orchestration.launch.build import build_model
    from orchestration.launch.pretrain_run import register_from_run
    from orchestration.launch.ray_train import EXPORT_KEY
    from pipeline.storage import open_storage
    from training.checkpoint import export_weights

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = apply_overrides(get_recipe("swin_digits"), [f"data.source.url={digits}"])
    model = build_model(exp, CLASSES)
    meta = {"vitscale.config": json.dumps(dataclasses.asdict(model.cfg)), "vitscale.objective": "classification"}
    export = export_weights(model, tmp_path / "export.safetensors", metadata=meta)
    run_dir = str(tmp_path / "run")
    open_storage(run_dir).upload_file(export, EXPORT_KEY)
    run_id = tracking.start_run("zoo", run_name="swin", uri=uri)
    version = register_from_run(exp, run_id=run_id, run_dir=run_dir, report={"step": 1}, lineage={}, uri=uri)
    assert exp.model_name == "swin_tiny_patch4_window7_224-digits"
    mv = tracking.client(uri).get_model_version(exp.model_name, str(version))
    assert mv.tags["timm_name"] == "swin_tiny_patch4_window7_224" and mv.tags["timm_version"] == timm.__version__
    source = f"models:/{exp.model_name}/{version}"
    loaded = tracking.load_model(source, uri)
    assert loaded.cfg == model.cfg and all(torch.equal(a, b) for a, b in zip(
        loaded.state_dict().values(), model.state_dict().values(), strict=True))

    base = ["--model", source, "--tracking-uri", uri, "--data", f"digits={digits}", "--device", "cpu"]
    assert evaluate.main(["fewshot", *base, "--shots", "1,5"]) == 0
    assert evaluate.main(["linear", *base]) == 0
    out = capsys.readouterr().out
    assert "fewshot/digits/5shot" in out and "linear_probe/digits/full" in out

    ft = ["--from", source, "--data", digits, "--image-size", "48", "--storage", str(tmp_path / "runs"),
          "--tracking-uri", uri, "--gpus-per-worker", "0", "--dry-run"]
    assert finetune.main([*ft, "--set", "model.window_size=6"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["image_size"] == 48 and resolved["model.window_size"] == 6 and resolved["model.kind"] == "timm"
    assert finetune.main([*ft, "--set", "model.depths=1,2"]) == 2
    assert "model.depths=(1, 2): --from" in capsys.readouterr().err
    ft_exp = apply_overrides(get_recipe("swin_digits"), ["image_size=48", "model.window_size=6"])
    url = finetune._stage_weights(loaded, str(tmp_path / "init" / "w.safetensors"), 48, spec=ft_exp.model)
    worker = build_model(ft_exp, CLASSES, init_weights=url)  # what every fine-tuning worker does
    torch.testing.assert_close(worker.layers[0].blocks[0].attn.relative_position_bias_table.shape,
                               torch.Size([11 * 11, 1]))


@pytest.mark.slow
@pytest.mark.integration
def test_an_architecture_study_trains_vit_and_timm_trials_on_tune(digits: str, tmp_path: Path) -> None:
    """A Tune study whose variants are a ViT size and a timm Swin: every trial trains through the
    same build_run, and its points count its own FLOPs (counted for the Swin, analytic for the ViT)."""
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from orchestration.studies.archs import split_variants
    from orchestration.studies.spec import StudySpec, trial_experiment

    root = Path(__file__).resolve().parents[1]
    variants = "mu/4,timm:swin_tiny_patch4_window7_224:patch_size=2:embed_dim=16:depths=1,1:num_heads=1,2:window_size=4"
    cmd = [sys.executable, "orchestration/sweep.py", "--variants", variants, "--steps", "10", "--data", digits,
           "--image-size", str(IMAGE), "--batch-size", "32", "--evals-per-trial", "1", "--loader-workers", "0",
           "--cpus-per-trial", "1", "--gpus-per-trial", "0", "--storage", str(tmp_path / "studies"), "--name", "archs",
           "--no-tracking", "--n-boot", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = pq.read_table(tmp_path / "studies" / "archs-analysis" / "points.parquet").to_pylist()
    assert len(rows) == 2 and len({r["variant"] for r in rows}) == 2
    spec = StudySpec(name="archs", variants=split_variants(variants), steps=(10,), overrides=(f"image_size={IMAGE}",))
    for r in rows:
        exp = trial_experiment(spec, variant=r["variant"], steps=10, samples=None, seed=0)
        per_image = 6.0 * macs_per_image(exp.model_config(CLASSES))
        assert r["flops"] == pytest.approx(per_image * r["images"]), r["variant"]


@pytest.mark.parametrize("arch", ["deit", "swin", "pvt_v2", "cait", "beit", "resnet"])
def test_served_network_answers_like_its_own_forward(arch: str) -> None:
    """The serving predictor (#27) runs a zoo network: the probabilities are the softmax of the
    network's own logits (a Swin's or ResNet's head pools; scores must not be computed from the
    pooled embedding a second time) and the embedding is timm's pre-logits."""
    from orchestration.serving.predictor import Predictor
    from orchestration.serving.spec import ServingSpec

    torch.manual_seed(0)
    net = build_network(_cfg(arch)).eval()
    spec = ServingSpec(image_size=IMAGE, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3,
                       class_names=tuple(f"c{i}" for i in range(CLASSES)))
    pred = Predictor(net, spec, device="cpu")
    images = torch.randint(0, 256, (3, 3, IMAGE, IMAGE), dtype=torch.uint8)
    scores, emb = pred.forward(images)
    x = (images.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        want = net(x).softmax(-1)
        want_emb = net.forward_head(net.forward_features(x), pre_logits=True)
    torch.testing.assert_close(scores, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(emb, want_emb, atol=1e-5, rtol=1e-4)


def test_a_registered_swin_is_served_by_its_pyfunc(tmp_path: Path) -> None:
    """End to end (#25 x #27): a timm Swin registered like any model of ours loads back as an MLflow
    pyfunc that answers encoded images with the network's own probabilities (default transform:
    mean/std 0.5, centre crop 0.875), and the version is tagged with the timm name and version."""
    import io

    import mlflow
    import numpy as np
    import pandas as pd
    from PIL import Image

    from orchestration import tracking
    from pipeline.decode import decode_eval

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run("zoo-serving", run_name="swin", uri=uri)
    torch.manual_seed(0)
    net = build_network(_cfg("swin")).eval()
    version = tracking.log_and_register_model(net, run_id=run_id, name="swin-test", tags={}, uri=uri)
    tracking.end_run(run_id, uri=uri)
    mv = tracking.client(uri).get_model_version("swin-test", str(version))
    assert mv.tags["timm_name"] == "swin_tiny_patch4_window7_224" and mv.tags["timm_version"]

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(2).random((40, 52, 3)) * 255).astype("uint8")).save(buf, "PNG")
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        got = mlflow.pyfunc.load_model(f"models:/swin-test/{version}").predict(
            pd.DataFrame({"image": [buf.getvalue()]}), params={"top_k": 3}).iloc[0]
    finally:
        mlflow.set_tracking_uri(before)
    x = torch.from_numpy(decode_eval(buf.getvalue(), size=IMAGE, crop_pct=0.875)).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        top = net((x / 255 - 0.5) / 0.5).softmax(-1)[0].topk(3)
    assert list(got["classes"]) == [str(i) for i in top.indices.tolist()]
    np.testing.assert_allclose(got["probabilities"], top.values.numpy(), atol=1e-5)
