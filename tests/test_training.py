"""Unit tests of training/ that need no process group (config, schedule, losses, checkpoints)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training import (
    PROFILES,
    LocalDirStore,
    NullSink,
    TrainConfig,
    config_diff,
    deepspeed_config,
    export_weights,
    from_profile,
    get_profile,
    lr_at,
    mfu,
    param_groups,
)
from training import checkpoint as ckpt
from training.config import EngineConfig, OptimConfig, ScheduleConfig
from training.metrics import MetricsSink, peak_tflops
from training.objectives import ClassificationConfig
from training.objectives.classification import loss_fn, sigmoid_xent, softmax_xent

ROOT = Path(__file__).resolve().parents[1]


def test_accumulation_is_derived_and_checked() -> None:
    cfg = TrainConfig(global_batch=4096, micro_batch=32)
    assert cfg.accum_for(8) == 16
    with pytest.raises(ValueError, match=r"global_batch 4096 is not divisible by micro_batch 32 x world_size 3 = 96"):
        cfg.accum_for(3)
    fixed = TrainConfig(global_batch=4096, micro_batch=32, grad_accum=4)
    with pytest.raises(ValueError, match=r"4096 != micro_batch 32 x grad_accum 4 x world_size 8 = 1024; set grad_accum=16"):
        fixed.accum_for(8)
    assert fixed.accum_for(32) == 4


@pytest.mark.parametrize(
    "paths, message",
    [
        ({"global_batch": 100, "micro_batch": 32}, "global_batch 100 is not a multiple of micro_batch 32"),
        ({"engine.zero_stage": 4}, "engine.zero_stage=4 must be one of 0, 1, 2, 3"),
        ({"engine.precision": "fp8"}, "engine.precision='fp8' must be one of 'fp32', 'fp16', 'bf16'"),
        ({"schedule.warmup_steps": 10, "schedule.total_steps": 10},
         "schedule.warmup_steps=10 must be in [0, total_steps=10)"),
        ({"schedule.min_lr": 1.0, "optim.lr": 0.1}, "schedule.min_lr=1.0 must be <= optim.lr=0.1"),
        ({"objective.loss": "sigmoid", "objective.label_smoothing": 0.1},
         "objective: label_smoothing only applies to loss='softmax'"),
        ({"engine.offload": "cpu", "engine.zero_stage": 0}, "engine.offload='cpu' needs zero_stage >= 1"),
        ({"optim.lr": float("inf")}, "optim.lr=inf must be a finite number > 0"),
        ({"faults.hang_timeout_s": -1}, "faults.hang_timeout_s=-1 must be a finite number of seconds >= 0"),
    ],
)
def test_config_errors_name_the_path(paths: dict, message: str) -> None:
    with pytest.raises(ValueError, match="invalid TrainConfig") as e:
        TrainConfig().replace(**paths)
    assert message in str(e.value)


def test_every_problem_of_every_section_at_once_and_unknown_keys_suggest_the_path() -> None:
    with pytest.raises(ValueError) as e:
        TrainConfig().replace(**{"optim.lr": -1.0, "schedule.total_steps": 0, "seed": -1})
    lines = str(e.value).splitlines()[1:]
    assert [ln.split("=")[0].strip() for ln in lines] == ["optim.lr", "schedule.total_steps", "seed"]
    with pytest.raises(ValueError, match=r"unknown key 'lr'; did you mean optim.lr\?"):
        TrainConfig().replace(lr=1e-3)
    with pytest.raises(ValueError, match=r"unknown key 'optim.lrr'; did you mean optim.lr.*valid keys of 'optim'"):
        TrainConfig().replace(**{"optim.lrr": 1e-3})
    with pytest.raises(ValueError, match="unknown key 'optim'"):  # a section is not a leaf
        TrainConfig().replace(optim=1)


def test_config_hash_ignores_step_counts_and_diff_names_changes() -> None:
    a = TrainConfig(optim=OptimConfig(lr=1e-3), schedule=ScheduleConfig(total_steps=100))
    resumable = {"schedule.total_steps": 500, "log_every": 7, "checkpoint.every": 50, "faults.hang_timeout_s": 5.0}
    assert a.config_hash() == a.replace(**resumable).config_hash()
    b = a.replace(**{"optim.lr": 2e-3, "engine.zero_stage": 2})
    assert a.config_hash() != b.config_hash()
    assert config_diff(a.to_dict(), b.to_dict()) == ["engine.zero_stage: 1 -> 2", "optim.lr: 0.001 -> 0.002"]


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_lr_schedule_warmup_end_and_last_step(decay: str) -> None:
    cfg = TrainConfig(optim=OptimConfig(lr=1e-3), schedule=ScheduleConfig(min_lr=1e-5, warmup_steps=10, total_steps=100, decay=decay))
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)  # warmup ends exactly at the peak
    assert lr_at(cfg, 99) == pytest.approx(1e-5)  # last update at min_lr
    mid = lr_at(cfg, 54)  # halfway through the decay
    assert mid == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    lrs = [lr_at(cfg, s) for s in range(9, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_deepspeed_config_is_consistent() -> None:
    cfg = TrainConfig(global_batch=256, micro_batch=32, engine=EngineConfig(zero_stage=3, precision="bf16", offload="cpu"), optim=OptimConfig(grad_clip=1.0))
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 256 == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 1.0
    json.dumps(ds)


def test_profiles() -> None:
    t4 = from_profile("t4", **{"optim.lr": 1e-3})
    assert (t4.engine.precision, t4.engine.zero_stage, t4.micro_batch, t4.grad_accum, t4.global_batch) == (
        "fp16", 2, 32, 4, 128)
    ds = deepspeed_config(t4, world_size=1)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert from_profile("h100", global_batch=4096).engine.precision == "bf16"
    assert from_profile("t4", global_batch=4096).accum_for(1) == 128  # accumulation re-derived
    assert get_profile("auto").name in PROFILES
    with pytest.raises(ValueError, match="unknown profile 'tpu'"):
        get_profile("tpu")


def test_param_groups_skip_no_weight_decay() -> None:
    from model import create_model

    model = create_model("mu/8", num_classes=10, image_size=32)
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    decay = {names[id(p)] for p in groups[0]["params"]}
    assert set(model.no_weight_decay()) <= no_decay and {"pos_embed", "cls_token"} <= no_decay
    assert all(n.endswith("weight") for n in decay) and "head.weight" in decay
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_losses() -> None:
    logits = torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    hard = softmax_xent(logits, y)
    assert hard == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), abs=1e-6)
    soft = softmax_xent(logits, torch.nn.functional.one_hot(y, 5).float())  # mixup targets
    assert soft.item() == pytest.approx(hard.item(), abs=1e-6)
    smooth = softmax_xent(logits, y, 0.1)
    assert smooth.item() == pytest.approx(softmax_xent(logits, torch.nn.functional.one_hot(y, 5).float(), 0.1).item(), abs=1e-6)
    multi = torch.zeros(6, 5)
    multi[:, 1] = 1
    sig = sigmoid_xent(logits, multi)
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits, multi, reduction="sum") / 6
    assert sig.item() == pytest.approx(want.item(), abs=1e-5)
    assert loss_fn(ClassificationConfig(loss="sigmoid"), logits, y).item() == pytest.approx(
        sigmoid_xent(logits, torch.nn.functional.one_hot(y, 5).float()).item()
    )


def test_mfu_and_peaks() -> None:
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("Tesla T4", "fp16") == 65.0
    assert math.isnan(peak_tflops("cpu", "fp32"))
    assert mfu(1e12, 400.0, 800.0) == pytest.approx(0.5)
    assert math.isnan(mfu(1e12, 400.0, float("nan")))
    assert isinstance(NullSink(), MetricsSink)


def _fake_checkpoint(root: Path, step: int, complete: bool) -> None:
    d = root / ckpt.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        ckpt.commit(root, d.name, step, world_size=1)


def test_checkpoint_commit_prune_and_store(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    for step, complete in [(10, True), (20, True), (30, True), (40, False), (50, True), (60, False)]:
        _fake_checkpoint(root, step, complete)
    assert ckpt.latest_complete(root) == "step50"  # step60 is a crashed save
    assert json.loads((root / ckpt.POINTER).read_text())["tag"] == "step50"
    store = LocalDirStore(tmp_path / "remote")
    for tag in ckpt.complete_tags(root):
        store.upload_dir(str(root / tag), tag)
    assert ckpt.latest_remote(store) == "step50"
    deleted = ckpt.prune(root, keep=2, store=store)
    assert sorted(deleted) == ["step10", "step20", "step40"]
    assert ckpt.complete_tags(root) == ["step30", "step50"] and (root / "step60").is_dir()
    assert store.list_dirs() == ["step30", "step50"]
    store.download_dir("step50", str(tmp_path / "down"))
    assert ckpt.is_complete(tmp_path / "down")
    ckpt.prepare_tag_dir(root, "step50")  # re-saving a tag un-commits it first
    assert ckpt.latest_complete(root) == "step30"


def test_prune_keeps_what_the_store_has_committed(tmp_path: Path) -> None:
    """Multi-node: rank 0 now runs on a node whose staging folder holds step34 without a marker
    (that node only had rank 1's files; the marker went to the store from the old rank 0's node).
    Pruning after step300 must not delete step34 from the store: it is committed there."""
    root, store = tmp_path / "ck", LocalDirStore(tmp_path / "remote")
    for step in (34, 182):
        _fake_checkpoint(tmp_path / "old_rank0_node", step, complete=True)
        store.upload_dir(str(tmp_path / "old_rank0_node" / ckpt.tag_for(step)), ckpt.tag_for(step))
        _fake_checkpoint(root, step, complete=False)  # this node: its own rank's files only
    _fake_checkpoint(root, 300, complete=True)
    store.upload_dir(str(root / "step300"), "step300")
    assert ckpt.prune(root, keep=3, store=store) == []
    assert store.list_dirs() == ["step182", "step300", "step34"]
    assert sorted(ckpt.prune(root, keep=2, store=store)) == ["step34"]  # retention still applies
    assert store.list_dirs() == ["step182", "step300"] and not (root / "step34").exists()


def test_rng_state_roundtrip() -> None:
    import random

    state = ckpt.rng_state()
    a = (random.random(), torch.rand(3))
    ckpt.set_rng_state(state)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_export_weights_plain_module(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from model import create_model

    model = create_model("mu/8", num_classes=10, image_size=32)
    path = export_weights(model, tmp_path / "w.safetensors", dtype="bf16", metadata={"variant": "mu/8"})
    sd = load_file(path)
    assert sd.keys() == model.state_dict().keys() and sd["head.weight"].dtype == torch.bfloat16
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["variant"] == "mu/8"
    with pytest.raises(ValueError, match="dtype 'int8'"):
        export_weights(model, tmp_path / "x.safetensors", dtype="int8")


def test_layer_wise_lr_decay_follows_mae_and_beit() -> None:
    """MAE's util/lr_decay.py (from BEiT): embeddings layer 0, block i layer i + 1, the rest layer
    L + 1; scale decay ** (L + 1 - layer). Weight decay still skips 1-d params and no_weight_decay."""
    from model import create_model
    from training.optim import set_lr

    model = create_model("mu/4", num_classes=10, image_size=32)  # 2 blocks: 4 lr layers
    groups = param_groups(model, 0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    want = {"pos_embed": 0.125, "cls_token": 0.125, "patch_embed.proj.weight": 0.125,
            "blocks.0.attn.qkv.weight": 0.25, "blocks.1.mlp.fc2.bias": 0.5, "norm.weight": 1.0, "head.weight": 1.0}
    assert {n: scale_of[id(names[n])] for n in want} == want
    assert decay_of[id(names["blocks.0.attn.qkv.weight"])] == 0.05 and decay_of[id(names["pos_embed"])] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(names)
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_lr(opt, 2e-3)
    assert sorted({g["lr"] for g in opt.param_groups}) == [2.5e-4, 5e-4, 1e-3, 2e-3]
    assert all("lr_scale" not in g for g in param_groups(model, 0.05))  # off: two plain groups
    with pytest.raises(ValueError, match="optim.layer_decay=1.5 must be a finite number in"):
        TrainConfig().replace(**{"optim.layer_decay": 1.5})


def test_a_child_does_not_reuse_its_parents_one_process_rendezvous(tmp_path: Path) -> None:
    """A process that trained in-process (the 1-rank fallback of init_distributed) exports RANK,
    WORLD_SIZE, MASTER_PORT, ... and keeps listening on that port; a child it starts (a Tune trial,
    a CLI) inherits them. The child must pick its own port, not fail with EADDRINUSE (seen: every
    trial of a study started from such a process)."""
    import socket

    with socket.socket() as held:  # the parent's rendezvous port, still in use
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "VITSCALE_SOLO_DIST_PID": f"1:{port}", "DS_ACCELERATOR": "cpu",
               "PYTHONPATH": str(ROOT)}
        code = ("import os; from training.dist import init_distributed; d = init_distributed(); "
                "print(d.world_size, os.environ['MASTER_PORT'])")
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]
        world, used = out.stdout.split()[-2:]
        assert world == "1" and used != str(port)
        # A launcher (torchrun, Ray Train, a test's spawner) sets a rank's variables itself, with
        # its own port, under the same inherited marker: those are kept.
        mine = str(_free_port())
        out = subprocess.run([sys.executable, "-c", code], env={**env, "MASTER_PORT": mine}, cwd=ROOT,
                             capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == mine


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_group_init_distributed_made_is_destroyed_before_exit(tmp_path: Path) -> None:
    """Left to the interpreter's C++ teardown, rank 0 (host of the rendezvous store) once aborted
    after a successful run ("terminate called without an active exception", exit -6), which a job
    runner reads as a failure. The group is destroyed by an atexit hook: a hook registered before
    init_distributed runs after it and must find no group; one made by someone else is left alone."""
    from conftest import spawn_ranks, wait_ranks

    code = ("import atexit, sys, torch.distributed as dist\n"
            "from training.dist import init_distributed\n"
            "if sys.argv[1] == 'theirs':  # the owner destroys it, after the check below\n"
            "    atexit.register(dist.destroy_process_group)\n"
            "atexit.register(lambda: print('group at exit:', dist.is_initialized(), flush=True))\n"
            "if sys.argv[1] == 'theirs':\n"
            "    dist.init_process_group('gloo')\n"
            "d = init_distributed(); dist.barrier(); print('world', d.world_size, flush=True)\n")
    script = tmp_path / "ranks.py"
    script.write_text(code)
    for owner, left in (("ours", "False"), ("theirs", "True")):
        logs = [tmp_path / f"{owner}{rank}.log" for rank in range(2)]
        procs = spawn_ranks([str(script), owner], 2, lambda rank, logs=logs: logs[rank])
        wait_ranks(procs, lambda rank, logs=logs: logs[rank], time.monotonic() + 180, owner)
        for log in logs:
            text = log.read_text()
            assert "world 2" in text and f"group at exit: {left}" in text, text
