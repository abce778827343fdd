"""#25 DeiT distillation: the distilled ViT (timm parity), the distillation objective (DeiT's
losses.py), teacher loading and its refusals. Repeated augmentation (DeiT's data-pipeline part)
is in ``tests/test_repeated_augmentation.py``.

The end-to-end claim (a pipeline-trained teacher makes a distilled student beat the same student
trained alone) and the documented commands are in ``tests/test_distill_digits.py``.
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


# ----------------------------------------------------------------------------- the objective
def _distill_cfg(**kw: object):  # noqa: ANN202 - a TrainConfig
    from training import TrainConfig
    from training.config import CheckpointConfig, EngineConfig, OptimConfig, ScheduleConfig
    from training.objectives import DistillConfig

    objective = DistillConfig(teacher="test:teacher", **kw)  # type: ignore[arg-type]
    return TrainConfig(global_batch=8, micro_batch=8, log_every=2, profile="cpu", objective=objective,
                       optim=OptimConfig(lr=2e-3, weight_decay=0.05), engine=EngineConfig(zero_stage=1),
                       schedule=ScheduleConfig(warmup_steps=1, total_steps=4), checkpoint=CheckpointConfig(every=4))


def _teacher(num_classes: int = 10, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    t = create_model("mu/8", num_classes=num_classes, image_size=32)
    torch.nn.init.normal_(t.head.weight, std=0.5)  # a zero head predicts class 0 for everything
    return t


class _Mem:
    """32 fixed images of 10 classes, 8 a batch; resumable; ``eval=True``: (images, targets, valid)."""

    def __init__(self, eval: bool = False) -> None:  # noqa: A002
        g = torch.Generator().manual_seed(5)
        self.x, self.y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
        self.eval, self.pos = eval, 0

    def __len__(self) -> int:
        return 4

    def __iter__(self):  # noqa: ANN204
        while self.pos < 4:
            s = slice(self.pos * 8, self.pos * 8 + 8)
            self.pos += 1
            yield (self.x[s], self.y[s], torch.ones(8, dtype=torch.bool)) if self.eval else (self.x[s], self.y[s])
        self.pos = 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, d: dict) -> None:
        self.pos = d["pos"]


def test_distillation_losses_follow_deit_losses_py() -> None:
    """hard: CE(dist, teacher.argmax(1)); soft: KL(log_softmax(dist/T), log_softmax(teacher/T), sum,
    log_target) * T^2 / numel; total (1 - alpha) * base + alpha * distillation, base on the class head."""
    import torch.nn.functional as F

    from training.objectives import DistillConfig, objective_for
    from training.objectives.distill import distillation_loss

    g = torch.Generator().manual_seed(0)
    dist, teacher = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    hard = DistillConfig(teacher="t")
    assert distillation_loss(hard, dist, teacher) == pytest.approx(F.cross_entropy(dist, teacher.argmax(1)).item())
    soft = DistillConfig(teacher="t", type="soft", tau=2.0)
    p_t, log_s = (teacher / 2).softmax(1), (dist / 2).log_softmax(1)
    ref = (p_t * (p_t.log() - log_s)).sum() * 4 / dist.numel()  # an independent spelling of the same KL
    assert distillation_loss(soft, dist, teacher) == pytest.approx(ref.item(), rel=1e-5)
    # the objective: both heads of the student, the teacher on the same images, alpha, smoothing
    student = create_model("mu/8", num_classes=10, image_size=32, distilled=True)
    torch.nn.init.normal_(student.head.weight, std=0.3)
    torch.nn.init.normal_(student.head_dist.weight, std=0.3)
    teach = _teacher()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    cfg = DistillConfig(teacher="t", alpha=0.3, label_smoothing=0.1)
    obj = objective_for(cfg, teacher=teach)
    assert obj.wrap(student) is student and not teach.training
    assert all(not p.requires_grad for p in teach.parameters())
    c, d = student.forward_heads(x)
    want = 0.7 * F.cross_entropy(c, y, label_smoothing=0.1) + 0.3 * F.cross_entropy(d, teach(x).argmax(1))
    assert obj.loss(student, (x, y)).item() == pytest.approx(want.item(), rel=1e-5)
    # soft targets (mixup / cutmix) for the base criterion, as the classification objective's
    soft_y = F.one_hot(y, 10).float() * 0.6 + 0.04
    want = 0.7 * -(soft_y * 0.9 + 0.01).mul(c.log_softmax(1)).sum(1).mean() + 0.3 * F.cross_entropy(d, teach(x).argmax(1))
    assert obj.loss(student, (x, soft_y)).item() == pytest.approx(want.item(), rel=1e-5)


def test_config_and_objective_refusals() -> None:
    from confkit import ConfigValueError
    from training.objectives import ClassificationConfig, DistillConfig, objective_for

    with pytest.raises(ConfigValueError) as e:
        DistillConfig(type="medium", alpha=1.5, tau=0, teacher="")  # type: ignore[arg-type]
    text = str(e.value)
    for line in ("type='medium' must be one of 'hard', 'soft'", "alpha=1.5", "tau=0", "teacher='' must be"):
        assert line in text, text
    obj = objective_for(DistillConfig(teacher="t"), teacher=_teacher(7))
    with pytest.raises(ValueError, match="needs a student with DeiT's distillation token .* distilled=True"):
        obj.wrap(create_model("mu/8", num_classes=7, image_size=32))
    with pytest.raises(ValueError, match=r"teacher \(t\) predicts 7 classes, the student 10"):
        obj.wrap(create_model("mu/8", num_classes=10, image_size=32, distilled=True))
    with pytest.raises(ValueError, match="needs its teacher: Trainer"):
        objective_for(DistillConfig(teacher="t")).wrap(create_model("mu/8", num_classes=7, image_size=32,
                                                                    distilled=True))
    with pytest.raises(ValueError, match="a teacher was given but train.objective.kind='classification' uses none"):
        objective_for(ClassificationConfig(), teacher=_teacher())


def test_trainer_distils_with_a_frozen_teacher_outside_the_engine(tmp_path) -> None:  # noqa: ANN001
    """The teacher trains nothing of its own: unchanged, eval mode, none of its tensors in the
    optimizer, the checkpoint or the export; evaluation reports the three heads and the teacher."""
    from safetensors.torch import load_file

    from training import Trainer, export_weights

    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(0)
    student = create_model("mu/8", num_classes=10, image_size=32, distilled=True)
    trainer = Trainer(student, _distill_cfg(), _Mem(), eval_loader=_Mem(eval=True), checkpoint_dir=str(tmp_path / "ck"),
                      console=False, teacher=teacher)
    out = trainer.fit()
    assert out["step"] == 4 and out["loss"] == out["loss"]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()) and not teacher.training
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in teacher.parameters()}
    export_weights(trainer.engine, tmp_path / "student.safetensors")
    assert set(load_file(tmp_path / "student.safetensors")) == set(student.state_dict())
    saved = torch.load(next((tmp_path / "ck" / "step4").rglob("*model_states.pt")), weights_only=False)["module"]
    assert set(saved) == set(student.state_dict())  # the teacher is not checkpointed
    ev = _Mem(eval=True)
    with torch.no_grad():
        teacher_top1 = (teacher(ev.x).argmax(1) == ev.y).float().mean().item()
        c, d = student.forward_heads(ev.x)
    assert out["eval_top1_teacher"] == pytest.approx(teacher_top1)
    assert out["eval_top1_cls"] == pytest.approx((c.argmax(1) == ev.y).float().mean().item())
    assert out["eval_top1_dist"] == pytest.approx((d.argmax(1) == ev.y).float().mean().item())
    assert out["eval_top1"] == pytest.approx((((c + d) / 2).argmax(1) == ev.y).float().mean().item())
    assert out["eval_samples"] == 32


# ----------------------------------------------------------------------------- teachers
def test_timm_teacher_from_safetensors_and_its_refusals(tmp_path) -> None:  # noqa: ANN001
    """timm:ARCH=WEIGHTS.safetensors builds the zoo architecture without a download and loads the
    file; a pickle (whatever its name), another class count, an unknown name (timm's closest
    names listed), a family the zoo does not drive, another architecture's weights and an image
    size the architecture cannot take are refused by name."""
    import timm
    from safetensors.torch import save_file

    from orchestration.launch.teacher import load_teacher, parse_teacher
    from orchestration.tracking import UnsafeModelError

    torch.manual_seed(0)
    ref = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    save_file(ref.state_dict(), tmp_path / "t.safetensors")
    spec = f"timm:test_resnet={tmp_path / 't.safetensors'}"
    assert parse_teacher(spec).arch == "test_resnet"
    t = load_teacher(spec, 10, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t(x), ref(x))
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    assert t.cfg.name == "test_resnet" and t.cfg.num_classes == 10  # built through the zoo (model.cfg)
    with pytest.raises(ValueError, match=r"predicts 10 classes \(fc.weight is \(10, .*the dataset has 7"):
        load_teacher(spec, 7)
    torch.save(ref.state_dict(), tmp_path / "p.safetensors")  # a pickle behind a safe-looking name
    torch.save(ref.state_dict(), tmp_path / "p.pth")
    for name in ("p.safetensors", "p.pth"):
        with pytest.raises(UnsafeModelError, match="is a pickle .* never unpickles"):
            load_teacher(f"timm:test_resnet={tmp_path / name}", 10)
    with pytest.raises(ValueError, match="'resnet5' is not a timm .* did you mean .*resnet50"):
        load_teacher(f"timm:resnet5={tmp_path / 't.safetensors'}", 10)
    with pytest.raises(ValueError, match="byobnet family, which vitscale does not drive"):
        load_teacher(f"timm:test_byobnet={tmp_path / 't.safetensors'}", 10)
    with pytest.raises(ValueError, match="pretrained-weights tag"):
        load_teacher(f"timm:resnet50.a1_in1k={tmp_path / 't.safetensors'}", 10)
    with pytest.raises(ValueError, match="do not fit timm's resnet18 at image_size 224"):
        load_teacher(f"timm:resnet18={tmp_path / 't.safetensors'}", 10)
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4,
                             embed_dim=32, depth=1, num_heads=2)
    save_file(deit.state_dict(), tmp_path / "deit.safetensors")
    with pytest.raises(ValueError, match="image_size 30 is not divisible by deit_tiny_patch16_224's patch size 16"):
        load_teacher(f"timm:deit_tiny_patch16_224={tmp_path / 'deit.safetensors'}", 10, image_size=30)
    for bad in ("timm:test_resnet", "http://x/y.safetensors", ""):
        with pytest.raises(ValueError, match="teacher"):
            parse_teacher(bad)


def test_zoo_convnet_teacher_exported_by_a_run_takes_other_sizes(tmp_path) -> None:  # noqa: ANN001
    """A timm ResNet of the zoo trained here is a teacher as its run export (safetensors + config):
    a convnet takes a student of another image size, a timm DeiT (position embeddings for one
    size) is refused with the fix."""
    import dataclasses
    import json

    from model import TimmSpec, build_network
    from orchestration.launch.teacher import load_teacher

    torch.manual_seed(0)
    resnet = build_network(TimmSpec(name="resnet18", depths=(1, 1, 1, 1)).config(num_classes=10, image_size=32))
    save_weights(resnet, tmp_path / "resnet.safetensors")
    t = load_teacher(str(tmp_path / "resnet.safetensors"), 10, image_size=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(t(x), resnet.eval()(x))
    # the Trainer's export (training.export_weights, what a run uploads) keeps BatchNorm's integer
    # num_batches_tracked an integer: a float one made the export of a convnet unloadable
    from training import export_weights

    export_weights(resnet, tmp_path / "export.safetensors", metadata={"vitscale.config": json.dumps(
        dataclasses.asdict(resnet.cfg))})
    t = load_teacher(str(tmp_path / "export.safetensors"), 10, image_size=32)
    assert t.bn1.num_batches_tracked.dtype == torch.int64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t(x), resnet(x))
    deit = build_network(TimmSpec(name="deit_tiny_patch16_224", patch_size=4, embed_dim=(32,), depths=(1,),
                                  num_heads=(2,)).config(num_classes=10, image_size=32))
    save_weights(deit, tmp_path / "deit.safetensors")
    assert load_teacher(str(tmp_path / "deit.safetensors"), 10, image_size=32) is not None
    with pytest.raises(ValueError, match="is a deit_tiny_patch16_224 for 32x32 images, the student sees 64x64"):
        load_teacher(str(tmp_path / "deit.safetensors"), 10, image_size=64)


def test_vit_teachers_from_a_file_and_the_registry(tmp_path) -> None:  # noqa: ANN001
    """Ours: a .safetensors export (a run's export) or models:/NAME@ALIAS, pinned to its version; the
    class count, the image size and a head-less MAE encoder are checked; a pickled file refused."""
    from orchestration import tracking
    from orchestration.launch.teacher import load_teacher, pin_frozen
    from orchestration.tracking import UnsafeModelError

    teacher = _teacher(10)
    save_weights(teacher, tmp_path / "model.safetensors")
    t = load_teacher(str(tmp_path / "model.safetensors"), 10, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(t(x), teacher(x))
    with pytest.raises(ValueError, match="predicts 10 classes, the dataset has 5"):
        load_teacher(str(tmp_path / "model.safetensors"), 5)
    with pytest.raises(ValueError, match="ViT for 32x32 images, the student sees 64x64"):
        load_teacher(str(tmp_path / "model.safetensors"), 10, image_size=64)
    save_weights(create_model("mu/8", num_classes=0, image_size=32, posemb="sincos2d"), tmp_path / "mae.safetensors")
    with pytest.raises(ValueError, match="has no class head"):
        load_teacher(str(tmp_path / "mae.safetensors"), 10)
    torch.save(teacher.state_dict(), tmp_path / "model.pt")
    with pytest.raises(UnsafeModelError, match="never unpickles"):
        load_teacher(str(tmp_path / "model.pt"), 10)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run("teachers", run_name="t", uri=uri)
    tracking.log_and_register_model(teacher, run_id=run_id, name="teacher-mu8", tags={}, uri=uri)
    tracking.client(uri).set_registered_model_alias("teacher-mu8", "champion", "1")
    t = load_teacher("models:/teacher-mu8@champion", 10, image_size=32, tracking_uri=uri)
    torch.testing.assert_close(t(x), teacher(x))
    from orchestration.experiment import get_recipe

    exp = get_recipe("deit_mu_distilled_digits")
    exp = pin_frozen(dataclasses_replace_teacher(exp, "models:/teacher-mu8@champion"), uri)
    assert exp.train.objective.teacher == "models:/teacher-mu8/1"
    # the alias moved to version 2 before a restart: the checkpoint's config names version 1, so the
    # resume is refused naming both (never a silent switch of teacher half-way through a run)
    from training.checkpoint.manager import resume_refusal

    moved = dataclasses_replace_teacher(exp, "models:/teacher-mu8/2").train
    assert moved.config_hash() != exp.train.config_hash()
    assert "objective.teacher: 'models:/teacher-mu8/1' -> 'models:/teacher-mu8/2'" in resume_refusal(
        "ck/step5", exp.train.to_dict(), moved)


def test_a_timm_student_is_refused_with_the_fix() -> None:
    """The distillation token is our ViT's: a timm student is refused before Ray (it can be the teacher)."""
    from dataclasses import replace

    from model import TimmSpec
    from orchestration.experiment import get_recipe
    from orchestration.experiment.checks import experiment_problems

    exp = get_recipe("deit_mu_distilled_digits")
    assert experiment_problems(exp) == []
    swin = replace(exp, model=TimmSpec(name="swin_tiny_patch4_window7_224", patch_size=2, embed_dim=(16,),
                                       depths=(1, 1), num_heads=(1, 2), window_size=4))
    problems = experiment_problems(swin)
    assert len(problems) == 1 and "timm's swin_tiny_patch4_window7_224 does not" in problems[0], problems
    assert "model.kind='vit' with model.distilled=true" in problems[0] and "timm:ARCH=WEIGHTS" in problems[0]


def dataclasses_replace_teacher(exp, teacher: str):  # noqa: ANN001, ANN201 - an Experiment
    from dataclasses import replace

    return replace(exp, train=replace(exp.train, objective=replace(exp.train.objective, teacher=teacher)))


def test_pretrain_refuses_a_bad_teacher_before_ray(tmp_path, capsys) -> None:  # noqa: ANN001
    """pretrain.py exits 2 with one error line, before Ray or MLflow start, for a pickled teacher, a
    teacher of another class count or image size, a student without the distillation head, a
    teacher spec of no known form and a registry alias that does not exist."""
    from orchestration import pretrain
    from pipeline import write_dataset
    from pipeline.demo_data import make_digits_folder

    make_digits_folder(tmp_path / "src", image_size=16, limit=120)
    data = str(tmp_path / "ds")
    write_dataset(tmp_path / "src", data, samples_per_shard=60, val_fraction=0.2, progress=False)
    teacher = create_model("mu/4", num_classes=10, image_size=16)  # the digits recipes' 16 px
    save_weights(teacher, tmp_path / "ok.safetensors")
    save_weights(create_model("mu/4", num_classes=7, image_size=16), tmp_path / "seven.safetensors")
    save_weights(_teacher(10), tmp_path / "vit32.safetensors")
    torch.save(teacher.state_dict(), tmp_path / "pickled.safetensors")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ["--recipe", "deit_mu_distilled_digits", "--data", data, "--storage", str(tmp_path / "runs"),
            "--tracking-uri", uri, "--dry-run"]

    def errors(*sets: str) -> list[str]:
        code = pretrain.main(base + [a for s in sets for a in ("--set", s)])
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert (code == 2) == bool(lines), (code, lines)
        return lines

    assert errors(f"train.objective.teacher={tmp_path / 'ok.safetensors'}") == []
    cases = {
        f"train.objective.teacher={tmp_path / 'pickled.safetensors'}": "is a pickle",
        f"train.objective.teacher=timm:test_resnet={tmp_path / 'pickled.safetensors'}": "is a pickle",
        f"train.objective.teacher={tmp_path / 'seven.safetensors'}": "predicts 7 classes, the dataset has 10",
        "train.objective.teacher=ftp://host/t.safetensors": "is none of models:/NAME@ALIAS",
        "train.objective.teacher=models:/nobody@champion": "registered model 'nobody' not found",
        f"train.objective.teacher={tmp_path / 'vit32.safetensors'}": "ViT for 32x32 images, the student sees 16x16",
    }
    for override, message in cases.items():
        lines = errors(override)
        assert len(lines) == 1 and message in lines[0], (override, lines)
    lines = errors(f"train.objective.teacher={tmp_path / 'ok.safetensors'}", "model.distilled=false")
    assert any("needs one (--set model.distilled=true)" in ln for ln in lines), lines
