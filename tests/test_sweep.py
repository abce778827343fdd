"""orchestration.studies + the sweep CLI: the study grid, points table logic, and (slow) a real interrupted sweep."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from model import vit_config
from model.flops import macs_per_image, train_flops_per_image
from orchestration.studies.points import StudySink, TrialInfo, best_hparams, make_point, points_from_rows
from orchestration.studies.spec import StudySpec, grid_size, param_space, parse_size, size_label, trial_key
from orchestration.studies.table import POINTS_SCHEMA
from orchestration.studies.tune_study import run_study
from orchestration.sweep import build_parser, spec_from_args
from training import JsonlSink

ROOT = Path(__file__).resolve().parents[1]


def _spec(*sets: str, **kw: object) -> StudySpec:
    """A study on the ``vit_study`` recipe; ``sets`` are extra ``--set`` overrides of it."""
    base: dict = dict(name="t", overrides=("data.source.url=/data", "image_size=32", *sets), variants=("mu", "Ti"),
                      steps=(100, 200))
    return StudySpec(**{**base, **kw})  # type: ignore[arg-type]


INFO = TrialInfo(study="t", trial="mu4_s100_nall_seed0", variant="mu/4", params=1234, steps=100, samples=None,
                 seed=0, lr=1e-3, weight_decay=0.05)


# ---------------------------------------------------------------- sizes, keys, the grid


def test_size_specs() -> None:
    assert parse_size("Ti", image_size=32) == ("Ti/4", {})
    assert parse_size("Ti", image_size=224) == ("Ti/16", {})
    assert parse_size("S", image_size=32, patch_size=8) == ("S/8", {})
    assert parse_size("B/16", image_size=224) == ("B/16", {})
    assert parse_size("mu/4:width=64:mlp_dim=128", image_size=16) == ("mu/4", {"width": 64, "mlp_dim": 128})
    assert size_label("mu:width=64", image_size=32) == "mu/4:width=64"
    with pytest.raises(ValueError, match="unknown ViT size 'XL'"):
        parse_size("XL", image_size=32)
    with pytest.raises(ValueError, match="override 'dropout=1' must be"):
        parse_size("mu:dropout=1", image_size=32)
    with pytest.raises(ValueError, match="image_size 30 is not divisible by patch size 4"):
        parse_size("mu/4", image_size=30)


def test_trial_key_is_stable_and_path_safe() -> None:
    assert trial_key("mu/4:width=64", 500, None, 0) == "mu4-width64_s500_nall_seed0"
    assert trial_key("B/16", 10, 1000, 2, "abc") == "B16_s10_n1000_seed2_abc"


def test_spec_validation_grid_and_round_trip() -> None:
    spec = _spec(samples=(400, None), seeds=2)
    assert grid_size(spec) == 2 * 2 * 2 * 2
    assert grid_size(_spec(study="hparams", num_samples=5)) == 10
    assert StudySpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.grid_hash() == _spec(samples=(400, None), seeds=2, storage="elsewhere").grid_hash()
    assert spec.grid_hash() != _spec(samples=(400, None), seeds=3).grid_hash()
    with pytest.raises(ValueError, match="variants is empty"):
        _spec(variants=())
    with pytest.raises(ValueError, match=r"samples \(10,\): each limit must be >= batch_size 64"):
        _spec(samples=(10,))
    with pytest.raises(ValueError, match="unknown ViT size"):
        _spec(variants=("mu", "Huge"))


def test_micro_batch_must_divide_the_batch() -> None:
    assert _spec("train.global_batch=64", "train.micro_batch=16").base.train.micro_batch == 16
    with pytest.raises(ValueError, match="global_batch 64 is not a multiple of micro_batch 24"):
        _spec("train.global_batch=64", "train.micro_batch=24")


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    spec = _spec("train.optim.lr=1e-3", storage=str(tmp_path))
    spec.analysis_dir.mkdir(parents=True)
    (spec.analysis_dir / "study.json").write_text(json.dumps({"study_run_id": None, "spec": spec.to_dict()}))
    changed = _spec("train.optim.lr=3e-3", storage=str(tmp_path))
    with pytest.raises(ValueError, match=r"started with different settings \(train\.optim\.lr\)"):
        run_study(changed, resume=True, tracking=False)  # before Ray starts


def test_param_space_axes() -> None:
    space = param_space(_spec(samples=(400, None), seeds=2), "run123")
    assert space["variant"] == {"grid_search": ["mu/4", "Ti/4"]}
    assert space["steps"] == {"grid_search": [100, 200]}
    assert space["samples"] == {"grid_search": [400, None]}
    assert space["seed"] == {"grid_search": [0, 1]}
    assert space["study_run_id"] == "run123" and space["spec"]["name"] == "t"
    hp_spec = _spec(study="hparams")
    assert [v for _, v in hp_spec.experiments()] == ["mu/4", "Ti/4"]  # ASHA ranks within one size
    assert [n for n, _ in hp_spec.experiments()] == ["t-mu4", "t-Ti4"]
    hp = param_space(hp_spec, None, "Ti/4")
    assert hp["variant"] == "Ti/4" and hp["steps"] == 200 and "lr" in hp and "weight_decay" in hp


def test_cli_arguments_make_a_spec(tmp_path: Path) -> None:
    hp = tmp_path / "best.json"
    hp.write_text(json.dumps({"mu/4": {"lr": 0.003, "weight_decay": 0.01, "eval_loss": 1.0}}))
    args = build_parser().parse_args(
        ["--variants", "mu,Ti", "--steps", "500,1000", "--data", "/d", "--samples", "400,all", "--seeds", "2",
         "--gpus-per-trial", "0", "--hparams", str(hp), "--storage", str(tmp_path)]
    )
    spec = spec_from_args(args)
    assert spec.steps == (500, 1000) and spec.samples == (400, None) and spec.seeds == 2
    assert spec.hparams == {"mu/4": {"lr": 0.003, "weight_decay": 0.01}}
    assert spec.name == f"scaling-{spec.grid_hash()}"  # same command -> same study (for --resume)
    assert spec.analysis_dir == tmp_path / f"{spec.name}-analysis"


# ---------------------------------------------------------------- points


def test_make_point_counts_images_and_flops() -> None:
    cfg = vit_config("mu/4", num_classes=10, image_size=32)
    fpi = train_flops_per_image(cfg)
    p = make_point(INFO, step=50, global_batch=64, flops_per_image=fpi,
                   eval_metrics={"eval_top1": 0.75, "eval_loss": 0.9, "eval_top5": 1.0})
    assert p["images"] == 50 * 64
    assert fpi == 3 * 2 * macs_per_image(cfg)  # forward + backward = 3 forwards, 2 FLOPs per MAC
    assert p["flops"] == pytest.approx(fpi * 3200)
    assert p["eval_error"] == pytest.approx(0.25) and p["eval_loss"] == 0.9
    assert set(p) == set(POINTS_SCHEMA.names)
    ml = make_point(INFO, step=1, global_batch=1, flops_per_image=1.0, eval_metrics={"eval_prec1": 0.6, "eval_loss": 1})
    assert ml["eval_error"] == pytest.approx(0.4)


def test_sink_forwards_everything_and_reports_only_evals(tmp_path: Path) -> None:
    reported: list[dict] = []
    inner = JsonlSink(tmp_path / "m.jsonl")
    sink = StudySink(INFO, global_batch=32, flops_per_image=1e6, report=reported.append, inner=inner)
    sink.log_params({"lr": 1e-3})
    sink.log_metrics({"loss": 2.0, "lr": 1e-3}, 10)
    sink.log_metrics({"eval_top1": 0.5, "eval_loss": 1.5}, 50)
    sink.close()
    assert [r["step"] for r in reported] == [50] and reported[0]["flops"] == 1e6 * 50 * 32
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines[1]["loss"] == 2.0 and lines[2]["eval_loss"] == 1.5
    assert lines[3]["images"] == 1600 and lines[3]["eval_error"] == 0.5  # the point, also to MLflow


def test_sink_persists_points_and_replays_them_after_a_resume() -> None:
    saved: list[list[dict]] = []
    first: list[dict] = []
    sink = StudySink(INFO, global_batch=32, flops_per_image=1.0, report=first.append,
                     persist=lambda pts: saved.append(json.loads(json.dumps(pts))))
    for step in (25, 50, 75):
        sink.log_metrics({"eval_top1": 0.5, "eval_loss": 1.0}, step)
    assert [p["step"] for p in saved[-1]] == [25, 50, 75]
    # The trial is interrupted; its newest committed checkpoint is step 50 (the save after the
    # eval at 75 never finished). The restarted trial re-reports 25 and 50, then trains on.
    again: list[dict] = []
    resumed = StudySink(INFO, global_batch=32, flops_per_image=1.0, report=again.append)
    resumed.replay(saved[-1], upto_step=50)
    resumed.log_metrics({"eval_top1": 0.6, "eval_loss": 0.9}, 75)
    assert [p["step"] for p in again] == [25, 50, 75] and again[-1]["eval_loss"] == 0.9


def test_points_from_rows_filters_dedupes_and_coerces() -> None:
    base = make_point(INFO, step=50, global_batch=32, flops_per_image=1.0, eval_metrics={"eval_top1": 0.5, "eval_loss": 1.0})
    rows = [
        {**base, "done": False, "training_iteration": 1, "samples": math.nan},  # pandas fills None with NaN
        {"trial": "x", "loss": 2.0},  # not a point
        {**base, "step": 100, "images": 3200, "eval_loss": 0.8, "params": 1234.0},  # pandas floats
        {**base, "eval_loss": 0.95},  # the same (trial, step) reported again after a restart: last wins
        {**base, "trial": "a_first", "samples": 400.0},
    ]
    table = points_from_rows(rows)
    assert table.schema == POINTS_SCHEMA
    got = table.to_pylist()
    assert [(r["trial"], r["step"]) for r in got] == [("a_first", 50), (INFO.trial, 50), (INFO.trial, 100)]
    assert got[1]["eval_loss"] == 0.95 and got[1]["samples"] is None and got[0]["samples"] == 400
    assert got[2]["params"] == 1234


def test_best_hparams_only_counts_trials_that_finished() -> None:
    def pt(trial: str, variant: str, step: int, loss: float, lr: float) -> dict:
        info = TrialInfo(study="h", trial=trial, variant=variant, params=1, steps=100, samples=None, seed=0,
                         lr=lr, weight_decay=0.1)
        return make_point(info, step=step, global_batch=1, flops_per_image=1.0,
                          eval_metrics={"eval_top1": 0.5, "eval_loss": loss})

    table = points_from_rows([
        pt("a", "mu/4", 100, 1.0, 1e-3), pt("b", "mu/4", 100, 0.7, 3e-3),
        pt("c", "mu/4", 25, 0.1, 1e-2),  # stopped early by ASHA: does not compete
        pt("d", "Ti/4", 100, 0.5, 1e-4),
    ])
    best = best_hparams(table)
    assert best["mu/4"]["lr"] == 3e-3 and best["mu/4"]["trial"] == "b"
    assert best["Ti/4"]["lr"] == 1e-4


# ---------------------------------------------------------------- a real sweep (slow)

# Three tiny sizes (1.3k, 20k, 0.2M parameters) at 16 px / patch 4 on the digits shards. At
# lr 2e-3 their eval losses at 150 and 300 steps were ~2.1 / 1.5 / 1.1 and ~1.8 / 0.95 / 0.45
# (two seeds), so "bigger is better at equal steps" holds with a wide margin.
SIZES = "mu/4:width=8:depth=1:mlp_dim=16,mu/4:width=32:mlp_dim=64,mu/4:width=96:depth=3:heads=4:mlp_dim=192"


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    from pipeline.demo_data import make_digits_folder

    tmp = tmp_path_factory.mktemp("digits")
    make_digits_folder(tmp / "folder", image_size=16)
    subprocess.run(
        [sys.executable, "-m", "pipeline.write_shards", str(tmp / "folder"), str(tmp / "shards"),
         "--val-fraction", "0.1", "--samples-per-shard", "400", "--workers", "1", "--quiet"],
        cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
    )
    return str(tmp / "shards")


def _trial_runs(client: object, exp_name: str) -> dict[str, object]:
    exp = client.get_experiment_by_name(exp_name)  # type: ignore[attr-defined]
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`vitscale.trial` != ''")  # type: ignore[attr-defined]
    return {r.data.tags["vitscale.trial"]: r for r in runs}


def _early_checkpointed_trials(trials_root: Path) -> list[str]:
    """Trial keys whose newest committed checkpoint is in the first half of their steps."""
    early = []
    for trial in trials_root.glob("*"):
        steps = re.search(r"_s(\d+)_n", trial.name)
        committed = [int(m.group(1)) for c in trial.glob("step*/complete.json")
                     if (m := re.fullmatch(r"step(\d+)", c.parent.name))]
        if steps and committed and max(committed) <= int(steps.group(1)) // 2:
            early.append(trial.name)
    return early


@pytest.mark.slow
@pytest.mark.integration
def test_scaling_sweep_on_digits_survives_interruption(tmp_path: Path, digits_shards: str) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # No PYTHONPATH: `python orchestration/sweep.py` must find the project by itself (and its
    # local Ray workers too).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "orchestration/sweep.py", "--study", "scaling", "--variants", SIZES,
           "--steps", "150,300", "--data", digits_shards, "--image-size", "16", "--batch-size", "32",
           "--lr", "2e-3", "--evals-per-trial", "3", "--crop-min", "0.6", "--no-hflip", "--loader-workers", "0",
           "--cpus-per-trial", "1", "--gpus-per-trial", "0", "--storage", str(tmp_path / "studies"),
           "--name", "digits", "--experiment", "sweep-test", "--n-boot", "20"]
    client = MlflowClient(tracking_uri=uri)
    t0 = time.monotonic()

    # 1. Start the study and interrupt it (Ctrl-C) once one trial finished and another is mid-run:
    # in its first half, with a committed checkpoint, so it resumes from a step > 0. A trial's
    # checkpoints are deleted when it finishes, so a checkpoint at step <= steps/2 on disk means
    # that trial still has >= steps/2 to go. Polled on the file system (fast), not MLflow: a digits
    # trial is short, and a slow poll once let the trial finish before the signal landed.
    trials_root = tmp_path / "studies" / "digits-trials"
    done: list[object] = []
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        while time.monotonic() - t0 < 300 and proc.poll() is None:
            if not done:
                time.sleep(0.5)
                done = [r for r in _trial_runs(client, "sweep-test").values() if r.info.status == "FINISHED"]
                continue
            if _early_checkpointed_trials(trials_root):
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.02)
        rc = proc.wait(timeout=120)
    first_log = (tmp_path / "first.log").read_text()
    failures = "\n".join(ln for ln in first_log.splitlines() if " failed: " in ln)[-6000:]
    assert rc == 130, f"{failures}\n{first_log[-3000:]}"  # "interrupted; run the same command with --resume"
    # What Tune recorded as finished must not run again (a trial stopped at its very last report
    # is not recorded so: it restarts, restores its final checkpoint and only re-reports).
    from ray.tune import ExperimentAnalysis

    state = ExperimentAnalysis(str(tmp_path / "studies" / "digits")).trials
    terminated = {trial_key(t.config["variant"], t.config["steps"], t.config["samples"], t.config["seed"])
                  for t in state if t.status == "TERMINATED"}
    runs = _trial_runs(client, "sweep-test")
    finished_before = {k: len(client.get_metric_history(runs[k].info.run_id, "eval_loss")) for k in terminated}
    assert 1 <= len(finished_before) < 6

    # 2. The same command refuses to start over; with --resume it finishes the rest.
    spec = spec_from_args(build_parser().parse_args(cmd[2:]))
    with pytest.raises(FileExistsError, match="pass --resume"):
        run_study(spec)  # checked before Ray starts or any run is created
    resumed = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]

    runs = _trial_runs(client, "sweep-test")
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs.values())
    for key, n in finished_before.items():  # finished trials were not re-run
        assert len(client.get_metric_history(runs[key].info.run_id, "eval_loss")) == n
        assert len(client.get_metric_history(runs[key].info.run_id, "resumed_from_step")) == 1
    resumed_from = [m.value for r in runs.values() for m in client.get_metric_history(r.info.run_id, "resumed_from_step")]
    assert max(resumed_from) > 0  # the interrupted trial continued from its checkpoint

    out = tmp_path / "studies" / "digits-analysis"
    table = pq.read_table(out / "points.parquet")
    rows = table.to_pylist()
    assert table.num_rows == 6 * 3 and len({(r["trial"], r["step"]) for r in rows}) == 18
    assert all(r["flops"] > 0 and r["images"] == r["step"] * 32 for r in rows)
    assert (out / "scaling_eval_error.png").stat().st_size > 10_000
    summary = json.loads((out / "fit_eval_error.json").read_text())
    assert summary["n_trials"] == 6 and ("frontier_fit" in summary or "error" in summary)

    # Larger models reach lower eval loss at equal steps.
    for steps in (150, 300):
        final = sorted((r["params"], r["eval_loss"]) for r in rows if r["steps"] == steps and r["step"] == steps)
        assert len(final) == 3
        losses = [loss for _, loss in final]
        assert losses[0] > losses[1] > losses[2], (steps, final)

    study = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id],
                               filter_string="tags.`vitscale.study` = 'digits' and tags.`vitscale.kind` = 'scaling'")
    assert len(study) == 1 and study[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {study[0].info.run_id}
    logged = {a.path for a in client.list_artifacts(study[0].info.run_id, "study")}
    assert {"study/points.parquet", "study/scaling_eval_error.png"} <= logged


@pytest.mark.slow
@pytest.mark.integration
def test_hparams_study_ranks_lr_within_each_size(tmp_path: Path, digits_shards: str) -> None:
    import ray
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = StudySpec(
        name="hp", study="hparams", variants=("mu/4:width=16:mlp_dim=32",), steps=(40,),
        overrides=(f"data.source.url={digits_shards}", "image_size=16", "train.global_batch=32", "train.micro_batch=32",
                   "data.augment.crop_scale=0.6,1.0", "data.augment.hflip=false", "data.io.num_workers=0"),
        evals_per_trial=2, num_samples=3, lr_range=(1e-4, 1e-2), storage=str(tmp_path / "studies"),
        experiment="hp-test", tracking_uri=uri,
    )
    try:
        result = run_study(spec)  # a local Ray instance, in this process
    finally:
        ray.shutdown()
    assert result.complete and not result.errored_trials
    best = json.loads(result.files["best_hparams"].read_text())
    assert set(best) == {"mu/4:width=16:mlp_dim=32"} and 1e-4 <= best["mu/4:width=16:mlp_dim=32"]["lr"] <= 1e-2
    runs = MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name("hp-test").experiment_id],
        filter_string="tags.`vitscale.trial` != ''")
    # ASHA stops trials by exiting them inside report(): they end KILLED (or FINISHED), never FAILED.
    assert len(runs) == 3 and {r.info.status for r in runs} <= {"FINISHED", "KILLED"}
    assert any(r.info.status == "FINISHED" for r in runs)
    assert not (tmp_path / "studies" / "hp-trials").exists()  # checkpoints of stopped trials removed
    assert "frontier_fit" not in result.summary["fit"]  # mixed learning rates: no law


def test_a_trial_is_the_base_recipe_with_overrides_and_set_works_on_sweeps(tmp_path: Path) -> None:
    """A sweep trial is an Experiment (the recipe + the study's --set + the trial's own overrides);
    the CLI's training flags are --set shorthands and leave the recipe's other values alone."""
    from orchestration.experiment import get_recipe
    from orchestration.studies.spec import trial_experiment

    args = build_parser().parse_args(
        ["--variants", "mu:width=32", "--steps", "200", "--data", "/d", "--image-size", "16", "--lr", "2e-3",
         "--set", "train.optim.grad_clip=0.5", "--set", "data.augment.randaugment=(2, 9)", "--storage", str(tmp_path)])
    spec = spec_from_args(args)
    exp = trial_experiment(spec, variant="mu/4:width=32", steps=200, samples=400, seed=3)
    recipe = get_recipe("vit_study")
    assert exp.train.optim.grad_clip == 0.5 and exp.data.augment.randaugment == (2, 9) and exp.train.optim.lr == 2e-3
    assert exp.train.optim.weight_decay == recipe.train.optim.weight_decay
    assert exp.data.augment.crop_scale == recipe.data.augment.crop_scale
    assert (exp.model.variant, exp.model.width, exp.image_size) == ("mu/4", 32, 16)
    assert (exp.train.schedule.total_steps, exp.train.seed, exp.data.seed, exp.data.source.limit_samples) == (
        200, 3, 3, 400)
    assert exp.train.schedule.warmup_steps == (
        200 * recipe.train.schedule.warmup_steps // recipe.train.schedule.total_steps)
    with pytest.raises(ValueError, match="unknown key 'train.lrr'"):
        spec_from_args(build_parser().parse_args(["--variants", "mu", "--steps", "10", "--data", "/d",
                                                  "--set", "train.lrr=1"]))


def test_a_stopped_trials_run_left_running_is_ended_killed(tmp_path: Path) -> None:
    """ASHA stops a trial inside report(); under load Tune removed its actor before the trial
    ended its MLflow run (seen in CI: a trial run left RUNNING). Once the Tune experiment is
    done the study ends such runs KILLED; its other runs and the study run are left alone."""
    from orchestration import tracking
    from orchestration.studies.tune_study import _close_stale_trial_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = tracking.start_run("stale", run_name="study", uri=uri)
    stale = tracking.start_run("stale", run_name="t0", parent_run_id=study, tags={"vitscale.trial": "t0"}, uri=uri)
    done = tracking.start_run("stale", run_name="t1", parent_run_id=study, tags={"vitscale.trial": "t1"}, uri=uri)
    tracking.end_run(done, "FINISHED", uri=uri)
    spec = StudySpec(name="s", variants=("mu/4",), steps=(10,), storage=str(tmp_path / "st"), tracking_uri=uri)
    _close_stale_trial_runs(spec, study)
    client = tracking.client(uri)
    assert client.get_run(stale).info.status == "KILLED"
    assert client.get_run(done).info.status == "FINISHED" and client.get_run(study).info.status == "RUNNING"
