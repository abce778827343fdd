"""Pre-train a ViT recipe on Ray Train with DeepSpeed; track in MLflow; register the model.

Examples::

    # On a Ray cluster (the job's driver connects to it through $RAY_ADDRESS):
    ray job submit --working-dir . -- python orchestration/pretrain.py \\
        --recipe vit_b16_i21k --data s3://bucket/imagenet21k --storage s3://bucket/runs --resume auto

    # Directly (starts a private local Ray instance), with typed overrides:
    python orchestration/pretrain.py --recipe vit_mu_smoke --data s3://vitscale/digits \\
        --set train.schedule.total_steps=200 --set train.optim.lr=3e-3 --workers 2

Every ``--set`` key/value is checked against the config dataclasses before Ray starts
(``--dry-run`` stops right there and prints the resolved experiment). The run itself (MLflow
run, lease, Ray Train, registry; storage layout) is :func:`orchestration.launch.pretrain_run.launch`.

The last stdout line is ``VITSCALE_RESULT {json}`` (run id, registered name/version, metrics).
Exit status 4: a tokenizer run (docs/tokenizer.md) ended under its codebook-usage threshold; its
MLflow run is FAILED and nothing was registered (the ``error:`` line says what to change).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file (ray job submit -- python orchestration/pretrain.py)
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[1]))

import argparse
import json
import logging
import sys
from typing import Any

from orchestration import tracking
from orchestration.evaluation.in_training import fewshot_data_problems
from orchestration.experiment import (
    RECIPES,
    Experiment,
    OverrideError,
    apply_overrides,
    flatten_experiment,
    get_recipe,
    validation,
)
from orchestration.launch.lease import LeaseHeldError
from orchestration.launch.pretrain_run import RESULT_PREFIX, emit, launch
from orchestration.launch.tokenizer import CodebookUsageError
from orchestration.state import default_storage, state_dir

__all__ = ["RESULT_PREFIX", "build_parser", "check_launch", "default_storage", "emit", "launch", "main",
           "resolve_experiment"]
log = logging.getLogger("orchestration.pretrain")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orchestration/pretrain.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--recipe", help=f"recipe name: {', '.join(sorted(RECIPES))}")
    p.add_argument("--data", help="dataset URL (local path, file:// or s3://bucket/prefix) written by write_shards")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="typed override, repeatable: train.optim.lr=3e-4, data.batch_size=64, model.dropout=0.1, resources.workers=2",
    )
    p.add_argument("--fewshot-data", default=None, metavar="[NAME=]URL[,...]",
                   help="few-shot linear evaluation on these downstream datasets during training (every "
                        "--set eval.fewshot_every=N steps and at the end), logged as fewshot/<NAME>/<K>shot; "
                        "same as --set eval.fewshot_data=...")
    p.add_argument("--workers", type=_workers, default=None,
                   help="Ray Train workers (one per GPU), N or MIN-MAX for elastic training; keeps the global batch")
    p.add_argument("--resume", type=_resume, default=None, metavar="auto|STEP",
                   help="continue the recipe's latest run (same MLflow run) from its newest intact checkpoint "
                        "(auto; a damaged one is reported and skipped) or from checkpoint STEP (newer ones are "
                        "set aside)")
    p.add_argument("--force", action="store_true",
                   help="take over the run folder's lease if it has expired (its driver died without "
                        "releasing it); a live lease is never taken over")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: the recipe name)")
    p.add_argument("--storage", default=None, help="run storage root, path or s3:// (default $VITSCALE_STORAGE "
                   f"or {state_dir() / 'runs'}); must be shared by all nodes. A run's files: "
                   "<storage>/<recipe>/<run_id>/{checkpoints/,export/model.safetensors}")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
                   f"sqlite:///{state_dir() / 'mlflow.db'})")
    p.add_argument("--address", default=None, help="Ray address (default $RAY_ADDRESS; else a local Ray)")
    p.add_argument("--run-name", default=None, help="MLflow run name (default: <recipe>)")
    p.add_argument("--no-register", action="store_true", help="skip the model registry")
    p.add_argument("--summary-json", default=None, help="also write the result JSON to this file")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved experiment, then exit")
    p.add_argument("--list-recipes", action="store_true", help="print the recipe names and exit")
    return p


def _resume(text: str) -> str:
    """``--resume``: ``auto`` or a checkpoint step (``500`` or ``step500``), kept as text."""
    step = text.strip().removeprefix("step")
    if text.strip() == "auto" or step.isdigit():
        return "auto" if text.strip() == "auto" else str(int(step))
    raise argparse.ArgumentTypeError(f"{text!r}: use auto or a checkpoint step such as 500")


def _workers(text: str) -> int | str:
    """``--workers``: N (an int) or MIN-MAX (kept as text, parsed by :func:`resolve_experiment`)."""
    return int(text) if text.strip().isdigit() else text


def resolve_experiment(recipe: str, overrides: list[str], workers: int | str | None,
                       fewshot_data: str | None = None) -> Experiment:
    """Recipe + ``--set`` overrides + ``--workers`` (N or MIN-MAX) + ``--fewshot-data``, validated
    (raises OverrideError/ValueError)."""
    exp = get_recipe(recipe)
    if workers is not None:
        low, _, high = str(workers).partition("-")
        overrides = [*overrides, f"resources.workers={high or low}",
                     f"resources.min_workers={low if high else 'none'}"]
    if fewshot_data is not None:
        overrides = [*overrides, f"eval.fewshot_data={fewshot_data}"]
    return apply_overrides(exp, overrides)


def check_launch(args: argparse.Namespace) -> tuple[Experiment | None, list[str]]:
    """The resolved experiment and every problem with it, its dataset and its storage (no Ray, no MLflow)."""
    exp, problems = None, []
    try:
        exp = resolve_experiment(args.recipe, args.overrides, args.workers, args.fewshot_data)
    except (OverrideError, ValueError) as e:
        problems += validation.problems_of(e)
    problems += validation.experiment_data_problems(None if problems else exp, args.data)
    if exp is not None and not problems:  # downstream datasets: too few images per class fail here
        problems += fewshot_data_problems(exp)
    if exp is not None and not problems:  # a teacher / tokenizer: loads, no pickle, fits
        exp, problems = _checked_teacher(exp, args)
    problems += validation.storage_problems(args.storage or default_storage())
    return exp, problems


def _checked_teacher(exp: Experiment, args: argparse.Namespace) -> tuple[Experiment, list[str]]:
    """``exp`` with its objective's frozen model (a teacher, BEiT's tokenizer) pinned from a registry
    alias to a version, and that model's problems."""
    from orchestration.launch.teacher import FROZEN_FIELD, frozen_problems, pin_frozen

    try:
        exp = pin_frozen(exp, args.tracking_uri)
    except Exception as e:  # noqa: BLE001 - an unknown alias, an unreachable store: one line, before Ray
        field = FROZEN_FIELD.get(exp.train.objective.kind, "teacher")
        return exp, [f"train.objective.{field}: {validation.one_line(e)}"]
    return exp, frozen_problems(exp, args.data, args.tracking_uri)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tracking.install_log_redaction()
    if args.list_recipes:
        print("\n".join(sorted(RECIPES)))
        return 0
    if not args.recipe or not args.data:
        build_parser().error("--recipe and --data are required")
    exp, problems = check_launch(args)
    if exp is None or problems:  # nothing started: no Ray, no MLflow run, no latest_run.json
        return validation.report(problems)
    if args.dry_run:
        print(json.dumps({**flatten_experiment(exp), "data.source.url": args.data}, indent=2, default=str))
        return 0
    uri = args.tracking_uri or tracking.tracking_uri()
    try:
        summary = _launch_cli(args, exp, uri)
    except LeaseHeldError as e:  # another run owns the run folder: nothing was changed
        print(f"error: {e}", file=sys.stderr)
        return 3
    except CodebookUsageError as e:  # a tokenizer with dead codes: its MLflow run is FAILED, nothing registered
        print(f"error: {e}", file=sys.stderr)
        return 4
    emit(summary, args.summary_json)
    return 0


def _launch_cli(args: argparse.Namespace, exp: Experiment, uri: str) -> dict[str, Any]:
    return launch(
        exp,
        data_url=args.data,
        storage=args.storage or default_storage(),
        uri=uri,
        experiment=args.experiment or exp.name,
        run_name=args.run_name or exp.name,
        resume=args.resume,
        address=args.address,
        register=not args.no_register,
        force=args.force,
    )


if __name__ == "__main__":
    raise SystemExit(main())
