"""Recipes and typed --set overrides (unit tests: no Ray, no services)."""

from __future__ import annotations

import dataclasses

import pytest

from orchestration.experiment import (
    RECIPES,
    Experiment,
    OverrideError,
    apply_overrides,
    experiment_from_dict,
    experiment_to_dict,
    flatten_experiment,
    get_recipe,
    validate,
)
from orchestration.experiment.recipes import vit_b16_i21k, vit_h14_jft, vit_l16_i21k, vit_mu_smoke, vit_s16_t4


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_is_valid_and_documents_its_launch(name: str) -> None:
    exp = RECIPES[name]()
    validate(exp)
    assert exp.name == name
    assert "orchestration/pretrain.py" in (RECIPES[name].__doc__ or ""), "launch command in the docstring"
    assert exp.global_batch == exp.train.global_batch
    assert experiment_from_dict(experiment_to_dict(exp)) == exp


def test_paper_table3_settings() -> None:
    for exp in (vit_b16_i21k(), vit_l16_i21k(), vit_h14_jft()):
        t = exp.train
        assert (t.global_batch, t.schedule.warmup_steps, t.schedule.decay, t.optim.betas, t.optim.name) == (
            4096, 10_000, "linear", (0.9, 0.999), "adamw")
        assert t.optim.grad_clip == 1.0 and exp.image_size == 224
    b, h = vit_b16_i21k(), vit_h14_jft()
    assert (b.train.optim.lr, b.train.optim.weight_decay, b.model.dropout) == (1e-3, 0.03, 0.1)
    assert (h.train.optim.lr, h.train.optim.weight_decay, h.model.dropout) == (3e-4, 0.1, 0.0)
    assert RECIPES["vit_b16_jft"]().train.optim.lr == 8e-4 and RECIPES["vit_l16_jft"]().train.optim.lr == 4e-4
    assert RECIPES["vit_b16_jft"]().train.objective.loss == "sigmoid"
    assert vit_l16_i21k().train.optim.lr == 1e-3 and vit_l16_i21k().train.engine.zero_stage == 2
    assert h.model.variant == "H/14" and h.model_name == "vit-h14-jft" and h.train.engine.zero_stage == 3


def test_t4_recipe_is_exactly_the_t4_config() -> None:
    exp = vit_s16_t4()
    cfg = exp.model_config(num_classes=10)
    assert (cfg.width, cfg.heads, cfg.depth, cfg.mlp_dim, cfg.patch_size, cfg.image_size) == (384, 6, 12, 1536, 16, 224)
    t = exp.train
    assert (t.micro_batch, t.optim.lr, t.optim.weight_decay, t.schedule.warmup_steps, t.schedule.total_steps,
            t.engine.precision) == (32, 1e-3, 0.1, 1000, 50_000, "fp16")
    assert exp.grad_accum == 4 and (exp.resources.workers, exp.resources.gpus_per_worker) == (1, 1)
    assert exp.data.batch_size == 32


def test_mu_smoke_is_a_cpu_recipe() -> None:
    exp = vit_mu_smoke()
    assert (exp.resources.workers, exp.resources.gpus_per_worker, exp.image_size) == (2, 0, 32)
    assert exp.train.schedule.total_steps <= 500
    assert exp.model_name == "vit-mu4-digits"


def test_overrides_are_typed_and_keep_duplicates_in_step() -> None:
    exp = apply_overrides(
        vit_b16_i21k(),
        ["train.optim.lr=3e-4", "data.batch_size=64", "resources.workers=2", "model.dropout=0.2",
         "train.optim.betas=0.9,0.95", "data.augment.randaugment=(2, 15)", "train.engine.activation_checkpointing=true",
         "data.source.limit_samples=none"],
    )
    assert exp.train.optim.lr == 3e-4 and isinstance(exp.train.optim.lr, float)
    assert exp.data.batch_size == exp.train.micro_batch == 64
    assert exp.resources.workers == 2 and exp.train.global_batch == 4096 and exp.grad_accum == 32
    assert exp.model.dropout == 0.2 and exp.model.representation_size == 768
    assert exp.train.optim.betas == (0.9, 0.95) and exp.data.augment.randaugment == (2, 15)
    assert exp.train.engine.activation_checkpointing is True and exp.data.source.limit_samples is None
    resized = apply_overrides(vit_mu_smoke(), ["image_size=48"])
    assert resized.image_size == resized.data.image_size == 48
    assert vit_b16_i21k().train.optim.lr == 1e-3, "recipes are not mutated"


def test_unknown_key_names_the_closest_and_the_section_keys() -> None:
    with pytest.raises(OverrideError) as e:
        apply_overrides(vit_mu_smoke(), ["train.optim.lrr=1e-3"])
    msg = str(e.value)
    assert "'train.optim.lrr'; did you mean train.optim.lr" in msg and "train.optim.weight_decay" in msg
    with pytest.raises(OverrideError, match=r"did you mean train.optim.lr\?"):  # the old flat key
        apply_overrides(vit_mu_smoke(), ["train." + "lr=3e-4"])
    with pytest.raises(OverrideError, match="did you mean data.batch_size.*valid keys of 'data'"):
        apply_overrides(vit_mu_smoke(), ["data.batchsize=3"])
    with pytest.raises(OverrideError, match=r"did you mean resources.workers"):
        apply_overrides(vit_mu_smoke(), ["workers" + "=2"])
    with pytest.raises(OverrideError, match=r"did you mean eval.split"):
        apply_overrides(vit_mu_smoke(), ["eval_split" + "=val"])
    with pytest.raises(OverrideError, match=r"valid keys: .*resources\.\*"):
        apply_overrides(vit_mu_smoke(), ["nosuch=2"])
    with pytest.raises(OverrideError, match="not of the form key=value"):
        apply_overrides(vit_mu_smoke(), ["train.optim.lr"])
    with pytest.raises(OverrideError, match="chosen by the recipe"):
        apply_overrides(vit_mu_smoke(), ["train.objective.kind=mae"])


@pytest.mark.parametrize(
    ("item", "key", "expected"),
    [
        ("train.optim.lr=fast", "train.optim.lr", "float"),
        ("resources.workers=2.5", "resources.workers", "int"),
        ("train.schedule.total_steps=1e3", "train.schedule.total_steps", "int"),
        ("train.schedule.decay=step", "train.schedule.decay", "Literal['linear', 'cosine']"),
        ("data.augment.hflip=maybe", "data.augment.hflip", "bool"),
        ("train.optim.betas=0.9", "train.optim.betas", "tuple[float, float]"),
    ],
)
def test_wrong_type_names_key_type_and_value(item: str, key: str, expected: str) -> None:
    with pytest.raises(OverrideError) as e:
        apply_overrides(vit_mu_smoke(), [item])
    msg = str(e.value)
    assert repr(key) in msg and expected in msg and repr(item.split("=", 1)[1]) in msg


def test_inconsistent_values_fail_with_the_fix() -> None:
    with pytest.raises(OverrideError, match="not divisible by micro_batch 32 x world_size 3"):
        apply_overrides(vit_mu_smoke(), ["resources.workers=3"])
    with pytest.raises(OverrideError, match="image_size 33 is not divisible by patch_size 4"):
        apply_overrides(vit_mu_smoke(), ["image_size=33"])
    with pytest.raises(OverrideError, match="train.schedule.warmup_steps=30 must be in"):
        apply_overrides(vit_mu_smoke(), ["train.schedule.total_steps=10"])


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    with pytest.raises(OverrideError) as e:
        apply_overrides(vit_mu_smoke(), ["train.optim.lr=inf", "data.io.num_workers=-1", "model.dropout=2",
                                         "resources.cpus_per_worker=0", "eval.fewshot_shots=0", "train.lrr=1"])
    keys = [ln.split("=")[0].split(" ")[0] for ln in e.value.problems]
    assert keys == ["unknown", "train.optim.lr", "data.io.num_workers", "model.dropout",
                    "resources.cpus_per_worker", "eval.fewshot_shots"], e.value.problems


def test_flattened_config_for_tracking() -> None:
    flat = flatten_experiment(vit_mu_smoke())
    assert flat["train.optim.lr"] == 3e-3 and flat["data.image_size"] == 32 and flat["resources.workers"] == 2
    assert flat["data.source.url"] == "s3://vitscale/digits" and flat["model.variant"] == "mu/4"
    assert flat["registered_model_name"] == "vit-mu4-digits" and flat["grad_accum"] == 1


def test_experiment_dicts_of_another_layout_are_refused() -> None:
    d = experiment_to_dict(vit_mu_smoke())
    d["train"]["lr"] = 1e-3  # the flat layout of older versions
    with pytest.raises(ValueError, match=r"unknown field\(s\) train.lr"):
        experiment_from_dict(d)


def test_unknown_recipe_lists_recipes() -> None:
    with pytest.raises(ValueError, match="vit_mu_smoke"):
        get_recipe("vit_z16")


def test_experiment_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        vit_mu_smoke().resources.workers = 3  # type: ignore[misc]
    assert dataclasses.is_dataclass(Experiment)


def test_image_size_and_per_rank_batch_are_stored_once() -> None:
    """``data.image_size`` / ``data.batch_size`` are derived from ``image_size`` / ``train.micro_batch``:
    however an experiment is made, they cannot disagree (there is no second copy to keep in step)."""
    exp = vit_mu_smoke()
    bigger = dataclasses.replace(exp, image_size=48, train=exp.train.replace(micro_batch=16, global_batch=32))
    assert bigger.data.image_size == 48 and bigger.data.batch_size == 16
    validate(bigger)
    aliased = apply_overrides(exp, ["data.image_size=64", "data.batch_size=8", "train.global_batch=16"])
    assert (aliased.image_size, aliased.train.micro_batch) == (64, 8)
    assert (aliased.data.image_size, aliased.data.batch_size) == (64, 8)


def test_workers_range_is_elastic_and_every_size_must_fit_the_global_batch() -> None:
    """`--workers MIN-MAX` -> Ray Train's (min, max); the global batch must divide at every size."""
    from orchestration.launch.ray_train import _num_workers
    from orchestration.pretrain import resolve_experiment

    exp = resolve_experiment("vit_mu_smoke", [], "1-2")
    assert (exp.resources.workers, exp.resources.min_workers, _num_workers(exp)) == (2, 1, (1, 2))
    assert [exp.train.accum_for(w) for w in (1, 2)] == [2, 1]  # global batch kept by accumulation
    fixed = resolve_experiment("vit_mu_smoke", [], "2")
    assert (fixed.resources.min_workers, _num_workers(fixed)) == (None, 2)
    with pytest.raises(ValueError, match=r"micro_batch 16 x world_size 2 .*workers=2 of the elastic range"):
        resolve_experiment("vit_mu_smoke", ["train.global_batch=48", "train.micro_batch=16"], "1-3")
    with pytest.raises(ValueError, match=r"resources.min_workers=3 must be an int in \[1, workers=2\]"):
        resolve_experiment("vit_mu_smoke", ["resources.min_workers=3"], None)


def test_group_start_timeout_reaches_ray_train_through_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`group_start_timeout_s` -> RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for one fit() (Ray Train passes
    it on to its controller); put back after, a user's own export kept when the field is None."""
    import os

    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    from orchestration.launch.ray_train import GROUP_START_TIMEOUT_ENV, ray_train_env
    from orchestration.pretrain import resolve_experiment

    assert GROUP_START_TIMEOUT_ENV in ENV_VARS_TO_PROPAGATE  # Ray still forwards it to the controller
    monkeypatch.delenv(GROUP_START_TIMEOUT_ENV, raising=False)
    exp = resolve_experiment("vit_mu_smoke", ["resources.group_start_timeout_s=20"], "1-2")
    with ray_train_env(exp):
        assert os.environ[GROUP_START_TIMEOUT_ENV] == "20"
    assert GROUP_START_TIMEOUT_ENV not in os.environ
    monkeypatch.setenv(GROUP_START_TIMEOUT_ENV, "90")
    with ray_train_env(resolve_experiment("vit_mu_smoke", [], None)):  # None: Ray's default or the user's
        assert os.environ[GROUP_START_TIMEOUT_ENV] == "90"
    with ray_train_env(exp):
        assert os.environ[GROUP_START_TIMEOUT_ENV] == "20"
    assert os.environ[GROUP_START_TIMEOUT_ENV] == "90"
    for bad in ("0", "-5", "inf"):
        with pytest.raises(ValueError, match=r"resources.group_start_timeout_s=.* must be a finite number of seconds > 0"):
            resolve_experiment("vit_mu_smoke", [f"resources.group_start_timeout_s={bad}"], None)
