"""Audit a prepared dataset: integrity, statistics, exact and near duplicates (optionally filter them).

Examples::

    # As a Ray job: check every shard, decode 10%, and look for copies of ImageNet val in the set
    ray job submit --working-dir . -- python orchestration/audit.py s3://bucket/imagenet21k \\
        --against s3://bucket/imagenet1k-val --report s3://bucket/audits/i21k --write-filtered s3://bucket/i21k-dedup

    # Directly (a private local Ray instance when $RAY_ADDRESS is unset):
    python orchestration/audit.py ./ds --decode-fraction 1

What it checks (:mod:`orchestration.data.dataset_audit`, per-shard work in :mod:`pipeline.shard_audit`): every
shard's size and sha256 against ``index.parquet``; every image member's sha256 (exact
duplicates within and across splits); a ``--decode-fraction`` of the images decoded (image-size
statistics; pHash, 64 bits, for near-duplicates across the dataset's splits within
``--hamming`` bits); with ``--against URL...`` every image of both sides is hashed and the
dataset's images close to any image of those sets are listed (the ViT paper's de-duplication of
pre-training data against downstream test sets). ``--write-filtered DEST`` writes a new dataset
without them (and without train copies of eval images, samples of corrupt shards or unreadable
images); it decodes every image (``--decode-fraction`` defaults to 1 then).

A partial comparison is never reported as a complete one: a decode fraction below 1, damaged
shards or unreadable images of an ``--against`` set are listed as ``INCOMPLETE`` lines (stdout,
``summary.txt``; ``complete``/``incomplete`` in ``audit.json``), and ``--write-filtered`` refuses
to write a "de-duplicated" copy from such a comparison unless ``--allow-incomplete`` is given
(the copy's manifest then says so). DEST (a folder, not a file; an existing dataset only with
``--overwrite``) and ``--report`` are checked before the audit starts. When nothing is left to
write (every sample dropped, or an empty dataset) the report is still saved and a line says so.

Output: a readable summary on stdout, ``audit.json`` + ``summary.txt`` under ``--report`` (a
folder or ``s3://`` prefix), and both as artifacts of an MLflow run (experiment
``dataset-audit``) when ``MLFLOW_TRACKING_URI`` is set. The last stdout line is
``VITSCALE_RESULT {json}`` (the report's counts). Exit 1 when a shard (of the dataset or of an
``--against`` set) fails its check or a requested filtered copy was not written; 0 otherwise
(duplicates are findings, not failures); 2 for bad arguments, an unusable DEST or an unreadable dataset.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file (ray job submit -- python orchestration/audit.py)
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[1]))

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from orchestration.data.dataset_audit import AuditSettings, audit_dataset, write_filtered
from orchestration.data.distribute import TaskSettings, connect
from orchestration.experiment.validation import storage_problems
from pipeline import format as fmt
from pipeline.shard_audit import DEFAULT_HAMMING
from pipeline.storage import StorageError, open_storage

ROOT = Path(__file__).resolve().parents[1]


def summary(report: dict[str, Any]) -> list[str]:
    """The report as a few readable lines."""
    sh, ex, nd = report["shards"], report["exact_duplicates"], report["near_duplicates"]
    lines = [f"audit {report['url']} (version {report['dataset_version']}): {report['samples']} samples, "
             f"{len(report['classes'])} classes, splits {report['splits']}",
             f"  shards: {sh['ok']}/{sh['total']} match index.parquet (size, sha256)"]
    lines += [f"  BAD shard {b['shard']}: {b['problem']}" for b in sh["bad"]]
    for url, bad in report.get("against_bad_shards", {}).items():
        lines += [f"  BAD shard {b['shard']} of --against {url}: {b['problem']}" for b in bad]
    lines += [f"  INCOMPLETE: {g}" for g in report.get("incomplete", [])]
    size = report["image_size"]
    if size.get("decoded"):
        lines.append(f"  decoded {size['decoded']} images: width {size['width']}, height {size['height']}")
    lines += [f"  unreadable sample {u}" for u in report["unreadable_samples"][:20]]
    lines.append(f"  exact duplicates: {len(ex['within_split'])} groups within a split, {len(ex['across_splits'])} "
                 f"across splits ({ex['extra_copies']} extra copies)")
    lines += [f"    {', '.join(g['samples'])}" for g in (ex["across_splits"] + ex["within_split"])[:20]]
    lines.append(f"  near duplicates (pHash <= {report['hamming']} bits) across splits: {len(nd['across_splits'])}")
    lines += [f"    {n['split']}/{n['key']} ~ {n['match']} ({n['distance']} bits)" for n in nd["across_splits"][:20]]
    for url, found in nd["against"].items():
        lines.append(f"  near duplicates of {url}: {len(found)}")
        lines += [f"    {n['split']}/{n['key']} ~ {n['match']} ({n['distance']} bits)" for n in found[:20]]
    if "filtered" in report:
        f = report["filtered"]
        if f["written"]:
            lines.append(f"  filtered dataset {f['dest']}: version {f['dataset_version']}, kept {f['kept']}, "
                         f"dropped {f['dropped']} {f['dropped_by_reason']}"
                         + ("" if f["complete"] else " (from an INCOMPLETE comparison: --allow-incomplete)"))
        else:
            lines.append(f"  filtered dataset {f['dest']}: NOT written: {f['reason']}")
    if report.get("incomplete"):
        lines.append(f"audit INCOMPLETE: {len(report['incomplete'])} gap(s) above; duplicates may remain unfound")
    return lines


def save(report: dict[str, Any], text: str, where: str | None) -> None:
    """audit.json + summary.txt under ``where``; MLflow artifacts when tracking is configured."""
    data = json.dumps(report, indent=2, default=str).encode()
    if where:
        st = open_storage(where)
        st.write_bytes("audit.json", data)
        st.write_bytes("summary.txt", text.encode())
    if os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        from orchestration import tracking

        tracking.client()  # the fluent API on this environment's store (with its credentials), not a stale one
        mlflow.set_experiment("dataset-audit")
        with mlflow.start_run(run_name=f"audit {report['dataset_version']}"):
            mlflow.log_params({"url": report["url"], "dataset_version": report["dataset_version"],
                               "hamming": report["hamming"], "decode_fraction": report["decode_fraction"]})
            mlflow.log_metrics(counts(report))
            mlflow.log_dict(report, "audit/audit.json")
            mlflow.log_text(text, "audit/summary.txt")


def counts(report: dict[str, Any]) -> dict[str, int]:
    nd = report["near_duplicates"]
    return {"samples": report["samples"], "bad_shards": len(report["shards"]["bad"]),
            "exact_duplicate_groups": len(report["exact_duplicates"]["within_split"])
            + len(report["exact_duplicates"]["across_splits"]),
            "near_duplicates_across_splits": len(nd["across_splits"]),
            "near_duplicates_against": sum(len(v) for v in nd["against"].values()),
            "against_bad_shards": sum(len(v) for v in report.get("against_bad_shards", {}).values()),
            "complete": int(bool(report.get("complete", True))),
            "filtered_written": int(bool(report.get("filtered", {}).get("written", False)))}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python orchestration/audit.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="the dataset (local folder, file:// or s3://bucket/prefix)")
    ap.add_argument("--against", nargs="*", default=[], help="downstream/eval datasets to find near-duplicates of")
    ap.add_argument("--decode-fraction", type=float, default=None,
                    help="fraction of images decoded (default 0.1; 1 with --against or --write-filtered)")
    ap.add_argument("--hamming", type=int, default=DEFAULT_HAMMING, help="pHash bits that may differ (of 64)")
    ap.add_argument("--write-filtered", default=None, metavar="DEST", help="write a dataset without the duplicates")
    ap.add_argument("--overwrite", action="store_true", help="--write-filtered DEST may replace a published dataset")
    ap.add_argument("--allow-incomplete", action="store_true",
                    help="--write-filtered even when the comparison was partial (decode fraction < 1, damaged "
                         "--against data); the report and the copy's manifest say so")
    ap.add_argument("--report", default=None, help="folder or s3:// prefix for audit.json + summary.txt")
    ap.add_argument("--tasks", type=int, default=8, help="shard tasks in flight at once")
    ap.add_argument("--cpus-per-task", type=float, default=1.0)
    ap.add_argument("--address", default=None, help="Ray address (default $RAY_ADDRESS; else a local Ray)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    a = ap.parse_args(argv)
    if a.decode_fraction is None:  # de-duplication needs every image's pHash
        a.decode_fraction = 1.0 if a.write_filtered else 0.1
    problems = [p for ok, p in (
        (0.0 <= a.decode_fraction <= 1.0, f"--decode-fraction {a.decode_fraction} must be in [0, 1]"),
        (0 <= a.hamming < 64, f"--hamming {a.hamming} must be in [0, 63]"),
        (a.tasks >= 1, f"--tasks {a.tasks} must be >= 1"),
        (a.cpus_per_task > 0, f"--cpus-per-task {a.cpus_per_task} must be > 0")) if not ok]
    if not problems:
        problems = output_problems(a)
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2)
    return a


def output_problems(a: argparse.Namespace) -> list[str]:
    """What would make the outputs fail after the whole audit, found before it starts: a partial
    self de-duplication, a DEST that is a file or already a dataset (without --overwrite), an
    unwritable --report."""
    problems = []
    if a.report:
        problems += storage_problems(a.report, "--report")
    if not a.write_filtered:
        return problems
    if a.decode_fraction < 1.0 and not a.against and not a.allow_incomplete:
        problems.append(f"--write-filtered with --decode-fraction {a.decode_fraction:g}: near duplicates would be looked "
                        f"for among only {a.decode_fraction:.0%} of the images and the copy would keep the rest; use "
                        "--decode-fraction 1 (the default with --write-filtered), or --allow-incomplete to write it anyway")
    where = storage_problems(a.write_filtered, "--write-filtered")
    if where:
        return problems + where
    try:
        st = open_storage(a.write_filtered)
        st.ensure_bucket()
        seen = fmt.published(st).version
    except StorageError as exc:
        return problems + [f"--write-filtered {a.write_filtered}: {' '.join(str(exc).split())}"]
    if seen is not None and not a.overwrite:
        problems.append(f"--write-filtered {a.write_filtered} already publishes dataset version {seen}; pass "
                        "--overwrite to publish the filtered copy as a new version of it, or choose another DEST")
    return problems


def main(argv: list[str] | None = None) -> None:
    a = _parse(argv)
    tasks = TaskSettings(max_in_flight=a.tasks, cpus_per_task=a.cpus_per_task)
    settings = AuditSettings(decode_fraction=a.decode_fraction, hamming=a.hamming, tasks=tasks, progress=not a.quiet)
    try:
        connect(a.address, str(ROOT))
        report, main_set, _ = audit_dataset(a.url, a.against, settings)
    except (fmt.DatasetFormatError, StorageError) as exc:
        print(f"audit: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    if a.write_filtered:
        report["filtered"] = _filtered(a, main_set, report, tasks)
    text = "\n".join(summary(report))
    print(text)
    save(report, text + "\n", a.report)
    print("VITSCALE_RESULT " + json.dumps(counts(report)), flush=True)
    if report["shards"]["bad"] or report.get("against_bad_shards") or not report.get("filtered", {"written": 1})["written"]:
        raise SystemExit(1)


def _filtered(a: argparse.Namespace, main_set: Any, report: dict[str, Any], tasks: TaskSettings) -> dict[str, Any]:
    """The filtered copy, or why it was not written; the report is saved either way."""
    if report["incomplete"] and not a.allow_incomplete:
        return {"dest": a.write_filtered, "written": False, "complete": False,
                "reason": "the comparison is INCOMPLETE (see above), so a de-duplicated copy could keep duplicates; "
                          "fix the gaps and audit again, or pass --allow-incomplete to write it anyway"}
    try:
        return write_filtered(main_set, report, a.write_filtered, tasks, overwrite=a.overwrite)
    except (StorageError, fmt.DatasetExists, fmt.PublishConflict) as exc:  # e.g. another writer meanwhile
        return {"dest": a.write_filtered, "written": False, "complete": report["complete"],
                "reason": " ".join(str(exc).split())}


if __name__ == "__main__":
    main()
