"""Issue #15: `TrainConfig.compile` (torch.compile inside the DeepSpeed engine) and fused AdamW.

The multi-process ZeRO 1/2/3 scenarios of test_training_dist.py run again with compile on
(`dpc`), and the same assertions hold: 2 ranks == 1 rank, resume == straight, NaN guard.
Backend `aot_eager` here: dynamo + AOTAutograd trace and run the graphs as inductor would, but
without generating and building C++ per graph, which would take minutes on a 2-core CI box;
inductor itself is what the GPU profiles use (and bench/train_step.py --compile on CPU).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import test_training_dist as td  # noqa: E402

from training.config import OptimConfig


@pytest.fixture(scope="module")
def compiled_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train_compiled")
    logs = {w: out / f"dpc{w}.log" for w in (1, 2)}
    procs = {w: td._spawn("dpc", out, w, logs[w]) for w in (2, 1)}
    for w, p in procs.items():
        codes = td._wait(p, logs[w], timeout=600)
        assert codes == [0] * w, f"dpc w{w} failed {codes}:\n" + "\n".join(td._tail(logs[w], r) for r in range(w))
    return out


@pytest.mark.integration
@pytest.mark.parametrize("stage", td.STAGES)
def test_compiled_two_ranks_match_one_rank(compiled_runs: Path, stage: int) -> None:
    for world in (1, 2):
        assert json.loads((compiled_runs / f"dp_w{world}.json").read_text())[str(stage)]["compiled"] is True
    td.test_two_ranks_match_one_rank(compiled_runs, stage)


@pytest.mark.integration
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", td.STAGES)
def test_compiled_resume_equals_straight(compiled_runs: Path, stage: int, world: int) -> None:
    td.test_resume_equals_straight(compiled_runs, stage, world)


@pytest.mark.integration
def test_compiled_nan_guard(compiled_runs: Path) -> None:
    for world in (1, 2):
        n = json.loads((compiled_runs / f"dp_w{world}.json").read_text())["nan"]
        assert n["bad_steps"] == 1 and n["step"] == 4 and all(v == v for v in n["losses"].values())


@pytest.mark.integration
def test_compile_keeps_keys_and_results(tmp_path: Path) -> None:
    """Same state_dict keys, checkpoint and exported weights with and without compile; a
    checkpoint written compiled resumes uncompiled; the losses agree to float tolerance."""

    from safetensors.torch import load_file

    from training import Trainer, export_weights

    cfg = td.make_cfg(1, **{"schedule.total_steps": 4, "checkpoint.every": 3})
    out = {}
    for compiled in (False, True):
        c = cfg.replace(**{"engine.compile": compiled, "engine.compile_backend": "aot_eager"})
        sink = td.ListSink()
        trainer = Trainer(td.make_model(), c, td.MemLoader(0, 1), sink=sink, checkpoint_dir=str(tmp_path / f"ck{compiled}"))
        trainer.fit()
        assert bool(trainer.engine.is_compiled) is compiled
        path = export_weights(trainer.engine, tmp_path / f"w{compiled}.safetensors")
        out[compiled] = (sink.losses(), load_file(path), sorted(p.name for p in (tmp_path / f"ck{compiled}" / "step4").iterdir()))
    (l0, w0, f0), (l1, w1, f1) = out[False], out[True]
    assert w0.keys() == w1.keys() and not any("_orig_mod" in k for k in w1)
    assert f0 == f1
    assert max(abs(l0[s] - l1[s]) for s in l0) < 1e-5, (l0, l1)
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=0, atol=1e-5)
    # a checkpoint written compiled resumes in an uncompiled Trainer (and the weights match)
    resumed = Trainer(td.make_model(), cfg.replace(**{"schedule.total_steps": 5}), td.MemLoader(0, 1),
                      checkpoint_dir=str(tmp_path / "ckTrue"))
    assert resumed.restore("auto") and resumed.step == 4  # the final checkpoint
    sd = resumed.engine.module.state_dict()
    for k in w1:
        torch.testing.assert_close(sd[k], w1[k], rtol=0, atol=0)


def test_gpu_profiles_compile_cpu_does_not() -> None:
    from training import PROFILES, from_profile

    assert {n: p.compile for n, p in PROFILES.items()} == {"cpu": False, "t4": True, "a100": True, "h100": True}
    assert from_profile("h100").engine.compile and not from_profile("cpu").engine.compile


def test_fused_adamw_matches_unfused() -> None:
    """build_optimizer gives the fused AdamW kernel (torch 2.14 has it on CPU as on CUDA); 20
    updates of a small net agree with the unfused (foreach) implementation to float tolerance."""
    from training import TrainConfig
    from training.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    start = [p.detach().clone() for p in nets[0].parameters()]
    cfg = TrainConfig(profile="cpu", optim=OptimConfig(lr=1e-2, weight_decay=0.1))
    fused = build_optimizer(cfg, param_groups(nets[0], cfg.optim.weight_decay), "cpu")
    assert all(g["fused"] for g in fused.param_groups)
    plain = torch.optim.AdamW(param_groups(nets[1], cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas,
                              eps=cfg.optim.eps,
                              foreach=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        for net, opt in zip(nets, (fused, plain), strict=True):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(a, b) for a, b in zip(nets[0].parameters(), start, strict=True))  # it trained
