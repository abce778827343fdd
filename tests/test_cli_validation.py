"""Issue #12 item 9: every CLI validates its whole configuration before Ray or MLflow start.

Each bad setting must exit 2 within seconds with one ``error:`` line naming the key/value, no
traceback, no Ray (in-process ``ray.is_initialized()``; ``connect_ray`` is replaced by a
tripwire so a setting that slips through fails fast instead of launching), no MLflow store
touched and ``latest_run.json`` unchanged. Bad settings given together are all reported.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestration import finetune, pretrain, sweep, visualize
from orchestration.studies.spec import StudySpec, trial_experiment

ROOT = Path(__file__).resolve().parents[1]
POINTER = b'{"run_id": "previous", "run_dir": "untouched"}'
#: "within a few seconds" for an in-process validation (imports are already done).
FAST_S = 5.0


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small local digits dataset: 160 train / 40 val samples, 10 classes."""
    from pipeline import write_dataset
    from pipeline.demo_data import make_digits_folder

    tmp = tmp_path_factory.mktemp("digits")
    folder = make_digits_folder(tmp / "folder", image_size=16, limit=200)
    write_dataset(folder, str(tmp / "ds"), val_fraction=0.2, samples_per_shard=100, workers=1, progress=False)
    return str(tmp / "ds")


class Guard:
    """The places a launch could leave a trace: the MLflow store, run storage, Ray."""

    def __init__(self, tmp: Path) -> None:
        self.db = tmp / "mlflow.db"
        self.storage = tmp / "runs"
        self.pointer = self.storage / "vit_mu_smoke" / "latest_run.json"
        self.pointer.parent.mkdir(parents=True)
        self.pointer.write_bytes(POINTER)

    def check(self, rc: int, err: str, out: str, needles: list[str], elapsed: float) -> None:
        import ray

        assert rc == 2, f"exit {rc}, stderr:\n{err}"
        assert "Traceback" not in err + out
        lines = err.strip().splitlines()
        assert lines and all(ln.startswith("error: ") for ln in lines), err
        for needle in needles:
            assert any(needle in ln for ln in lines), f"no line names {needle!r}:\n{err}"
        assert not ray.is_initialized()
        assert not self.db.exists(), "the MLflow store was opened"
        assert self.pointer.read_bytes() == POINTER, "latest_run.json was rewritten"
        assert elapsed < FAST_S, f"took {elapsed:.1f}s"


@pytest.fixture()
def guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Guard]:
    from orchestration.launch import cluster

    g = Guard(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{g.db}")
    monkeypatch.setenv("VITSCALE_STORAGE", str(g.storage))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def tripwire(*_: Any, **__: Any) -> str:
        raise AssertionError("validation let this through: Ray would start now")

    monkeypatch.setattr(cluster, "connect_ray", tripwire)
    yield g


def _run(main: Any, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str, float]:
    t0 = time.monotonic()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse and write_shards exit instead of returning
        rc = int(e.code or 0)
    elapsed = time.monotonic() - t0
    cap = capsys.readouterr()
    return rc, cap.err, cap.out, elapsed


# ---------------------------------------------------------------------------------------------
# pretrain: the 20 settings the probe found accepted
# ---------------------------------------------------------------------------------------------

PRETRAIN_BAD = [
    ("--data", "data.preprocess.std=0,0,0", "data.preprocess.std=(0.0, 0.0, 0.0)"),
    ("--data", "data.preprocess.eval_crop_pct=0", "data.preprocess.eval_crop_pct=0"),
    ("--data", "train.optim.lr=inf", "train.optim.lr=inf"),
    ("--data", "train.optim.lr=nan", "train.optim.lr=nan"),
    ("--data", "data.source.split=nosuch", "data.source.split='nosuch'"),
    ("--data", "eval.split=nosuch", "eval.split='nosuch'"),  # #23: checked before Ray too
    ("--data", "data.augment.crop_scale=1.0,0.5", "data.augment.crop_scale=(1.0, 0.5)"),
    ("--data", "data.augment.crop_scale=-0.5,1.0", "data.augment.crop_scale=(-0.5, 1.0)"),
    ("--data", "data.source.limit_samples=0", "data.source.limit_samples=0"),
    ("--data", "data.source.limit_samples=-5", "data.source.limit_samples=-5"),
    ("--data", "data.source.limit_samples=40", "split 'train' has 40 samples"),  # < 2 workers x batch 32
    ("--data", "data.io.read_retries=-1", "data.io.read_retries=-1"),
    ("--data", "data.io.prefetch_batches=0", "data.io.prefetch_batches=0"),
    ("--data", "data.preprocess.mean=nan,0.5,0.5", "data.preprocess.mean=(nan, 0.5, 0.5)"),
    ("--data", "image_size=-32", "image_size=-32"),
    ("--data", "resources.cpus_per_worker=0", "resources.cpus_per_worker=0"),
    ("--data", "resources.gpus_per_worker=-1", "resources.gpus_per_worker=-1"),
    ("--data", "resources.max_failures=-1", "resources.max_failures=-1"),
    ("--data", "name=../../x", "name='../../x'"),
    ("--data", "dataset_name=a/b", "dataset_name='a/b'"),
    ("missing", None, "--data"),  # a dataset folder that does not exist
]


@pytest.mark.parametrize(("data", "item", "needle"), PRETRAIN_BAD, ids=[x[1] or "missing-data" for x in PRETRAIN_BAD])
def test_pretrain_rejects_bad_setting_before_ray(
    data: str, item: str | None, needle: str, digits: str, guard: Guard, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = digits if data == "--data" else str(tmp_path / "no-such-dataset")
    argv = ["--recipe", "vit_mu_smoke", "--data", url] + (["--set", item] if item else [])
    rc, err, out, elapsed = _run(pretrain.main, argv, capsys)
    guard.check(rc, err, out, [needle], elapsed)


def test_pretrain_reports_every_problem_at_once(guard: Guard, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    items = ["train.optim.lr=inf", "data.preprocess.std=0,0,0", "resources.cpus_per_worker=0",
             "resources.max_failures=-1", "name=../../x", "train.optim.momentum=fast", "train.lrr=1"]
    argv = ["--recipe", "vit_mu_smoke", "--data", str(tmp_path / "nowhere")]
    for item in items:
        argv += ["--set", item]
    rc, err, out, elapsed = _run(pretrain.main, argv, capsys)
    needles = ["train.optim.lr=inf", "data.preprocess.std=", "resources.cpus_per_worker=0",
               "resources.max_failures=-1", "name='../../x'", "'fast'", "'train.lrr'", "--data"]
    guard.check(rc, err, out, needles, elapsed)
    assert len(err.strip().splitlines()) == len(needles), "one line per problem"


def test_pretrain_dry_run_of_a_valid_launch_passes(digits: str, guard: Guard, capsys: pytest.CaptureFixture[str]) -> None:
    rc = pretrain.main(["--recipe", "vit_mu_smoke", "--data", digits, "--set", "train.optim.lr=1e-3", "--dry-run"])
    assert rc == 0 and '"train.optim.lr": 0.001' in capsys.readouterr().out


def test_missing_s3_dataset_is_one_line(s3_bucket: str, guard: Guard, capsys: pytest.CaptureFixture[str]) -> None:
    for url in (f"s3://{s3_bucket}/nothing-here", "s3://no-such-bucket-vitscale/ds"):
        rc, err, out, elapsed = _run(pretrain.main, ["--recipe", "vit_mu_smoke", "--data", url], capsys)
        guard.check(rc, err, out, [f"--data {url}"], elapsed)


@pytest.mark.integration
def test_pretrain_script_exits_2_without_traceback(digits: str, tmp_path: Path) -> None:
    """The command users run (a fresh interpreter, no PYTHONPATH), several problems at once."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", VITSCALE_STORAGE=str(tmp_path / "runs"))
    cmd = [sys.executable, "orchestration/pretrain.py", "--recipe", "vit_mu_smoke", "--data", digits,
           "--set", "data.source.split=nosuch", "--set", "train.optim.lr=inf", "--set",
           "resources.gpus_per_worker=-1"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "train.optim.lr=inf" in p.stderr and "resources.gpus_per_worker=-1" in p.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# sweep: the 13 accepted settings (no --gpus-per-trial: Ray used to start before validating)
# ---------------------------------------------------------------------------------------------

SWEEP_BAD = [
    (["--batch-size", "0"], "batch_size=0"),
    (["--batch-size", "-8"], "batch_size=-8"),
    (["--image-size", "-32"], "image_size=-32"),
    (["--lr", "0"], "train.optim.lr=0.0"),
    (["--lr", "-0.001"], "train.optim.lr=-0.001"),
    (["--lr", "nan"], "train.optim.lr=nan"),
    (["--crop-min", "1.5"], "crop_scale=(1.5, 1.0)"),
    (["--study", "hparams", "--lr-range", "1e-2,1e-4"], "lr_range=(0.01, 0.0001)"),
    (["--study", "hparams", "--num-samples", "0"], "num_samples 0"),
    (["--weight-decay", "-0.1"], "weight_decay=-0.1"),
    (["--cpus-per-trial", "0"], "cpus_per_trial=0.0"),
    (["--gpus-per-trial", "-1"], "gpus_per_trial=-1.0"),
    (["--train-split", "nosuch"], "--train-split='nosuch'"),
    (["--eval-split", "nosuch"], "--eval-split='nosuch'"),
    (["--name", "../x"], "name='../x'"),
    (["--max-failures", "-1"], "max_failures -1"),
]


def _sweep_argv(data: str, tmp: Path, extra: list[str]) -> list[str]:
    return ["--variants", "mu", "--steps", "100", "--data", data, "--image-size", "16",
            "--storage", str(tmp / "studies"), *extra]


@pytest.mark.parametrize(("extra", "needle"), SWEEP_BAD, ids=[" ".join(x[0]) for x in SWEEP_BAD])
def test_sweep_rejects_bad_setting_before_ray(
    extra: list[str], needle: str, digits: str, guard: Guard, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    rc, err, out, elapsed = _run(sweep.main, _sweep_argv(digits, tmp_path, extra), capsys)
    guard.check(rc, err, out, [needle], elapsed)
    assert not (tmp_path / "studies").exists()


def test_sweep_reports_every_problem_at_once(digits: str, guard: Guard, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["--batch-size", "0", "--lr", "nan", "--crop-min", "1.5", "--cpus-per-trial", "0", "--name", "../x",
             "--hparams", str(tmp_path / "missing.json")]
    rc, err, out, elapsed = _run(sweep.main, _sweep_argv(str(tmp_path / "nowhere"), tmp_path, extra), capsys)
    guard.check(rc, err, out, ["batch_size=0", "train.optim.lr=nan", "crop_min", "cpus_per_trial=0.0", "name='../x'",
                               "--hparams", "--data"], elapsed)


def test_sweep_resume_with_other_settings_is_refused_before_ray(digits: str, guard: Guard, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    args = sweep.build_parser().parse_args(_sweep_argv(digits, tmp_path, ["--name", "s", "--lr", "1e-3"]))
    spec = sweep.spec_from_args(args)
    spec.analysis_dir.mkdir(parents=True)
    (spec.analysis_dir / "study.json").write_text(json.dumps({"study_run_id": None, "spec": spec.to_dict()}))
    argv = _sweep_argv(digits, tmp_path, ["--name", "s", "--lr", "3e-3", "--resume"])
    rc, err, out, elapsed = _run(sweep.main, argv, capsys)
    guard.check(rc, err, out, ["started with different settings (train.optim.lr)"], elapsed)


def test_sweep_trials_build_the_configs_that_were_validated() -> None:
    """The trial and the validation share one builder: what passed is what a trial runs."""
    args = sweep.build_parser().parse_args(["--variants", "mu", "--steps", "100", "--data", "/d", "--image-size", "16",
                                            "--batch-size", "32", "--crop-min", "0.5", "--lr", "2e-3"])
    spec = sweep.spec_from_args(args)
    exp = trial_experiment(spec, variant="mu", steps=100, samples=None, seed=1)  # what run_trial trains
    data, train = exp.data, exp.train
    assert data.augment.crop_scale == (0.5, 1.0) and data.batch_size == 32 and data.image_size == 16
    assert train.optim.lr == 2e-3 and train.global_batch == 32 and train.schedule.warmup_steps == 5
    assert train.schedule.total_steps == 100
    with pytest.raises(ValueError, match=r"train\.optim\.lr=nan must be a finite number"):
        StudySpec(name="t", overrides=("data.source.url=/d", "image_size=16", f"train.optim.lr={math.nan}"), variants=("mu",),
                  steps=(100,))


# ---------------------------------------------------------------------------------------------
# finetune: bad --from is one line; the --help example validates
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An initialised, empty sqlite MLflow store (schema creation is slow: done once)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def _source_model(path: Path) -> Path:
    from model import create_model
    from model.weights import save_weights

    save_weights(create_model("mu/4", num_classes=10, image_size=32), path)
    return path


@pytest.mark.parametrize("kind", ["missing-file", "garbage-file", "garbage-text", "unknown-name", "unknown-latest"])
def test_finetune_bad_from_is_one_line(kind: str, digits: str, registry: str, guard: Guard, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow import MlflowClient

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    source = {"missing-file": str(tmp_path / "none.safetensors"), "garbage-file": str(garbage),
              "garbage-text": "::not a model::", "unknown-name": "models:/no-such-model/3",
              "unknown-latest": "models:/no-such-model/latest"}[kind]
    argv = ["--from", source, "--data", digits, "--tracking-uri", registry, "--storage", str(guard.storage)]
    rc, err, out, elapsed = _run(finetune.main, argv, capsys)
    guard.check(rc, err, out, [f"--from {source}"], elapsed)
    assert len(err.strip().splitlines()) == 1
    assert MlflowClient(registry).search_runs(["0"]) == [], "no MLflow run was created"


def _help_example() -> list[str]:
    """The ``python orchestration/finetune.py`` example of finetune's --help, as argv."""
    lines = (finetune.__doc__ or "").splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("python orchestration/finetune.py"))
    text = ""
    for ln in lines[start:]:
        text += " " + ln.strip().rstrip("\\")
        if not ln.rstrip().endswith("\\"):
            break
    argv = shlex.split(text)
    assert argv[:2] == ["python", "orchestration/finetune.py"]
    return argv[2:]


def test_finetune_help_example_passes_validation(s3_endpoint: str, guard: Guard, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The example runs as written, with its registered model replaced by the same file."""
    import boto3

    from pipeline import write_dataset
    from pipeline.demo_data import make_digits_folder

    argv = _help_example()
    data = argv[argv.index("--data") + 1]
    assert data == "s3://vitscale/digits"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="vitscale")
    write_dataset(make_digits_folder(tmp_path / "folder", image_size=16, limit=200), data, val_fraction=0.2,
                  samples_per_shard=100, workers=1, progress=False)
    argv[argv.index("--from") + 1] = str(_source_model(tmp_path / "vit-mu4-digits.safetensors"))
    rc = finetune.main([*argv, "--gpus-per-worker", "0", "--dry-run"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert '"train.schedule.total_steps": 100' in cap.out and '"image_size": 48' in cap.out


# ---------------------------------------------------------------------------------------------
# visualize and write_shards
# ---------------------------------------------------------------------------------------------


def test_visualize_reports_all_bad_arguments(guard: Guard, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", str(tmp_path / "none.safetensors"), "--image", str(tmp_path / "none.jpg"),
            "--discard-ratio", "1.5", "--out", str(tmp_path / "out")]
    rc, err, out, elapsed = _run(visualize.main, argv, capsys)
    guard.check(rc, err, out, ["--model", "--image", "--discard-ratio 1.5"], elapsed)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["--samples-per-shard", "0"], "--samples-per-shard 0"),
    (["--shard-bytes", "-1"], "--shard-bytes -1"),
    (["--val-fraction", "1.0"], "--val-fraction 1.0"),
    (["--val-fraction", "nan"], "--val-fraction nan"),
    (["--quality", "0"], "--quality 0"),
    (["--max-side", "-5"], "--max-side -5"),
    (["--workers", "0"], "--workers 0"),
])
def test_write_shards_argument_ranges(args: list[str], needle: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline import write_shards

    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    rc, err, out, _ = _run(write_shards.main, [str(tmp_path / "src"), str(tmp_path / "dest"), *args], capsys)
    assert rc == 2 and "Traceback" not in err and needle in err, err
    assert not (tmp_path / "dest").exists()
