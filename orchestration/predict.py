"""Predict a registered model over a whole dataset split on Ray Data: the ``predict.py`` CLI.

Usage::

    python orchestration/predict.py --model models:/vit-b16-i21k@champion --data s3://bucket/imagenet21k \\
        --split val --out s3://bucket/predictions/i21k-val/ [--top-k 5] [--embedding] [--actors 8]

Writes one Parquet file per input shard (``key``, ``classes``, ``probabilities``, ``embedding``
with ``--embedding``, ``error``) plus ``_job.json``, ``_done/`` markers and ``_summary.json``
(:mod:`orchestration.serving.batch`). Run it again after a crash with the same arguments: the
finished shards are skipped and the result equals one uninterrupted run (the dataset version
and model version are pinned in ``_job.json``; ``@ALIAS`` is resolved once, and a rerun after the
alias moved is refused rather than mixing two models). Images are checked against the sha256
recorded at write time, like the loader does. Actors take one GPU each where the cluster has
GPUs. Without ``RAY_ADDRESS`` / ``--address`` a private local Ray instance runs the job.
Prints a progress line per shard and ``[predict] done: ...`` with the totals; bad samples (not
decodable) are listed in ``_summary.json`` and do not fail the job; tampered data does (exit 1).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: repo root on the path
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[1]))

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from orchestration import tracking
    from orchestration.experiment import validation

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS | models:/NAME/VERSION | runs:/ID/PATH | folder")
    p.add_argument("--data", required=True, help="dataset URL (pipeline.write_shards DEST)")
    p.add_argument("--split", default="val")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix (one Parquet file per shard)")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--embedding", action="store_true", help="also write the pre-logit embedding")
    p.add_argument("--dataset-version", default=None, help="default: the published one (a resumed job: its own)")
    p.add_argument("--actors", type=int, default=None, help="most actors at once (default: one per GPU, else 1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="also the actor's decode threads")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="default: 1 where the cluster has GPUs")
    p.add_argument("--address", default=None, help="Ray cluster (default $RAY_ADDRESS, else a private local Ray)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI or sqlite)")
    a = p.parse_args(argv)
    tracking.install_log_redaction()
    problems = validation.location_problems(a.data) + validation.storage_problems(a.out, "--out")
    for key, v in (("--top-k", a.top_k), ("--actors", a.actors), ("--batch-size", a.batch_size)):
        if v is not None and v < 1:
            problems.append(f"{key} {v} must be >= 1")
    uri = tracking.resolve_uri(a.tracking_uri)
    tracking.client(uri)  # exported as MLFLOW_TRACKING_URI: a private Ray's actors inherit it
    model_uri = a.model
    try:
        if a.model.startswith(("models:/", "runs:/")):
            source = tracking.resolve_model_source(a.model, uri)
            model_uri = source["uri"] if source["kind"] == "registry" else a.model
    except Exception as e:  # noqa: BLE001 - unknown name/alias/run: one line
        problems.append(f"--model {a.model}: {validation.one_line(e)}")
    cfg = None
    if not problems:
        try:
            cfg = _config(a, model_uri, uri)
        except Exception as e:  # noqa: BLE001 - no such split, damaged metadata, another job's --out
            problems.append(validation.one_line(e))
    if problems or cfg is None:
        return validation.report(problems)

    from orchestration.launch.cluster import connect_ray
    from orchestration.serving.batch import run_predict
    from pipeline.format import IntegrityError

    print(f"[predict] Ray: {connect_ray(a.address)}", flush=True)
    if a.gpus_per_actor is None or a.actors is None:
        import ray

        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        cfg = _with(cfg, num_gpus=a.gpus_per_actor if a.gpus_per_actor is not None else (1.0 if gpus else 0.0),
                    max_actors=a.actors or max(1, int(gpus)))
    try:
        summary = run_predict(cfg, echo=lambda line: print(line, flush=True))
    except IntegrityError as e:  # exit 1: the data is wrong, not the arguments
        validation.report([validation.one_line(e)])
        return 1
    print(f"[predict] done: {summary['samples']} images in {summary['shards']} shards, {summary['bad']} bad "
          f"(listed in {a.out.rstrip('/')}/_summary.json), {summary['images_this_run']} predicted in "
          f"{summary['seconds']:.1f} s", flush=True)
    print(json.dumps({k: summary[k] for k in ("model", "data", "dataset_version", "split", "shards", "samples", "bad")}))
    return 0


def _with(cfg: object, **changes: object) -> object:
    import dataclasses

    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def _config(a: argparse.Namespace, model_uri: str, uri: str) -> object:
    """The job's PredictConfig, checked against the dataset and against ``--out`` (a resumed job)."""
    from orchestration import tracking
    from orchestration.serving.batch import JOB_FILE, PredictConfig, check_job
    from pipeline.loader.meta import load_meta
    from pipeline.storage import open_storage

    version = a.dataset_version
    out = open_storage(a.out)
    if version is None and out.exists(JOB_FILE):
        version = json.loads(out.read_bytes(JOB_FILE)).get("dataset_version")  # a resumed job keeps its version
    meta = load_meta(a.data, a.split, version=version)
    cfg = PredictConfig(model_uri=model_uri, data_url=a.data, split=a.split, out_url=a.out,
                        dataset_version=meta.version, top_k=a.top_k, embedding=a.embedding,
                        tracking_uri=uri if tracking.redact_text(uri) == uri else None, batch_size=a.batch_size,
                        max_actors=a.actors or 1, num_gpus=a.gpus_per_actor or 0.0, num_cpus=a.cpus_per_actor)
    check_job(cfg)
    return cfg


if __name__ == "__main__":
    sys.exit(main())
