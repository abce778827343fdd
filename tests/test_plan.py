"""Planning a run (issue #29): the estimates against what can be measured here, every recipe, the fixes.

* model states: our per-GPU bytes vs DeepSpeed's own estimators (stage 2 and 3, with and without
  offload, 1 to 512 GPUs), within 10 %;
* activations: the meta-device trace vs a real CPU forward + backward, measured by torch's profiler
  (its allocation events, summed in time order: the allocator's live bytes), within 10 %;
* step time: the plan for one CPU core vs the CPU time of real steps (a loose band: the machine is
  shared; BENCHMARKS.md has the ratios);
* checkpoint size: vs the files a real Trainer writes (ZeRO-1 and ZeRO-3), within 10 %;
* every recipe plans; ViT-H/14 on a T4 without checkpointing does not fit, names fixes, and each
  fix, applied, fits; bad input gets one clear error line; the docs' commands run as written.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from model import TimmSpec, ViTSpec, build_network  # noqa: E402
from orchestration.experiment import RECIPES, apply_overrides, get_recipe  # noqa: E402
from orchestration.planning import default_facts, get_device, plan  # noqa: E402
from orchestration.planning import trace as tr  # noqa: E402
from orchestration.planning.dataset import DataFacts  # noqa: E402
from orchestration.planning.memory import model_states  # noqa: E402
from training.objectives import BEiTConfig, ClassificationConfig, MAEConfig, objective_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = DataFacts(images=256, classes=10, sample_bytes=1000.0, shards=4, source="test")


def _ratio(est: float, measured: float) -> float:
    return est / measured


# ----------------------------------------------------------------------------- model states vs DeepSpeed
@pytest.mark.parametrize("variant", ["B/16", "L/16", "H/14"])
def test_model_state_bytes_match_deepspeeds_estimators(variant: str) -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    net = ViTSpec(variant=variant).config(num_classes=21843, image_size=224)
    t = tr.trace_model(net, ClassificationConfig(), "bf16", 1)
    for gpus in (1, 8, 64, 512):
        per_node, nodes = min(gpus, 8), max(gpus // 8, 1)
        for offload in (False, True):
            kw = dict(num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=offload)
            ds2 = estimate_zero2_model_states_mem_needs(t.params, **kw)[1]
            ds3 = estimate_zero3_model_states_mem_needs(t.params, t.largest_layer, cpu_offload_params=False, **kw)[1]
            for zero, ds in ((2, ds2), (3, ds3)):
                ours = model_states(t.params, t.largest_layer, zero=zero, precision="bf16", workers=gpus,
                                    offload="cpu" if offload else "none").peak
                assert 0.9 <= _ratio(ours, ds) <= 1.1, (variant, gpus, offload, zero, ours, ds)


# ----------------------------------------------------------------------------- activations vs a real CPU run
def _profiled_peak(net: object, objective_cfg: object, batch: int, checkpointing: bool) -> int:
    """Peak live bytes of a real CPU forward + backward, from torch's profiler (allocations and
    frees, in time order), with the same step and gradient handling as the trace."""
    torch.manual_seed(0)
    objective = objective_for(objective_cfg)  # type: ignore[arg-type]
    module = objective.wrap(build_network(net)).train()  # type: ignore[arg-type]
    module.set_grad_checkpointing(checkpointing)
    for p in (p for p in module.parameters() if p.requires_grad):  # BEiT's fine-tuning norm is frozen
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    step = tr.STEPS[objective_cfg.kind]  # type: ignore[attr-defined]
    return tr.profiled_peak_bytes(step, objective, module,  # type: ignore[arg-type]
                                  lambda: torch.randn(batch, net.in_chans, net.image_size, net.image_size), net)  # type: ignore[arg-type]


CASES = {
    "vit": (ViTSpec(variant="Ti/16", depth=3).config(num_classes=100, image_size=112), ClassificationConfig(), 8),
    "vit_sigmoid_dropout": (ViTSpec(variant="Ti/16", depth=3, dropout=0.1).config(num_classes=1000, image_size=112),
                            ClassificationConfig(loss="sigmoid"), 8),
    "mae": (ViTSpec(variant="Ti/16", depth=3, posemb="sincos2d").config(num_classes=0, image_size=112),
            MAEConfig(decoder_width=64, decoder_depth=2, decoder_heads=4, decoder_mlp_dim=256), 8),
    "swin": (TimmSpec(name="swin_tiny_patch4_window7_224", patch_size=2, embed_dim=(16,), depths=(1, 1),
                      num_heads=(1, 2), window_size=4).config(num_classes=10, image_size=32), ClassificationConfig(), 32),
    "beit": (TimmSpec(name="beit_base_patch16_224", patch_size=4, embed_dim=(32,), depths=(2,),
                      num_heads=(2,)).config(num_classes=0, image_size=32), BEiTConfig(mask_ratio=0.4, vocab_size=256, tokenizer="t"),
             16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_traced_activations_match_a_real_cpu_run(case: str) -> None:
    net, objective_cfg, batch = CASES[case]
    t = tr.trace_model(net, objective_cfg, "fp32", batch)
    full = _profiled_peak(net, objective_cfg, batch, checkpointing=False)
    ckpt = _profiled_peak(net, objective_cfg, batch, checkpointing=True)
    print(f"BENCH activations {case}: traced {t.activations} / {t.activations_ckpt} B, profiled {full} / {ckpt} B, "
          f"ratio {t.activations / full:.4f} / {t.activations_ckpt / ckpt:.4f}")
    assert 0.9 <= _ratio(t.activations, full) <= 1.1
    assert 0.9 <= _ratio(t.activations_ckpt, ckpt) <= 1.1
    assert ckpt < full  # checkpointing must save memory, or the "fix" it names is not one


# ----------------------------------------------------------------------------- step time on one CPU core
def test_cpu_step_time_is_the_right_order_of_magnitude() -> None:
    exp = apply_overrides(get_recipe("vit_mu_smoke"), ["model.variant=Ti/16", "image_size=112", "train.micro_batch=8",
                                                       "train.global_batch=8", "resources.workers=1"])
    p = plan(exp, get_device("cpu"), gpus=1, data=TINY_DATA)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_network(exp.model_config(num_classes=10))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = torch.randn(8, 3, 112, 112), torch.randint(0, 10, (8,))
        times = []
        for i in range(4):
            t0 = time.thread_time()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if i:  # the first step warms up
                times.append(time.thread_time() - t0)
    finally:
        torch.set_num_threads(threads)
    measured = sorted(times)[len(times) // 2]
    print(f"BENCH cpu step Ti/16 112px b8: planned {p.step_s * 1e3:.0f} ms, measured {measured * 1e3:.0f} ms CPU, "
          f"ratio {p.step_s / measured:.2f}")
    assert 0.4 <= p.step_s / measured <= 2.5


# ----------------------------------------------------------------------------- checkpoint size vs a real Trainer
def test_checkpoint_size_matches_a_real_trainer_checkpoint(tmp_path: Path) -> None:
    from test_training_dist import ListSink, MemLoader, make_cfg

    from model import create_model
    from training import Trainer

    for stage in (1, 3):
        exp = apply_overrides(get_recipe("vit_mu_smoke"), [
            "model.variant=Ti/8", "train.micro_batch=4", "train.global_batch=4", "resources.workers=1",
            f"train.engine.zero_stage={stage}"])
        p = plan(exp, get_device("cpu"), gpus=1, data=TINY_DATA)
        torch.manual_seed(0)
        cfg = make_cfg(stage, **{"schedule.total_steps": 2, "schedule.warmup_steps": 1, "checkpoint.every": 2,
                                 "global_batch": 4, "micro_batch": 4})
        root = tmp_path / f"z{stage}"
        trainer = Trainer(create_model("Ti/8", num_classes=10, image_size=32), cfg, MemLoader(0, 1, micro=4),
                          sink=ListSink(), checkpoint_dir=str(root), console=False)
        trainer.fit()
        written = sum(f.stat().st_size for f in (root / "step2").iterdir())
        planned = p.to_dict()["checkpoint"]["bytes"]
        print(f"BENCH checkpoint ZeRO-{stage} Ti/8: planned {planned} B, written {written} B, "
              f"ratio {planned / written:.4f}")
        assert 0.9 <= planned / written <= 1.1


# ----------------------------------------------------------------------------- every recipe, the fit and its fixes
def test_every_recipe_plans() -> None:
    for name in sorted(RECIPES):
        exp = get_recipe(name)
        device = get_device("t4" if exp.train.engine.precision == "fp16" else "h100")
        d = plan(exp, device, gpus=exp.resources.workers, data=default_facts(exp.dataset_name)).to_dict()
        assert d["memory"]["fits"], (name, d["memory"])  # every recipe was sized for its cards
        m, c = d["memory"], d["compute"]
        assert m["activations_checkpointed"] <= m["activations"] and m["peak"] > 0, name
        assert c["step_s"] > 0 and c["flops_per_image"] > 0 and d["checkpoint"]["bytes"] > 0, name
        json.dumps(d)  # the CLI's JSON


def test_h14_on_a_t4_does_not_fit_and_every_fix_it_names_does() -> None:
    base = apply_overrides(get_recipe("vit_h14_jft"), ["train.engine.precision=fp16", "train.engine.zero_stage=0",
                                                       "train.engine.activation_checkpointing=false"])
    t4 = get_device("t4")
    p = plan(base, t4, gpus=1, data=default_facts("jft"))
    assert not p.memory.fits and p.memory.peak > 16e9
    fixes = p.to_dict()["fixes"]
    assert fixes, "a plan that does not fit must name a change that fits"
    named = " ".join(f["command"] for f in fixes)
    assert "activation_checkpointing=true" in named and "micro_batch" in named
    for f in fixes:
        fixed = plan(apply_overrides(base, f["set"]), t4, gpus=f["gpus"], data=default_facts("jft"), fixes=False)
        assert fixed.memory.fits, f
        assert fixed.memory.peak == pytest.approx(f["peak"])
    # ZeRO shards the states only over more than one GPU: on a 4-GPU T4 node ZeRO-1 does not fit, a higher stage does
    four = plan(apply_overrides(base, ["train.engine.zero_stage=1"]), t4, gpus=4, data=default_facts("jft"))
    assert not four.memory.fits
    assert any("zero_stage=3" in f["command"] for f in four.fixes)


def test_a_recipe_sized_for_small_cards_is_told_what_is_faster_on_big_ones() -> None:
    exp = get_recipe("vit_h14_jft")  # ZeRO-3 + checkpointing: on 80 GB cards neither is needed
    h100 = get_device("h100")
    p = plan(exp, h100, gpus=64, data=default_facts("jft"))
    assert p.memory.fits and p.speedups
    assert any("activation_checkpointing=false" in f["command"] for f in p.speedups)
    for f in p.speedups:
        faster = plan(apply_overrides(exp, f["set"]), h100, gpus=64, data=default_facts("jft"), fixes=False)
        assert faster.memory.fits and faster.step_s < 0.95 * p.step_s


# ----------------------------------------------------------------------------- the CLI
def test_bad_input_gets_one_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from orchestration.plan import main

    cases = [
        (["--recipe", "vit_b16_i21k", "--gpu", "v100"], "unknown --gpu 'v100'; choose one of h100"),
        (["--recipe", "vit_b16_i21k", "--gpus", "0"], "--gpus 0: need at least 1"),
        (["--recipe", "vit_b99"], "unknown --recipe 'vit_b99'; valid recipes:"),
        (["--recipe", "vit_b16_i21k", "--set", "train.engine.zero_stage=5"], "zero_stage"),
        (["--recipe", "vit_b16_i21k", "--gpus", "3"], "cannot be split evenly over 3 GPUs"),
        (["--recipe", "vit_b16_i21k", "--gpu", "t4"], "set train.engine.precision=fp16"),
        (["--recipe", "vit_b16_i21k", "--data", str(tmp_path / "none")], "no such folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_the_documented_commands_run_as_written(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Every ``python orchestration/plan.py ...`` line of README.md and docs/planning.md, run as written
    (in process; ``--json`` paths go to a temporary folder, ``--data`` to a digits dataset written here,
    whose index must give the plan its bytes per sample and classes)."""
    import pyarrow.parquet as pq

    from orchestration.plan import main
    from pipeline import write_dataset
    from pipeline.demo_data import make_digits_folder

    data = tmp_path / "digits-shards"
    write_dataset(make_digits_folder(tmp_path / "digits", image_size=16, limit=200), str(data), val_fraction=0.2,
                  samples_per_shard=40, workers=1, progress=False)
    index = pq.read_table(next(data.glob("versions/*/index.parquet"))).to_pylist()
    train = [r for r in index if r["split"] == "train"]
    mean_bytes = sum(r["bytes"] for r in train) / sum(r["samples"] for r in train)

    commands = []
    for doc in (ROOT / "README.md", ROOT / "docs" / "planning.md"):
        text = doc.read_text().replace("\\\n", " ")
        commands += re.findall(r"^\s*python orchestration/plan\.py (.+)$", text, flags=re.M)
    assert len(commands) >= 3, commands
    for line in commands:
        argv = shlex.split(line.split("#")[0])
        argv = [str(tmp_path / Path(a).name) if i and argv[i - 1] == "--json" else
                str(data) if i and argv[i - 1] == "--data" else a for i, a in enumerate(argv)]
        assert main([*argv, "--json", str(tmp_path / "last.json")]) == 0, line
        out = capsys.readouterr().out
        result = json.loads(out.strip().splitlines()[-1].removeprefix("VITSCALE_RESULT "))
        assert result["gpu_hours"] > 0, line
        if "--data" in argv:
            d = json.loads((tmp_path / "last.json").read_text())["data"]
            assert d["sample_bytes"] == pytest.approx(mean_bytes) and d["classes"] == 10 and d["shards"] == len(train)
