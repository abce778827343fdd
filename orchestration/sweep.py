"""Scaling-law and hyper-parameter studies: a Ray Tune grid of full training runs.

``--study scaling`` runs every combination of model size × training length (× training-set
size × seed) as one Tune trial. Each trial is a complete single-process training run (a Tune
*function trainable* built by ``orchestration.launch.build.build_run``, like pre-training; world size 1) on the resources Tune gives it (``--cpus-per-trial`` / ``--gpus-per-trial``), so a
cluster of N GPUs runs N trials at once. At every evaluation (``--evals-per-trial`` times per
run) the trial reports a *point* to Tune and to its MLflow run: images seen, training FLOPs
(the objective's per-image count × images), eval loss and eval error (1 − top-1; none for an MAE
recipe, whose studies fit eval loss, the default ``--metric`` there, or a few-shot accuracy).

The driver collects all points into a Parquet table (``orchestration.studies.table.POINTS_SCHEMA``),
fits the saturating power law E = a·(C + d)^(−b) + c of Zhai et al. 2021 on the
compute-efficient frontier (``orchestration.studies.law``), draws the plots, and logs table, fit
and plots to the study's MLflow run; every trial is an MLflow run nested under it.

Every trial is an ``Experiment``: ``--recipe`` (default ``vit_study``) with ``--set`` overrides
(the same typed keys as ``pretrain.py --set``), then the trial's own size, length, data size and
seed. The training flags (``--lr``, ``--batch-size``, ``--crop-min``, ...) are shorthands for
``--set`` keys; what they leave unset is the recipe's value (no second copy of the defaults).

``--study hparams`` searches learning rate and weight decay per model size (log-uniform,
``--num-samples`` trials per size, at the longest ``--steps``) with ASHA early stopping on
eval loss, and writes ``best_hparams.json``; pass that file to a scaling study with
``--hparams`` so every size is trained at its own tuned setting (a fair comparison).

Interrupted studies resume with ``--resume`` (``tune.Tuner.restore``): finished trials are
not re-run, unfinished or errored trials continue from their newest Trainer checkpoint.

Examples::

    # laptop: digits shards, three tiny-to-small sizes, two lengths
    python orchestration/sweep.py --study scaling --variants mu,Ti,S --steps 500,1000,2000 \
        --data /tmp/digits-shards --image-size 32
    # cluster: submit the driver as a Ray job; storage must be shared by all nodes
    ray job submit --working-dir . -- python orchestration/sweep.py --study scaling \
        --variants Ti,S,B --steps 10000,30000,100000 --data s3://bucket/i21k \
        --image-size 224 --gpus-per-trial 1 --storage s3://bucket/studies --resume
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file (python orchestration/sweep.py, ray job submit -- ...)
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[1]))

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from orchestration.experiment import RECIPES, validation
from orchestration.studies.archs import split_variants
from orchestration.studies.spec import STUDIES, StudySpec, default_metric, grid_size
from orchestration.studies.table import METRICS
from orchestration.studies.tune_study import check_existing_study, run_study

log = logging.getLogger(__name__)

#: Training flags -> the ``--set`` keys they stand for (one source of every default: the recipe).
_FLAG_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("data.source.url",), "image_size": ("image_size",),
    "batch_size": ("train.global_batch", "train.micro_batch"), "micro_batch": ("train.micro_batch",),
    "lr": ("train.optim.lr",), "weight_decay": ("train.optim.weight_decay",),
    "warmup_frac": ("train.schedule.total_steps", "train.schedule.warmup_steps"),
    "decay": ("train.schedule.decay",), "train_split": ("data.source.split",), "eval_split": ("eval.split",),
    "crop_min": ("data.augment.crop_scale",), "hflip": ("data.augment.hflip",),
    "loader_workers": ("data.io.num_workers",), "fewshot_data": ("eval.fewshot_data",),
}
_WARMUP_BASE = 100_000  # --warmup-frac F: warmup_steps / total_steps = F, kept at every trial length


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _samples(text: str) -> tuple[int | None, ...]:
    return tuple(None if x in ("all", "none", "") else int(x) for x in text.split(","))


def _floats2(text: str) -> tuple[float, float]:
    lo, hi = (float(x) for x in text.split(","))
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python orchestration/sweep.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--study", choices=STUDIES, default="scaling")
    p.add_argument("--variants", required=True,
                   help="comma-separated sizes: mu,Ti,S,B[/patch][:width=..:depth=..:heads=..:mlp_dim=..], or "
                        "architectures timm:<name>[:field=value...] (docs/architectures.md)")
    p.add_argument("--steps", type=_ints, required=True, help="training lengths (optimizer steps), e.g. 500,1000")
    p.add_argument("--data", required=True, help="dataset URL (path, file:// or s3://) from pipeline.write_shards")
    p.add_argument("--recipe", default="vit_study", help=f"base recipe of every trial: {', '.join(sorted(RECIPES))}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="typed override of the base recipe, repeatable (as pretrain.py --set): train.optim.lr=3e-3")
    p.add_argument("--samples", type=_samples, default=(None,), help="training-set sizes, e.g. 400,all")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--patch-size", type=int, default=None, help="for sizes without /P (default: size//8 below 128 px, else 16)")
    p.add_argument("--evals-per-trial", type=int, default=4, help="points per trial")
    _recipe_flags(p)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=None, help="default: 1 when the cluster has GPUs")
    p.add_argument("--hparams", default=None, help="best_hparams.json of a --study hparams run")
    p.add_argument("--num-samples", type=int, default=8, help="hparams: trials per size")
    p.add_argument("--lr-range", type=_floats2, default=(1e-4, 1e-2))
    p.add_argument("--wd-range", type=_floats2, default=(1e-3, 0.3))
    p.add_argument("--name", default=None, help="study name (default: <study>-<hash of the grid>)")
    p.add_argument("--storage", default=os.environ.get("VITSCALE_STUDY_STORAGE", "studies"),
                   help="Tune storage: a path or s3:// URI every node can reach")
    p.add_argument("--out", default="", help="table/plots directory (default <storage>/<name>-analysis)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep trial checkpoints after they finish")
    p.add_argument("--experiment", default="vitscale-scaling", help="MLflow experiment")
    p.add_argument("--metric", default=None,
                   help=f"what the law is fitted to: {', '.join(METRICS)} or any logged metric, e.g. "
                        "fewshot/NAME/10shot (accuracies are fitted as 1 - accuracy); default eval_error, or "
                        "eval_loss for a recipe whose trials have no top-1 (an MAE recipe: its masked "
                        "reconstruction loss)")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--max-failures", type=int, default=1, help="Tune retries per trial")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study (tune.Tuner.restore)")
    p.add_argument("--address", default=None, help="Ray address (default $RAY_ADDRESS, else a local instance)")
    p.add_argument("--no-tracking", dest="tracking", action="store_false", help="no MLflow runs")
    return p


def _recipe_flags(p: argparse.ArgumentParser) -> None:
    """Shorthands for ``--set`` keys of the base recipe; unset (None) means the recipe's value."""
    g = p.add_argument_group("base recipe shorthands (default: the recipe's value)")
    g.add_argument("--image-size", type=int, help="= --set image_size=N")
    g.add_argument("--batch-size", type=int, help="global batch of every trial (= train.global_batch; also the "
                   "per-pass batch unless --micro-batch)")
    g.add_argument("--micro-batch", type=int, help="per forward pass (gradient accumulation) = train.micro_batch")
    g.add_argument("--lr", type=float, help="= train.optim.lr")
    g.add_argument("--weight-decay", type=float, help="= train.optim.weight_decay")
    g.add_argument("--warmup-frac", type=float, help="warmup as a fraction of each trial's steps")
    g.add_argument("--decay", choices=("linear", "cosine"), help="= train.schedule.decay")
    g.add_argument("--train-split", help="= data.source.split")
    g.add_argument("--eval-split", help="= eval_split")
    g.add_argument("--crop-min", type=float, help="RandomResizedCrop lower scale (= data.augment.crop_scale=X,1.0)")
    g.add_argument("--no-hflip", dest="hflip", action="store_false", default=None, help="= data.augment.hflip=false")
    g.add_argument("--loader-workers", type=int, help="= data.io.num_workers")
    g.add_argument("--fewshot-data", default=None, metavar="[NAME=]URL[,...]",
                   help="few-shot evaluation at every trial evaluation (= fewshot_data); then --metric "
                        "fewshot/NAME/10shot fits the law to few-shot accuracy")


def flag_overrides(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(flag name, its ``--set`` items) for every training flag given on the command line."""
    out: list[tuple[str, list[str]]] = []
    for dest, keys in _FLAG_KEYS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if dest == "crop_min":
            items = [f"data.augment.crop_scale={value!r},1.0"]
        elif dest == "warmup_frac":
            items = [f"train.schedule.total_steps={_WARMUP_BASE}",
                     f"train.schedule.warmup_steps={round(value * _WARMUP_BASE)}"]
        elif dest == "batch_size" and args.micro_batch is not None:
            items = [f"train.global_batch={value}"]
        else:
            items = [f"{k}={value}" for k in keys]
        out.append((f"{dest}={value!r}", items))
    return out


def _name_flags(lines: list[str], flags: list[tuple[str, list[str]]]) -> list[str]:
    """Prefix each problem line caused by a flag with that flag: ``batch_size=0: train.global_batch=0 ...``."""
    owner = {item.split("=", 1)[0]: flag for flag, items in flags for item in items}
    owner.update({f"data.{k}": owner[k] for k in ("image_size",) if k in owner})
    out = []
    for line in lines:
        key = line.split("=", 1)[0].split(" ", 1)[0]
        out.append(f"{owner[key]}: {line}" if key in owner else line)
    return out


def _cluster_gpus() -> float:
    """1 when the connected Ray cluster has GPUs, else 0 (0 when not connected: no Ray is started here)."""
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _read_hparams(path: str | None) -> dict[str, dict[str, float]]:
    """``best_hparams.json`` of an hparams study as ``{size: {"lr": .., "weight_decay": ..}}``."""
    if not path:
        return {}
    try:
        raw = json.loads(Path(path).read_text())
        return {str(v): {k: float(x[k]) for k in ("lr", "weight_decay")} for v, x in raw.items()}
    except (OSError, ValueError) as e:
        raise ValueError(f"--hparams {path}: {e}") from None
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"--hparams {path}: not a best_hparams.json ({{size: {{lr, weight_decay}}}}): "
                         f"{type(e).__name__} {e}") from None


def spec_from_args(args: argparse.Namespace) -> StudySpec:
    """StudySpec from parsed CLI arguments (raises ValueError listing every problem; no I/O but --hparams).

    Without ``--gpus-per-trial`` the GPUs per trial come from an already connected cluster, else 0;
    :func:`main` connects to Ray only after validation and then asks the cluster.
    """
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else _cluster_gpus()
    errors: list[str] = []
    try:
        hparams = _read_hparams(args.hparams)
    except ValueError as e:
        hparams, errors = {}, [str(e)]
    flags = flag_overrides(args)
    try:
        spec = _spec_of(args, gpus, hparams, [item for _, items in flags for item in items] + list(args.overrides))
    except ValueError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("invalid study")]
        raise ValueError("\n".join(["invalid study:", *_name_flags(lines, flags), *errors])) from None
    if errors:
        raise ValueError(errors[0])
    if not args.name:
        spec = dataclasses.replace(spec, name=f"{spec.study}-{spec.grid_hash()}")
    return spec


def _spec_of(args: argparse.Namespace, gpus: float, hparams: dict[str, dict[str, float]],
             overrides: list[str]) -> StudySpec:
    return StudySpec(
        name=args.name or "pending", study=args.study, recipe=args.recipe, overrides=tuple(overrides),
        variants=split_variants(args.variants), steps=args.steps, samples=args.samples,
        seeds=args.seeds, patch_size=args.patch_size, evals_per_trial=args.evals_per_trial,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=float(gpus), hparams=hparams,
        num_samples=args.num_samples, lr_range=args.lr_range, wd_range=args.wd_range, storage=args.storage,
        out_dir=args.out, keep_checkpoints=args.keep_checkpoints, experiment=args.experiment,
        metric=args.metric or default_metric(args.recipe), n_boot=args.n_boot, max_failures=args.max_failures,
    )


def check_study(args: argparse.Namespace) -> tuple[StudySpec | None, list[str]]:
    """The study and every problem with it and its dataset, before Ray or MLflow start."""
    from orchestration.evaluation.in_training import fewshot_data_problems
    from orchestration.studies.spec import trial_experiment

    spec, problems = None, []
    try:
        spec = spec_from_args(args)
    except ValueError as e:
        problems += validation.problems_of(e)
    if spec is None:
        return None, problems + validation.location_problems(args.data)
    limits = [x for x in spec.samples if x is not None]
    exp = trial_experiment(spec, variant=spec.variants[0], steps=max(spec.steps), samples=min(limits, default=None),
                           seed=0)
    problems += validation.dataset_problems(spec.data_url, exp.data, world_size=1, split_key="--train-split",
                                            loss=getattr(exp.train.objective, "loss", "softmax"),
                                            needs_labels=exp.train.objective.kind == "classification",
                                            eval_split=exp.eval.split, eval_key="--eval-split")
    problems += fewshot_data_problems(exp, key="--fewshot-data")
    if "://" not in spec.storage or spec.storage.startswith("file://"):
        problems += validation.storage_problems(spec.storage_path)
    try:
        check_existing_study(spec, args.resume)
    except (FileExistsError, ValueError) as e:
        problems.append(str(e))
    return spec, problems


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    from orchestration.launch import cluster

    spec, problems = check_study(args)
    if spec is None or problems:  # nothing started: no Ray, no MLflow run
        return validation.report(problems)
    if args.gpus_per_trial is None:  # only now ask the cluster (connecting may start a local Ray)
        cluster.connect_ray(args.address)
        spec = dataclasses.replace(spec, gpus_per_trial=_cluster_gpus())
    print(f"study {spec.name}: {grid_size(spec)} trials -> {spec.experiment_path}; analysis in {spec.analysis_dir}")
    try:
        result = run_study(spec, resume=args.resume, ray_address=args.address, tracking=args.tracking)
    except FileExistsError as e:  # created since check_study looked
        return validation.report([str(e)])
    for k, v in result.files.items():
        print(f"{k}: {v}")
    if not result.complete:
        print(f"study {spec.name} was interrupted ({result.summary['terminated']}/{grid_size(spec)} trials "
              "finished); run the same command with --resume to continue it", file=sys.stderr)
        return 130
    if result.errored_trials:
        print(f"{len(result.errored_trials)} trial(s) failed: {result.errored_trials}; rerun with --resume",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
