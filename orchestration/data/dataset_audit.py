"""Audit a dataset on Ray: per-shard checks as tasks, duplicates and statistics on the driver.

:func:`audit_dataset` runs :func:`pipeline.shard_audit.audit_shard` once per shard (Ray tasks, see
:mod:`orchestration.data.distribute`) and builds the report:

* ``shards``: every shard's size and sha256 against ``index.parquet``; the bad ones by name;
* ``classes`` (sample counts per class name, all samples) and ``image_size`` (decoded fraction);
* ``exact_duplicates``: images with the same content sha256, within a split and across splits;
* ``near_duplicates``: pHash within ``hamming`` bits, across the dataset's splits (decoded
  samples) and against every ``--against`` dataset (all of whose images are decoded);
* ``complete`` / ``incomplete``: whether the duplicate search saw every image it should have,
  and if not, why (:func:`comparison_gaps`: a partial decode fraction, damaged or unreadable
  ``--against`` images). A report never presents a partial comparison as a complete one.

:func:`write_filtered` writes a new dataset without the flagged samples (train copies of eval
images, anything matching an ``--against`` set) and without the samples it could not check
(corrupt shards, unreadable images) through the same pipeline steps as prepare.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from orchestration.data.distribute import Progress, TaskSettings, run_tasks
from pipeline import format as fmt
from pipeline.shard_audit import DEFAULT_HAMMING, NearIndex, ShardAudit, audit_shard, decode_choice
from pipeline.shards import WriteSettings, finish_dataset, plan_from_source, write_shard
from pipeline.sources import Item, Source, WriterError

TRAIN = "train"


@dataclass(frozen=True, kw_only=True)
class AuditSettings:
    decode_fraction: float = 0.1
    hamming: int = DEFAULT_HAMMING
    seed: int = 0
    tasks: TaskSettings = field(default_factory=TaskSettings)
    progress: bool = True


@dataclass
class Scanned:
    """One dataset after its shard tasks: what it is and every audited sample row."""

    url: str
    res: fmt.Resolved
    classes: list[str]
    bad_shards: list[dict[str, str]]
    rows: list[dict[str, Any]]  # audited samples of good shards (key, split, label, sha256, phash, ...)
    index: list[dict[str, Any]]
    samples: list[dict[str, Any]]  # samples.parquet rows (all shards)


def scan(url: str, fraction: float, settings: AuditSettings, what: str) -> Scanned:
    """Run the shard tasks over the published version of ``url``."""
    res = fmt.resolve(url)
    index = fmt.read_index(res).to_pylist()
    samples = fmt.read_samples(res).to_pylist()
    by_shard: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in samples:
        by_shard[r["shard"]].append(r)
    jobs = [ShardAudit(shard=i["shard"], bytes=i["bytes"], sha256=i["sha256"], samples=by_shard[i["shard"]],
                       decode=[decode_choice(r["key"], fraction, settings.seed) for r in by_shard[i["shard"]]])
            for i in index]
    bar = Progress(total_items=len(jobs), total_images=len(samples), what=what, enabled=settings.progress)

    def seen(r: dict[str, Any]) -> None:
        bar.update(images=len(r["samples"]), rejects=0 if r["ok"] else 1)

    results = run_tasks(audit_shard, jobs, (res.root_url,), settings.tasks, on_result=seen)
    bad = [{"shard": r["shard"], "problem": r["problem"]} for r in results if not r["ok"]]
    rows = [s for r in results for s in r["samples"]]
    return Scanned(url=url, res=res, classes=fmt.read_classes(res), bad_shards=bad, rows=rows, index=index,
                   samples=samples)


def _no_label(main: Scanned) -> str:
    """What a sample without a single-label class is counted as in the report's ``classes``."""
    return "(multi-label)" if main.res.manifest.get("multi_label") else "(unlabelled)"


def exact_duplicates(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Groups of samples with the same content sha256: within one split, and spanning splits."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["sha256"]].append(r)
    within, across = [], []
    for digest, g in sorted(groups.items()):
        if len(g) < 2:
            continue
        entry = {"sha256": digest, "samples": [f"{r['split']}/{r['key']}" for r in g]}
        (across if len({r["split"] for r in g}) > 1 else within).append(entry)
    return {"within_split": within, "across_splits": across,
            "extra_copies": sum(len(g) - 1 for g in groups.values())}


def near_duplicates(queries: list[dict[str, Any]], refs: list[dict[str, Any]], t: int) -> list[dict[str, Any]]:
    """Every query sample with a reference sample within ``t`` pHash bits (nearest listed)."""
    idx = NearIndex(t)
    for r in refs:
        if r["phash"] is not None:
            idx.add(r["phash"], r)
    found = []
    for q in queries:
        if q["phash"] is None:
            continue
        hits = [(d, r) for d, r in idx.query(q["phash"]) if r is not q]
        if hits:
            d, r = hits[0]
            found.append({"split": q["split"], "key": q["key"], "match": f"{r['split']}/{r['key']}",
                          "distance": d, "matches": len(hits)})
    return found


def _size_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    dec = [r for r in rows if r["width"] is not None]
    if not dec:
        return {"decoded": 0}
    w = np.array([r["width"] for r in dec])
    h = np.array([r["height"] for r in dec])
    return {"decoded": len(dec), **{name: {"min": int(a.min()), "median": float(np.median(a)), "mean": round(float(
        a.mean()), 1), "max": int(a.max())} for name, a in (("width", w), ("height", h))}}


def _gaps_of_against(o: Scanned) -> list[str]:
    """Why ``--against`` set ``o`` was not compared in full: damaged shards, unreadable images."""
    gaps = []
    if o.bad_shards:
        bad = {b["shard"] for b in o.bad_shards}
        lost = sum(1 for s in o.samples if s["shard"] in bad)
        gaps.append(f"--against {o.url}: {len(bad)} of {len(o.index)} shards are damaged, so {lost} of its "
                    f"{len(o.samples)} images were not compared (copies of them may remain in the dataset); "
                    "repair or rewrite it and audit again")
    unreadable = sum(1 for r in o.rows if r["phash"] is None)
    if unreadable:
        gaps.append(f"--against {o.url}: {unreadable} images could not be decoded, so they were not compared")
    return gaps


def comparison_gaps(main: Scanned, others: dict[str, Scanned], fraction: float) -> list[str]:
    """Every reason the near-duplicate search did not compare all images it is meant to, one line each.

    The main dataset's corrupt shards and unreadable images are not gaps here: they are reported
    on their own and :func:`write_filtered` leaves them out of a filtered copy.
    """
    gaps = []
    if fraction < 1.0:
        decoded = sum(1 for r in main.rows if r["phash"] is not None)
        gaps.append(f"near duplicates across splits were looked for among the decoded {fraction:.0%} of the images "
                    f"only ({decoded} of {len(main.rows)}); --decode-fraction 1 compares them all")
    for o in others.values():
        gaps += _gaps_of_against(o)
    return gaps


def audit_dataset(url: str, against: list[str], settings: AuditSettings) -> tuple[dict[str, Any], Scanned, dict]:
    """The report (see module docstring), the scanned dataset and the scanned ``--against`` sets."""
    fraction = 1.0 if against else settings.decode_fraction  # near-dups need every image's pHash
    main = scan(url, fraction, settings, "audit")
    others = {u: scan(u, 1.0, settings, f"audit {u}") for u in against}
    evals = [r for r in main.rows if r["split"] != TRAIN]
    trains = [r for r in main.rows if r["split"] == TRAIN]
    report = {
        "url": url, "dataset_version": main.res.version, "hamming": settings.hamming, "decode_fraction": fraction,
        "shards": {"total": len(main.index), "ok": len(main.index) - len(main.bad_shards), "bad": main.bad_shards},
        "samples": len(main.samples),
        "unreadable_samples": [f"{r['split']}/{r['key']}: {r['problem']}" for r in main.rows if r["problem"]],
        "classes": dict(sorted(Counter(main.classes[s["label"]] if s["label"] >= 0 else _no_label(main)
                                       for s in main.samples).items())),
        "splits": dict(Counter(s["split"] for s in main.samples)),
        "image_size": _size_stats(main.rows),
        "exact_duplicates": exact_duplicates(main.rows),
        "near_duplicates": {"across_splits": near_duplicates(trains, evals, settings.hamming),
                            "against": {u: near_duplicates(main.rows, o.rows, settings.hamming)
                                        for u, o in others.items()}},
        "against_bad_shards": {u: o.bad_shards for u, o in others.items() if o.bad_shards},
    }
    gaps = comparison_gaps(main, others, fraction)
    report.update(complete=not gaps, incomplete=gaps)
    return report, main, others


def flagged_keys(report: dict[str, Any]) -> set[str]:
    """``split/key`` of every sample a filtered dataset leaves out.

    Train samples that copy an eval sample (exactly or nearly), and every sample that matches
    an ``--against`` set; the eval split itself is kept whole.
    """
    out = {f"{n['split']}/{n['key']}" for n in report["near_duplicates"]["across_splits"]}
    for matches in report["near_duplicates"]["against"].values():
        out |= {f"{n['split']}/{n['key']}" for n in matches}
    for g in report["exact_duplicates"]["across_splits"]:
        out |= {s for s in g["samples"] if s.startswith(f"{TRAIN}/")}
    return out


def write_filtered(main: Scanned, report: dict[str, Any], dest: str, tasks: TaskSettings,
                   *, overwrite: bool = False) -> dict[str, Any]:
    """A new dataset at ``dest``: the samples of ``main`` minus :func:`flagged_keys`, its corrupt
    shards and its unreadable images.

    Returns ``{"dest", "written", "kept", "dropped", "dropped_by_reason", ...}``; when nothing is
    left to write (every sample dropped, or an empty dataset) or the writer refuses, nothing is
    published and ``written`` is False with the ``reason`` (the caller still saves the report).
    """
    flagged = flagged_keys(report)
    bad = {b["shard"] for b in main.bad_shards}
    unreadable = {f"{r['split']}/{r['key']}" for r in main.rows if r["problem"]}
    multi = bool(main.res.manifest.get("multi_label"))
    labelled = fmt.is_labelled(main.res.manifest)
    root = main.res.root_url
    why: Counter[str] = Counter()
    items = []
    for s in main.samples:
        name = f"{s['split']}/{s['key']}"
        reason = ("corrupt shard" if s["shard"] in bad else "duplicate" if name in flagged
                  else "unreadable" if name in unreadable else "")
        if reason:
            why[reason] += 1
            continue
        labels = None if not labelled else list(s["labels"]) if multi else [s["label"]]
        items.append(Item(f"{root.rstrip('/')}/{s['shard']}#{s['key']}", labels, split=s["split"],
                          span=(s["offset"], s["size"])))
    out: dict[str, Any] = {"dest": dest, "written": False, "kept": len(items), "dropped": len(main.samples) - len(items),
                           "dropped_by_reason": dict(why), "complete": bool(report.get("complete", True))}
    if not items:
        out["reason"] = (f"nothing left to write: all {len(main.samples)} samples were dropped "
                         f"({', '.join(f'{k}: {v}' for k, v in sorted(why.items())) or 'the dataset is empty'})")
        return out
    per_shard = max((i["samples"] for i in main.index), default=1000)
    src = f"{main.url} (audited, filtered{'' if out['complete'] else '; INCOMPLETE comparison, see audit.json'})"
    plan = plan_from_source(Source(items, main.classes, multi_label=multi, labelled=labelled), src, dest,
                            WriteSettings(samples_per_shard=per_shard, seed=int(main.res.manifest.get("seed", 0))),
                            overwrite=overwrite)
    results = run_tasks(write_shard, plan.jobs, (plan.vdest, plan.options), tasks)
    try:
        info = finish_dataset(plan, results)
    except WriterError as exc:  # every kept image rejected by the writer: nothing published
        out["reason"] = " ".join(str(exc).split())
        return out
    return {**out, "written": True, "dataset_version": info["dataset_version"], "counts": info["counts"]}
