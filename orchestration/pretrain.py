"""Pre-train a ViT recipe on Ray Train with DeepSpeed; track in MLflow; register the model.

Examples::

    # On a Ray cluster (the job's driver connects to it through $RAY_ADDRESS):
    ray job submit --working-dir . -- python orchestration/pretrain.py \\
        --recipe vit_b16_i21k --data s3://bucket/imagenet21k --storage s3://bucket/runs --resume auto

    # Directly (starts a private local Ray instance), with typed overrides:
    python orchestration/pretrain.py --recipe vit_mu_smoke --data s3://vitscale/digits \\
        --set train.total_steps=200 --set train.lr=3e-3 --workers 2

Every ``--set`` key/value is checked against the config dataclasses before Ray starts
(``--dry-run`` stops right there and prints the resolved experiment). Storage layout::

    <storage>/<recipe>/latest_run.json            pointer used by --resume auto
    <storage>/<recipe>/<run_id>/checkpoints/      DeepSpeed checkpoints (step{N}/, complete.json)
    <storage>/<recipe>/<run_id>/export/model.safetensors
    <storage>/<recipe>/<run_id>/lease.json         held by the live run (another launch is refused)

The last stdout line is ``VITSCALE_RESULT {json}`` (run id, registered name/version, metrics).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file (ray job submit -- python orchestration/pretrain.py)
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[1]))

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from orchestration import tracking, validation
from orchestration.lease import Lease, LeaseHeldError, LeaseLostError
from orchestration.recipes import (
    RECIPES,
    Experiment,
    OverrideError,
    apply_overrides,
    experiment_to_dict,
    flatten_experiment,
    get_recipe,
)

log = logging.getLogger("orchestration.pretrain")
RESULT_PREFIX = "VITSCALE_RESULT "


def default_storage() -> str:
    """``$VITSCALE_STORAGE`` or ``~/.vitscale/runs`` (use s3:// on a multi-node cluster)."""
    return os.environ.get("VITSCALE_STORAGE") or str(Path.home() / ".vitscale" / "runs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orchestration/pretrain.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--recipe", help=f"recipe name: {', '.join(sorted(RECIPES))}")
    p.add_argument("--data", help="dataset URL (local path, file:// or s3://bucket/prefix) written by write_shards")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="typed override, repeatable: train.lr=3e-4, data.batch_size=64, model.dropout=0.1, workers=2",
    )
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (one per GPU); keeps the global batch")
    p.add_argument("--resume", choices=["auto"], default=None,
                   help="auto: continue the recipe's latest run (same MLflow run, newest complete checkpoint)")
    p.add_argument("--force", action="store_true",
                   help="take over the run folder's lease if it has expired (its driver died without "
                        "releasing it); a live lease is never taken over")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: the recipe name)")
    p.add_argument("--storage", default=None, help="run storage root, path or s3:// (default $VITSCALE_STORAGE "
                   "or ~/.vitscale/runs); must be shared by all nodes")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
                   "sqlite:///<repo>/mlflow.db)")
    p.add_argument("--address", default=None, help="Ray address (default $RAY_ADDRESS; else a local Ray)")
    p.add_argument("--run-name", default=None, help="MLflow run name (default: <recipe>)")
    p.add_argument("--no-register", action="store_true", help="skip the model registry")
    p.add_argument("--summary-json", default=None, help="also write the result JSON to this file")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved experiment, then exit")
    p.add_argument("--list-recipes", action="store_true", help="print the recipe names and exit")
    return p


def resolve_experiment(recipe: str, overrides: list[str], workers: int | None) -> Experiment:
    """Recipe + ``--set`` overrides + ``--workers``, validated (raises OverrideError/ValueError)."""
    exp = get_recipe(recipe)
    if workers is not None:
        overrides = [*overrides, f"workers={workers}"]
    return apply_overrides(exp, overrides)


def check_launch(args: argparse.Namespace) -> tuple[Experiment | None, list[str]]:
    """The resolved experiment and every problem with it, its dataset and its storage (no Ray, no MLflow)."""
    exp, problems = None, []
    try:
        exp = resolve_experiment(args.recipe, args.overrides, args.workers)
    except (OverrideError, ValueError) as e:
        problems += validation.problems_of(e)
    problems += validation.experiment_data_problems(None if problems else exp, args.data)
    problems += validation.storage_problems(args.storage or default_storage())
    return exp, problems


def register_from_run(
    exp: Experiment,
    *,
    run_id: str,
    run_dir: str,
    report: dict[str, Any],
    lineage: dict[str, Any],
    uri: str,
    extra_tags: dict[str, Any] | None = None,
) -> int:
    """Rebuild the trained model from ``<run_dir>/export/model.safetensors`` and register it."""
    from model import VisionTransformer
    from model.weights import load_weights, read_config
    from orchestration.ray_launch import EXPORT_KEY
    from pipeline.storage import open_storage

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model.safetensors"
        open_storage(run_dir).download_file(EXPORT_KEY, local)
        cfg = read_config(local)
        if cfg is None:
            raise RuntimeError(f"{run_dir}/{EXPORT_KEY} has no vitscale.config metadata")
        model = load_weights(VisionTransformer(cfg), local)
    metrics = {k: v for k, v in report.items() if isinstance(v, (int, float))}
    tags = {
        "git_commit": tracking.git_commit(),
        "recipe": exp.name,
        "variant": exp.variant,
        "image_size": exp.image_size,
        "dataset": exp.dataset_name,
        "dataset_url": lineage.get("data_url", ""),
        "dataset_index_sha256": lineage.get("index_sha256", ""),
        "steps": int(metrics.get("step", 0)),
        "source_run_id": run_id,
        **{f"metric.{k}": f"{v:.6g}" for k, v in sorted(metrics.items())},
        **(extra_tags or {}),
    }
    return tracking.log_and_register_model(
        model, run_id=run_id, name=exp.model_name, tags=tags,
        description=f"{exp.variant} trained by recipe {exp.name} on {exp.dataset_name}", uri=uri,
    )


def _run_pointer(storage: str, exp: Experiment) -> tuple[Any, str]:
    from pipeline.storage import open_storage, url_join

    return open_storage(url_join(storage, exp.name)), "latest_run.json"


def launch(
    exp: Experiment,
    *,
    data_url: str,
    storage: str,
    uri: str,
    experiment: str,
    run_name: str,
    resume: str | None = None,
    address: str | None = None,
    register: bool = True,
    init_weights: str | None = None,
    parent_run_id: str | None = None,
    extra_tags: dict[str, Any] | None = None,
    extra_params: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Create/continue the MLflow run, train on Ray, register; returns the summary dict.

    The run folder's lease is taken before a resumed MLflow run is touched: a second launch on
    the same run raises LeaseHeldError and changes nothing. ``force`` takes over an expired lease.
    """
    from orchestration import ray_launch
    from orchestration.lease import hold_run_lease
    from pipeline.storage import url_join

    lineage = {**ray_launch.dataset_lineage(data_url), "data_url": data_url}
    eval_split = exp.eval_split if exp.eval_split in lineage["splits"] else None
    if exp.eval_split and eval_split is None:
        log.warning("dataset %s has no %r split: no evaluation", data_url, exp.eval_split)

    pointer_store, pointer_key = _run_pointer(storage, exp)
    c = tracking.client(uri)
    run_id = None
    lease: Lease | None = None
    if resume == "auto" and pointer_store.exists(pointer_key):
        prev = json.loads(pointer_store.read_bytes(pointer_key))
        try:
            c.get_run(prev["run_id"])
            run_id = prev["run_id"]
        except Exception:  # noqa: BLE001 - a pointer to a run of another tracking store
            log.warning("latest run %s not found in %s: starting a new run", prev.get("run_id"), uri)
        if run_id is not None:
            # Before the run is touched: a second launch on a live run is refused (LeaseHeldError).
            lease = hold_run_lease(url_join(storage, exp.name, run_id), run_id, force=force)
            c.update_run(run_id, status="RUNNING")
            log.info("resuming run %s from %s", run_id, prev["run_dir"])
    if run_id is None:
        tags = {
            "recipe": exp.name,
            "variant": exp.variant,
            "dataset": exp.dataset_name,
            "git_commit": tracking.git_commit(),
            "dataset_index_sha256": lineage["index_sha256"],
            "data_url": data_url,
            **(extra_tags or {}),
        }
        run_id = tracking.start_run(experiment, run_name=run_name, tags=tags, parent_run_id=parent_run_id, uri=uri)
        lease = hold_run_lease(url_join(storage, exp.name, run_id), run_id, force=force)  # a new prefix: free
    assert lease is not None
    run_dir = url_join(storage, exp.name, run_id)
    try:
        pointer_store.write_bytes(pointer_key, json.dumps({"run_id": run_id, "run_dir": run_dir}).encode())
        _log_run_inputs(exp, run_id=run_id, uri=uri, data_url=data_url, lineage=lineage, extra_params=extra_params)
        report = ray_launch.run_training(
            exp, data_url=data_url, run_id=run_id, run_dir=run_dir, tracking_uri=uri,
            eval_split=eval_split, init_weights=init_weights,
        )
        summary: dict[str, Any] = {
            "run_id": run_id,
            "experiment": experiment,
            "run_dir": run_dir,
            "tracking_uri": uri,
            "metrics": report,
            "model_name": None,
            "model_version": None,
        }
        if register:
            version = register_from_run(
                exp, run_id=run_id, run_dir=run_dir, report=report, lineage=lineage, uri=uri, extra_tags=extra_tags
            )
            summary.update(
                model_name=exp.model_name, model_version=version, model_uri=f"models:/{exp.model_name}/{version}"
            )
    except BaseException:
        if not lease.lost:  # only the lease's holder may set the MLflow run's status
            tracking.end_run(run_id, "FAILED", uri=uri)
        lease.release()  # after the status: a launch waiting for the lease must not be overwritten
        raise
    if lease.lost:
        raise LeaseLostError(f"run {run_id} lost its lease {lease.url} to another run during training; "
                             "its MLflow status is left to that run")
    tracking.end_run(run_id, "FINISHED", uri=uri)
    lease.release()
    return summary


def _log_run_inputs(
    exp: Experiment, *, run_id: str, uri: str, data_url: str, lineage: dict[str, Any],
    extra_params: dict[str, Any] | None,
) -> None:
    """Driver-side params and artifacts: resolved config, DeepSpeed config, dataset lineage."""
    from training.deepspeed_config import deepspeed_config

    sink = tracking.MLflowSink(run_id, uri=uri, system_metrics=False)
    sink.log_params({**flatten_experiment(exp), "data.url": data_url, **(extra_params or {})})
    sink.log_dict({**experiment_to_dict(exp), "data_url": data_url}, "config/experiment.json")
    sink.log_dict(deepspeed_config(exp.train, exp.workers), "config/deepspeed_config.json")
    sink.log_dict(lineage["dataset"], "dataset/dataset.json")
    sink.log_dict({"index_sha256": lineage["index_sha256"], "url": data_url}, "dataset/index_sha256.json")


def emit(summary: dict[str, Any], path: str | None) -> None:
    """Print the ``VITSCALE_RESULT`` line (and write it to ``path``), credentials redacted."""
    text = tracking.redact_text(json.dumps(summary, default=str, sort_keys=True))
    if path:
        Path(path).write_text(text)
    print(RESULT_PREFIX + text, flush=True)


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
        print(json.dumps({**flatten_experiment(exp), "data.url": args.data}, indent=2, default=str))
        return 0
    uri = args.tracking_uri or tracking.tracking_uri()
    from orchestration.ray_launch import connect_ray

    log.info("Ray: %s", connect_ray(args.address))
    try:
        summary = _launch_cli(args, exp, uri)
    except LeaseHeldError as e:  # another run owns the run folder: nothing was changed
        print(f"error: {e}", file=sys.stderr)
        return 3
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
        register=not args.no_register,
        force=args.force,
    )


if __name__ == "__main__":
    raise SystemExit(main())
