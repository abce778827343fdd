"""Checkpoints are verified (issue #32, finding 4): every file's size and sha256 in complete.json.

A damaged newest checkpoint (a flipped bit in the ZeRO optimizer state, a truncated model-state
file, a deleted optimizer file, a damaged trainer_rank0.json) is reported naming the file and
what is wrong; `resume="auto"` falls back to the newest intact checkpoint, says how many steps
that loses, and the run finishes exactly as a clean resume from that checkpoint would. A step
can be resumed by number (`resume=2`, `--resume 2`); newer checkpoints are then set aside. A
checkpoint committed before checksums existed loads with a warning. Two gloo ranks on two
"nodes" (each its own staging root, one store) agree on the outcome whichever rank finds the
damage. The worker side of that case is this file's `main()`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

TOTAL, EVERY = 6, 2
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


def _cfg() -> Any:
    from test_training_dist import make_cfg

    return make_cfg(1, **{"schedule.total_steps": TOTAL, "checkpoint.every": EVERY})


def _trainer(root: Path, rank: int = 0, world: int = 1, store: Any = None) -> Any:
    from test_training_dist import ListSink, MemLoader, make_model

    from training import Trainer

    return Trainer(make_model(), _cfg(), MemLoader(rank, world), sink=ListSink(), checkpoint_dir=str(root),
                   checkpoint_store=store)


def _weights(trainer: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}


def flip_tensor_bit(path: Path) -> None:
    """Flip one exponent bit of an fp32 value in the largest tensor stored in a torch zip file
    (not in its zip or pickle structure: torch.load reads such a file without complaint)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len  # stored uncompressed: the tensor's bytes
    data[start + (info.file_size // 2 & ~3) + 3] ^= 0x20
    path.write_bytes(data)


# ---------------------------------------------------------------------------- worker side (2 ranks)
def scenario_two_nodes(out: Path, rank: int) -> None:
    """Each rank its own "node" (local rank 0, own staging root), one store. (a) The manifest
    holds both nodes' files; (b) a flipped bit in rank 1's optimizer file in the store is found
    on both nodes, both fall back to step 2 and finish; (c) an old-layout checkpoint whose
    trainer_rank1.json is damaged: only rank 1 reads that file, both fall back."""
    import torch.distributed as dist

    from training.checkpoint import LocalDirStore

    os.environ["LOCAL_RANK"] = "0"
    store_root = out / "store"
    store = LocalDirStore(store_root)
    trainer = _trainer(out / f"node{rank}", rank, 2, store)
    trainer.fit(max_steps=4)
    record: dict[str, Any] = {"files": sorted(json.loads((store_root / "step4" / "complete.json").read_text())["files"])}
    dist.barrier()
    if rank == 0:
        flip_tensor_bit(store_root / "step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    dist.barrier()
    record["restored"] = (trainer.restore("auto"), trainer.step)
    record["final"] = trainer.fit()["step"]
    dist.barrier()
    if rank == 0:  # step6 as an older vitscale wrote it (no checksums), with rank 1's state damaged
        marker = json.loads((store_root / "step6" / "complete.json").read_text())
        (store_root / "step6" / "complete.json").write_text(json.dumps({k: v for k, v in marker.items() if k != "files"}))
        (store_root / "step6" / "trainer_rank1.json").write_text('{"step": 6, "loader": ')
    dist.barrier()
    record["old_layout"] = (trainer.restore("auto"), trainer.step)
    (out / f"two_nodes_r{rank}.json").write_text(json.dumps(record))


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    assert scenario == "two_nodes", scenario
    scenario_two_nodes(out, int(os.environ["RANK"]))


# ---------------------------------------------------------------------------- test side
@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Checkpoints step2 and step4 of one run, and the final weights of a clean resume from step2."""
    tmp = tmp_path_factory.mktemp("ckpt_integrity")
    trainer = _trainer(tmp / "pristine")
    trainer.fit(max_steps=4)
    ref = _trainer(_copy(tmp / "pristine", tmp / "clean_from_step2"))
    assert ref.restore("step2") and ref.step == 2
    assert ref.fit()["step"] == TOTAL
    return {"root": tmp / "pristine", "final": _weights(ref)}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip_optim(tag: Path) -> None:
    flip_tensor_bit(tag / OPTIM)


def _truncate_model(tag: Path) -> None:
    p = tag / MODEL
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _delete_optim(tag: Path) -> None:
    (tag / OPTIM).unlink()


def _damage_rank_json(tag: Path) -> None:
    p = tag / "trainer_rank0.json"
    p.write_text(p.read_text().replace('"step": 4', '"step": 5'))  # valid JSON, wrong contents


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "bit_flip_in_optim_states": (_flip_optim, rf"step4/{OPTIM}: sha256 \w+\.\.\. differs from the \w+\.\.\. recorded at "
                                              r"commit \(same size: its contents changed\)"),
    "truncated_model_states": (_truncate_model, rf"step4/{MODEL}: \d+ bytes, \d+ recorded at commit \(truncated\)"),
    "deleted_optim_file": (_delete_optim, rf"step4/{OPTIM}: missing \(\d+ bytes recorded at commit\)"),
    "damaged_trainer_rank_json": (_damage_rank_json, r"step4/trainer_rank0.json: sha256 .* its contents changed"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_named_and_the_run_falls_back(
        pristine: dict[str, Any], tmp_path: Path, capfd: pytest.CaptureFixture[str], case: str) -> None:
    damage, expected = DAMAGE[case]
    root = _copy(pristine["root"], tmp_path / "ck")
    damage(root / "step4")
    trainer = _trainer(root)
    capfd.readouterr()
    assert trainer.restore("auto") is True
    err = capfd.readouterr().err
    assert trainer.step == 2, f"resumed step {trainer.step}, not the intact step2:\n{err}"
    assert re.search(r"checkpoint step4 is damaged: " + expected, err), err
    assert "resumed from step2, the newest intact checkpoint, instead of step4: 2 step(s) are lost" in err, err
    assert (root / "step4" / "superseded.json").is_file() and not (root / "step4" / "complete.json").exists()
    assert trainer.fit()["step"] == TOTAL
    final = _weights(trainer)
    assert all(torch.equal(final[k], v) for k, v in pristine["final"].items()), "differs from a clean resume from step2"
    from training.checkpoint import complete_tags, manifest_of, read_marker, verify

    assert complete_tags(root)[-1] == "step6"
    for tag in complete_tags(root):  # the run's new checkpoints are intact (step4 written again)
        verify(root / tag, manifest_of(read_marker(root / tag)))


@pytest.mark.integration
def test_resume_a_step_by_number(pristine: dict[str, Any], tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """`resume=2` loads step2 although step4 is intact; step4 is set aside, so a later "auto"
    continues the new history; an asked-for damaged step is refused naming the file."""
    from training.checkpoint import CheckpointDamaged, complete_tags

    root = _copy(pristine["root"], tmp_path / "ck")
    trainer = _trainer(root)
    result = trainer.fit(resume=2, max_steps=3)  # saves step3 at its stop
    assert trainer.step == 3 and result["step"] == 3
    assert complete_tags(root) == ["step2", "step3"], complete_tags(root)
    assert "checkpoint(s) step4, newer than step2, set aside" in capfd.readouterr().err
    again = _trainer(root)
    assert again.restore("auto") and again.step == 3  # the new history, not the abandoned step4
    _truncate_model(root / "step3")
    with pytest.raises(CheckpointDamaged, match=rf"step3/{MODEL}: .* \(truncated\)\. Resume another step"):
        _trainer(root).restore("3")
    _truncate_model(root / "step2")
    with pytest.raises(CheckpointDamaged, match=r"no intact checkpoint to resume from: checkpoint step3 is damaged: "
                                                r".*; checkpoint step2 is damaged: .*start a fresh run"):
        _trainer(root).restore("auto")


@pytest.mark.integration
def test_old_layout_checkpoint_loads_with_a_warning(pristine: dict[str, Any], tmp_path: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """complete.json without "files" (written before checksums): loaded, with a warning naming it;
    an unreadable file in one is still damage, named, and the run falls back."""
    root = _copy(pristine["root"], tmp_path / "ck")
    for tag in ("step2", "step4"):
        marker = json.loads((root / tag / "complete.json").read_text())
        (root / tag / "complete.json").write_text(json.dumps({k: v for k, v in marker.items() if k != "files"}))
    trainer = _trainer(root)
    capfd.readouterr()
    assert trainer.restore("auto") and trainer.step == 4
    assert "checkpoint step4 has no checksums" in capfd.readouterr().err
    _truncate_model(root / "step4")
    trainer = _trainer(root)
    assert trainer.restore("auto") and trainer.step == 2
    assert re.search(rf"checkpoint step4 is damaged: step4/{MODEL} cannot be read", capfd.readouterr().err)


@pytest.mark.integration
def test_two_ranks_agree_whichever_finds_the_damage(tmp_path: Path) -> None:
    from conftest import spawn_ranks, wait_ranks

    logs = [tmp_path / f"two_nodes_r{rank}.log" for rank in range(2)]
    procs = spawn_ranks([__file__, "two_nodes", str(tmp_path)], 2, lambda rank: logs[rank])
    wait_ranks(procs, lambda rank: logs[rank], time.monotonic() + 240, "two_nodes")
    records = [json.loads((tmp_path / f"two_nodes_r{r}.json").read_text()) for r in range(2)]
    log0 = logs[0].read_text()
    for rec in records:
        for rank in (0, 1):  # each node uploaded its own rank's files; the manifest has both
            assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in rec["files"], rec
            assert f"trainer_rank{rank}.json" in rec["files"], rec
        assert rec["restored"] == [True, 2] and rec["final"] == TOTAL, rec
        assert rec["old_layout"] == [True, 4], rec
    assert "step4/zero_pp_rank_1_mp_rank_00_optim_states.pt: sha256" in log0 and "found by rank(s) [0, 1]" in log0, log0
    assert "step6/trainer_rank1.json is not valid JSON" in log0 and "found by rank(s) [1])" in log0, log0


# ---------------------------------------------------------------------------- orchestration
@pytest.fixture(params=["local", "s3"])
def checkpoints_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "run" / "checkpoints")
    return f"s3://{request.getfixturevalue('s3_bucket')}/run/checkpoints"


def _fake_checkpoints(url: str, steps: list[int]) -> Any:
    from orchestration.launch.checkpoint_store import StorageCheckpointStore

    store = StorageCheckpointStore(url)
    for s in steps:
        store.write_text(f"step{s}/model.pt", "weights")
        store.write_text(f"step{s}/complete.json", json.dumps({"tag": f"step{s}", "step": s, "world_size": 1}))
    return store


def test_rewind_sets_newer_checkpoints_aside(checkpoints_url: str) -> None:
    from orchestration.launch.checkpoint_store import rewind_checkpoints
    from training.checkpoint import latest_remote

    store = _fake_checkpoints(checkpoints_url, [2, 4, 6])
    assert rewind_checkpoints(checkpoints_url, 2) == ["step4", "step6"]
    assert latest_remote(store) == "step2"
    assert store.read_text("step6/complete.json") is None and json.loads(store.read_text("step6/superseded.json"))["step"] == 6
    assert json.loads(store.read_text("latest_complete.json"))["tag"] == "step2"
    with pytest.raises(FileNotFoundError, match=r"no committed checkpoint step4 .* the committed ones are step2;"):
        rewind_checkpoints(checkpoints_url, 4)


def test_resume_flag_takes_auto_or_a_step(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestration import pretrain

    parse = pretrain.build_parser().parse_args
    assert parse(["--resume", "auto"]).resume == "auto"
    assert parse(["--resume", "500"]).resume == "500" and parse(["--resume", "step500"]).resume == "500"
    with pytest.raises(SystemExit):
        parse(["--resume", "latest"])
    assert "use auto or a checkpoint step such as 500" in capsys.readouterr().err


@pytest.mark.integration
def test_launch_resuming_a_missing_step_names_the_committed_ones(tmp_path: Path) -> None:
    """`--resume 7` continues the recipe's latest run; a step it never committed fails before Ray
    starts, naming the ones it has."""
    from orchestration import pretrain, tracking
    from orchestration.experiment import get_recipe
    from pipeline.storage import open_storage, url_join

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = str(tmp_path / "runs")
    exp = get_recipe("vit_mu_smoke")
    run_id = tracking.start_run("resume-step", run_name="first", tags={}, uri=uri)
    tracking.end_run(run_id, "FAILED", uri=uri)
    run_dir = url_join(storage, exp.name, run_id)
    open_storage(url_join(storage, exp.name)).write_bytes(
        "latest_run.json", json.dumps({"run_id": run_id, "run_dir": run_dir}).encode())
    _fake_checkpoints(url_join(run_dir, "checkpoints"), [2, 4])
    with pytest.raises(FileNotFoundError, match="no committed checkpoint step7 .* the committed ones are step2, step4"):
        pretrain.launch(exp, data_url=str(tmp_path / "no-data"), storage=storage, uri=uri,
                        experiment="resume-step", run_name="second", resume="7", register=False)
    client = tracking.client(uri)
    runs = client.search_runs([client.get_experiment_by_name("resume-step").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id], "a new run was started instead of continuing the latest"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
