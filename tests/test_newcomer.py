"""Issue #30, a newcomer's first hour: what a new user sees and where the project keeps its state.

* training prints its progress on the console (rank 0): start, first step, every ``log_every``
  steps with an ETA, a note when the run would take over an hour here, evals, checkpoints, a summary;
* one state dir (``$VITSCALE_HOME``, else ``<checkout>/.vitscale``) holds the MLflow store and runs;
  ``make services-up`` / ``services-down`` exist; ``.vitscale/`` is ignored by git;
* the registry's "not found" names the tracking store searched and what it has;
* a ``ray job submit`` copy of the checkout (no ``.git``) still records the commit;
* fine-tuning without a GPU is sized for minutes; no S3 credentials says how to get them;
* the compute-optimal size is named only where that size was measured; its legend covers nothing;
  the rollout overlay keeps the image bright and shows the attention in colour.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training import TrainConfig
from training.config import CheckpointConfig, ScheduleConfig
from training.progress import ConsoleProgress, duration

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


METRICS = {"loss": 2.3026, "lr": 1e-3, "images_per_s": 170.67, "data_wait_frac": 0.12}


# ---------------------------------------------------------------- console progress


def test_console_progress_lines_eta_and_long_run_note() -> None:
    cfg = TrainConfig(global_batch=512, micro_batch=32, log_every=10, profile="cpu",
                      schedule=ScheduleConfig(total_steps=10_000, warmup_steps=500))
    out, clock = io.StringIO(), Clock()
    con = ConsoleProgress(cfg, world_size=1, accum=16, device="cpu", out=out, clock=clock)
    con.started(0, 10_000)
    clock.t += 3.0
    con.stepped(1)
    con.stepped(2)  # only the first step gets a line
    clock.t += 27.0  # 10 steps in 30 s: 3 s/step
    con.logged(10, METRICS)
    clock.t += 10.0  # 10 more steps in 10 s: the ETA leaves the first window (warm-up) out
    con.logged(20, METRICS)
    con.evaluated(20, {"eval_top1": 0.5, "eval_loss": 1.25, "eval_samples": 359.0}, 4.2)
    con.evaluated(20, {"fewshot/digits/10shot": 0.75, "fewshot/seconds": 2.0}, 2.0, name="fewshot")
    con.saved(20, "step20", 0.5)
    clock.t += 5.0
    con.finished(20, {"loss": 1.5, "eval_top1": 0.5, "bad_steps": 0.0})
    lines = out.getvalue().splitlines()
    assert lines[0] == ("[train] steps 0 -> 10000 of 10000, on 1 x cpu (cpu profile, fp32, ZeRO-1); global batch "
                        "512 = micro 32 x accum 16 x 1 rank(s); a line every 10 steps")
    assert lines[1] == ("[train] step     1/10000: first step took 3.0s (warm-up included); ETA ~8h19m at this "
                        "speed; next line at step 10")
    assert lines[2] == ("[train] step    10/10000   0%  loss 2.303  lr 1.00e-03  170.7 img/s  data-wait 12%  "
                        "elapsed 30s  ETA 8h19m")
    # 15 minutes at 3 s/step: 300 steps; said once, after the first log window.
    assert lines[3] == ("[train] note: ETA 8h19m at the current speed (3 s/step); on this machine (cpu profile, cpu) "
                        "consider train.schedule.total_steps=300 (about 15m00s here; now 10000) or a smaller "
                        "train.global_batch (now 512), or a machine with a GPU")
    assert lines[4].endswith("elapsed 40s  ETA 2h46m")  # 1 s/step since the first line: 9980 s
    assert lines[5] == "[eval] step    20/10000  eval_top1 0.5  eval_loss 1.25  (359 samples, 4.2s)"
    assert lines[6] == "[fewshot] step    20/10000  fewshot/digits/10shot 0.75  (2.0s)"
    assert lines[7] == "[checkpoint] step    20/10000  step20 saved (0.5s)"
    assert lines[8] == ("[train] done: step 20/10000, 20 steps in 45s (2.25 s/step, 227.6 img/s), loss 1.5, "
                        "eval_top1 0.5, bad steps 0")
    assert len(lines) == 9


def test_console_progress_short_runs_get_no_note_and_other_ranks_print_nothing() -> None:
    cfg = TrainConfig(global_batch=8, micro_batch=8, log_every=5, schedule=ScheduleConfig(total_steps=100))
    out, clock = io.StringIO(), Clock()
    con = ConsoleProgress(cfg, world_size=2, accum=1, device="cpu", out=out, clock=clock)
    con.started(50, 100)  # resumed
    clock.t += 5.0
    con.stepped(51)
    con.logged(55, METRICS)
    text = out.getvalue()
    assert text.startswith("[train] resuming at step 50: steps 50 -> 100 of 100, on 2 x cpu")
    assert "note:" not in text and "ETA 45s" in text  # 1 s/step, 45 steps left
    quiet = io.StringIO()
    off = ConsoleProgress(cfg, world_size=2, accum=1, device="cpu", enabled=False, out=quiet, clock=clock)
    off.started(0, 100)
    off.logged(5, METRICS)
    off.finished(5, {"loss": 1.0})
    assert quiet.getvalue() == ""
    assert [duration(s) for s in (0.04, 9.9, 61, 3725, 200_000)] == ["0.0s", "9.9s", "1m01s", "1h02m", "2d07h"]


def test_trainer_prints_progress_on_rank0(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The Trainer itself (torchrun, the deepspeed launcher, Ray Train alike) prints the lines."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from test_training_sync import Loop

    from model import create_model
    from training import Trainer

    g = torch.Generator().manual_seed(1)
    eval_batch = (torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g),
                  torch.ones(6, dtype=torch.bool))
    cfg = TrainConfig(global_batch=8, micro_batch=4, profile="cpu", log_every=5, eval_every=10,
                      schedule=ScheduleConfig(total_steps=12, warmup_steps=2), checkpoint=CheckpointConfig(every=10))
    trainer = Trainer(create_model("mu/8", num_classes=10, image_size=32), cfg, Loop(4), eval_loader=[eval_batch],
                      checkpoint_dir=str(tmp_path / "ckpt"))
    capsys.readouterr()
    result = trainer.fit()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]
    assert lines[0].startswith("[train] steps 0 -> 12 of 12, on 1 x cpu (cpu profile, fp32, ZeRO-1); global batch 8 "
                               "= micro 4 x accum 2 x 1 rank(s)")
    assert lines[1].startswith("[train] step  1/12: first step took")
    steps = [int(m[1]) for ln in lines if (m := re.match(r"\[train\] step +(\d+)/12 +\d+%  loss ", ln))]
    assert steps == [5, 10, 12]
    assert [ln.split()[0] for ln in lines[4:8]] == ["[eval]", "[checkpoint]", "[train]", "[eval]"]
    assert re.fullmatch(r"\[eval\] step 10/12  eval_top1 [\d.]+  eval_loss [\d.]+  eval_top5 [\d.]+  "
                        r"\(6 samples, [\d.]+s\)", lines[4])
    assert lines[-1].startswith("[train] done: step 12/12, 12 steps in ")
    assert f"loss {result['loss']:.4g}" in lines[-1]


# ---------------------------------------------------------------- one state dir, the services


def test_state_dir_mlflow_store_and_run_storage_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from orchestration import state, tracking
    from orchestration.pretrain import build_parser

    for var in ("VITSCALE_HOME", "VITSCALE_STORAGE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    assert state.state_dir() == ROOT / ".vitscale"  # a source checkout keeps its state inside itself
    assert tracking.tracking_uri() == f"sqlite:///{ROOT / '.vitscale' / 'mlflow.db'}"
    assert state.default_storage() == str(ROOT / ".vitscale" / "runs")
    help_text = "".join(build_parser().format_help().split())  # argparse wraps long paths, at hyphens too
    assert "".join(str(ROOT / ".vitscale" / "runs").split()) in help_text and "export/model.safetensors" in help_text

    monkeypatch.setenv("VITSCALE_HOME", str(tmp_path / "home"))  # what env.sh exports
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert state.default_storage() == str(tmp_path / "home" / "runs")

    monkeypatch.delenv("VITSCALE_HOME")  # an installed package (no pyproject.toml next to it): ~/.vitscale
    monkeypatch.setattr(state, "PACKAGE_ROOT", tmp_path / "site-packages")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert state.state_dir() == tmp_path / "user" / ".vitscale"


def test_make_has_services_targets_and_git_ignores_the_state_dir() -> None:
    dry = subprocess.run(["make", "-n", "services-up", "services-down"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "bash infra/local/start_services.sh" in dry.stdout and "bash infra/local/stop_services.sh" in dry.stdout
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "-q", ".vitscale/mlflow.db"], cwd=ROOT, timeout=60)
    assert ignored.returncode == 0, ".vitscale/ must be in .gitignore (Ray's working_dir upload honours it too)"


# ---------------------------------------------------------------- registry, lineage


def test_registry_not_found_names_the_store_and_what_it_has(tmp_path: Path) -> None:
    from model import create_model
    from orchestration import tracking
    from orchestration.tracking.registry import store_name

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run("newcomer", run_name="r", uri=uri)
    tracking.log_and_register_model(create_model("mu/8", num_classes=10, image_size=32), run_id=run_id,
                                    name="vit-x", tags={}, uri=uri)
    assert tracking.resolve_model_source("models:/vit-x/1", uri)["version"] == 1
    cases = {
        "models:/vit-x/7": "registered model 'vit-x' has no version 7 (versions: 1)",
        "models:/vit-y/1": "registered model 'vit-y' not found (registered models there: vit-x)",
        "models:/vit-x@champion": "registered model 'vit-x' has no alias 'champion' (aliases: none)",
        "runs:/0123456789abcdef/model": "run '0123456789abcdef' not found",
    }
    for source, what in cases.items():
        with pytest.raises(LookupError) as e:
            tracking.resolve_model_source(source, uri)
        assert what in str(e.value) and f"in tracking store {uri}" in str(e.value), str(e.value)
    with pytest.raises(LookupError, match=f"has no version 7 .* in tracking store {re.escape(uri)}"):
        tracking.load_model("models:/vit-x/7", uri)
    tracking.client(uri).set_registered_model_alias("vit-x", "champion", "1")
    assert tracking.resolve_model_source("models:/vit-x@champion", uri)["uri"] == "models:/vit-x/1"
    assert "s3cret" not in store_name("http://user:s3cret@127.0.0.1:5000")


def test_git_commit_of_a_checkout_copy_without_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `ray job submit --working-dir .` runs: the checkout's files without .git."""
    from orchestration.tracking.runs import git_commit

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()
    copy = tmp_path / "working_dir"
    copy.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD", "orchestration", "pyproject.toml"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout
    subprocess.run(["tar", "-x", "-C", str(copy)], input=archive, check=True, timeout=60)
    for var in ("VITSCALE_CHECKOUT", "VITSCALE_GIT_COMMIT"):
        monkeypatch.delenv(var, raising=False)
    assert git_commit(copy) == "unknown"  # nothing to go by: said, not guessed
    monkeypatch.setenv("VITSCALE_CHECKOUT", str(ROOT))  # what the local services' env.sh gives every job
    assert git_commit(copy) == head
    (copy / "orchestration" / "state.py").write_text("# changed before submitting\n")
    assert git_commit(copy) == f"{head}+dirty"
    monkeypatch.setenv("VITSCALE_GIT_COMMIT", "abc123")  # a remote cluster: given in the job's runtime env
    assert git_commit(copy) == "abc123"


# ---------------------------------------------------------------- fine-tuning on CPU, S3 credentials


def test_finetune_without_gpu_is_sized_for_a_cpu() -> None:
    from model import ViTConfig
    from orchestration.finetune import finetune_experiment

    src = ViTConfig(image_size=32, patch_size=4, width=32, depth=2, heads=2, mlp_dim=64, num_classes=10)
    kw = {"image_size": 48, "source_recipe": "vit_mu_smoke", "dataset_name": "digits", "source_model_name": "vit-x"}
    cpu = finetune_experiment(src, gpus_per_worker=0, **kw).train
    gpu = finetune_experiment(src, gpus_per_worker=1, **kw).train
    assert (cpu.schedule.total_steps, cpu.global_batch, cpu.engine.precision) == (300, 64, "fp32")
    assert (gpu.schedule.total_steps, gpu.global_batch, gpu.engine.precision) == (10_000, 512, "bf16")  # the paper's


def test_no_s3_credentials_says_how_to_get_an_endpoint(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VITSCALE_"))}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    code = ("from pipeline.storage import open_storage\n"
            "for call in (lambda s: s.ensure_bucket(), lambda s: s.read_bytes('dataset.json')):\n"
            "    try:\n"
            "        call(open_storage('s3://vitscale/digits'))\n"
            "    except Exception as e:\n"
            "        print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120).stdout.splitlines()
    assert len(out) == 2, out
    for line in out:
        assert line.startswith("NoCredentialsStorageError no S3 credentials for ")
        assert "AWS_ENDPOINT_URL is not set" in line and "make services-up && source .vitscale/env.sh" in line


# ---------------------------------------------------------------- plots


def _curves() -> dict:
    from orchestration.studies.law import PowerLaw
    from orchestration.studies.sizes import SizeCurve

    # S's curve lies below B's everywhere, but S was only measured up to 1e12 FLOPs.
    s = SizeCurve("S", 10**6, PowerLaw(a=50.0, b=0.2, c=0.05, d=1e9), 6, (1e10, 1e12))
    b = SizeCurve("B", 10**8, PowerLaw(a=50.0, b=0.2, c=0.10, d=1e9), 6, (1e11, 1e14))
    return {"S": s, "B": b}


def test_optimal_size_is_only_named_where_that_size_was_measured() -> None:
    from orchestration.studies.sizes import measured_budgets, optimal_sizes

    curves = _curves()
    assert curves["S"].law(1e13) < curves["B"].law(1e13)  # an extrapolation S never reached
    budgets = np.array([1e10, 5e11, 1e13, 1e15])
    assert optimal_sizes(curves, budgets) == ["S", "S", "B", "B"]
    assert measured_budgets(curves, budgets).tolist() == [True, True, True, False]


def test_optimal_size_legend_covers_no_bar() -> None:
    import matplotlib.pyplot as plt

    from orchestration.studies.plots import optimal_size_figure

    fig = optimal_size_figure(_curves(), np.geomspace(1e10, 1e15, 200))
    fig.canvas.draw()
    ax = fig.axes[0].get_window_extent()
    legends = [*fig.legends, *[a.get_legend() for a in fig.axes if a.get_legend() is not None]]
    assert legends and all(not leg.get_window_extent().overlaps(ax) for leg in legends)
    assert all(0 <= v <= 1 for leg in legends for v in leg.get_window_extent().transformed(
        fig.transFigure.inverted()).extents), "the legend is cut off by the figure's edge"
    plt.close(fig)


def test_rollout_overlay_keeps_the_image_bright_and_shows_attention_in_colour() -> None:
    from orchestration.tracking.attention_figures import overlay

    img = np.full((8, 8, 3), 0.8)  # a grey digit stroke
    heat = np.zeros((8, 8))
    heat[2, 3] = 1.0
    out = overlay(img, heat)
    assert np.allclose(out[heat == 0], img[heat == 0])  # where the model does not look: the image itself
    hot = out[2, 3]
    assert hot.max() - hot.min() > 0.2  # colour, not grey
    assert out.mean() >= img.mean() * 0.95  # not dimmed
