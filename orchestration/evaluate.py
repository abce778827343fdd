"""Evaluate a pre-trained ViT the way the ViT paper reports it.

Examples::

    # few-shot linear (frozen pre-logits, closed-form ridge, K images per class of the train split)
    python orchestration/evaluate.py fewshot --model models:/vit-mu4-digits/1 \\
        --data s3://vitscale/digits --shots 1,5,10,25 --out fewshot.json

    # linear probe (frozen pre-logits, the whole train split, the same ridge)
    python orchestration/evaluate.py linear --model run/export/model.safetensors --data s3://vitscale/digits

    # MAE's linear probe of an MAE encoder: class token, standardised by the train split's statistics
    python orchestration/evaluate.py linear --protocol mae --model models:/mae-vit-mu4-digits/1 \\
        --data s3://vitscale/digits

    # the same, and move the alias "champion" here only if this version beats the current champion
    python orchestration/evaluate.py fewshot --model models:/vit-mu4-digits/4 --data s3://vitscale/digits \
        --shots 10 --promote champion --metric fewshot/digits/10shot

``--model``: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/ID/PATH``, a ``.safetensors``
file or a model folder; an MAE encoder (no head) works as any model: its pre-logits are the class
token after the final norm. ``--promote ALIAS`` (a registered ``--model`` only): the version the alias
points at now is evaluated the same way, and the alias moves to ``--model`` only if its
``--metric`` (needed when the report has more than one) is strictly higher; both numbers and the
decision are recorded on the version as tags (:mod:`orchestration.tracking.promotion`). ``--data``: one or more datasets written by ``pipeline.write_shards`` (train split =
support / probe training set, ``val`` = test), ``NAME=URL`` to name one in the report. Every
result is a row of the shared report format (:mod:`orchestration.evaluation.results`). The
evaluators live in :mod:`orchestration.evaluation`; this file is their one command line.

Prints one ``<key> <top-1> (l2 <regulariser>)`` line per result (``fewshot/<dataset>/<K>shot``,
``linear_probe/<dataset>/full``) and writes the JSON report with ``--out``. Invalid arguments, an
unloadable model or an unusable dataset exit 2 with one ``error:`` line per problem, before any
image is read: a model with NaN/Inf weights, a dataset with fewer than 2 classes or a class
without train images (none of those is a measurement). NaN/Inf features found during the
evaluation (``EvaluationError``) are one ``error:`` line, exit 2.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: python orchestration/evaluate.py
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[1]))

import argparse
import sys

from orchestration.evaluation.checks import EvaluationError, check_finite_weights
from orchestration.evaluation.fewshot import DEFAULT_SHOTS, FewShotConfig, evaluate_fewshot, open_pools
from orchestration.evaluation.in_training import split_datasets
from orchestration.evaluation.linear import evaluate_linear
from orchestration.evaluation.support_sets import check_classes, open_pool
from orchestration.experiment.validation import EXIT_USAGE, location_problems, one_line, report


def _parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    fs = sub.add_parser("fewshot", help="few-shot linear evaluation (ViT paper / big_vision fewshot_lsr)")
    lin = sub.add_parser("linear", help="linear probe: frozen features of the whole train split, the same ridge")
    for p in (fs, lin):
        p.add_argument("--model", required=True, help="models:/NAME/VERSION, runs:/ID/PATH, a .safetensors file "
                                                      "or a model folder (model.safetensors + config.json)")
        p.add_argument("--data", required=True, help="dataset URL(s), comma-separated; NAME=URL sets the report name")
        p.add_argument("--out", default=None, help="write the JSON report here")
        p.add_argument("--device", default="cuda" if _cuda() else "cpu")
        p.add_argument("--batch-size", default="128")
        p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ and runs:/ sources")
        p.add_argument("--promote", default=None, metavar="ALIAS",
                       help="move this registry alias to --model if it beats the alias's current version")
        p.add_argument("--metric", default=None, help="the report key --promote compares (e.g. fewshot/digits/10shot)")
    fs.add_argument("--shots", default=",".join(map(str, DEFAULT_SHOTS)), help="comma-separated shot counts")
    fs.add_argument("--seed", default="0", help="support-set seed (the same images for the same seed)")
    lin.add_argument("--protocol", choices=("vit", "mae"), default="vit",
                     help="vit: the pre-logits into the ridge; mae: MAE's probe (main_linprobe.py) in closed "
                          "form: the class token, standardised with the train split's mean and variance "
                          "(BatchNorm1d(affine=False, eps=1e-6) in eval mode), then the same ridge")
    lin.set_defaults(shots="1", seed="0")  # unused by the probe; keeps one config path
    return ap


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _ints(text: str, key: str, problems: list[str], low: int) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        vals = ()
    if not vals or any(v < low for v in vals):
        problems.append(f"{key} {text!r}: want comma-separated integers >= {low}")
    return vals


def _config(a: argparse.Namespace, problems: list[str]) -> FewShotConfig | None:
    shots = _ints(a.shots, "--shots", problems, 1)
    seed = _ints(a.seed, "--seed", problems, 0)
    batch = _ints(a.batch_size, "--batch-size", problems, 1)
    names, urls = split_datasets(a.data.split(","))
    for url in urls:
        problems += location_problems(url)
    if not urls:
        problems.append("--data: give at least one dataset URL")
    if problems:
        return None
    try:
        return FewShotConfig(datasets=urls, names=names, shots=shots, seed=seed[0],
                             batch_size=batch[0])
    except ValueError as e:
        problems += [ln.strip() for ln in str(e).splitlines()[1:]]
        return None


def _pool_problems(cfg: FewShotConfig, command: str) -> list[str]:
    """Every dataset's problem at once, before any image is read (few-shot: images per class)."""
    problems = []
    for url in cfg.datasets:
        try:
            if command == "fewshot":
                open_pools(FewShotConfig(**{**cfg.__dict__, "datasets": (url,), "names": ()}))
            else:
                check_classes(open_pool(url, cfg.support_split))
            open_pool(url, cfg.test_split)
        except EvaluationError as e:
            problems.append(f"--data {one_line(e)}")
        except Exception as e:  # noqa: BLE001 - missing split, damaged metadata
            problems.append(f"--data {url}: {one_line(e)}")
    return problems


def evaluate_main(a: argparse.Namespace) -> int:
    from orchestration.tracking import load_model

    problems: list[str] = []
    cfg = _config(a, problems)
    model = None
    try:
        model = load_model(a.model, a.tracking_uri)
    except Exception as e:  # noqa: BLE001 - missing file, unsafe pickle, bad config: one line each
        problems.append(f"--model {a.model}: {one_line(e)}")
    try:
        if model is not None:
            check_finite_weights(model, f"--model {a.model}")
    except EvaluationError as e:
        problems.append(one_line(e))
    if cfg is not None:
        problems += _pool_problems(cfg, a.command)
    target = _promotion_target(a, cfg, problems)
    if problems or cfg is None or model is None:
        return report(problems)
    try:
        rep, l2 = _evaluate(a, model, cfg, a.model)
    except EvaluationError as e:  # NaN/Inf features: not a measurement, nothing printed as one
        return report([one_line(e)])
    for key, acc in rep.metrics().items():
        print(f"{key} {acc:.4f} (l2 {l2[key]:g})")
    if a.out:
        rep.write(a.out)
        print(f"report: {a.out}")
    if target is not None:
        return _promote(a, cfg, target, rep.metrics())
    return 0


def _evaluate(a: argparse.Namespace, model: object, cfg: FewShotConfig, name: str) -> tuple[object, dict[str, float]]:
    model = model.to(a.device)  # type: ignore[attr-defined]
    if a.command == "fewshot":
        res = evaluate_fewshot(model, cfg, device=a.device, model_name=name)
        return res.report, res.l2
    rep = evaluate_linear(model, cfg, device=a.device, model_name=name, protocol=a.protocol)
    return rep, {r.key: float(r.details["l2"]) for r in rep.rows}


def _expected_keys(a: argparse.Namespace, cfg: FewShotConfig) -> list[str]:
    """The report keys this evaluation will produce (results.ResultRow.key)."""
    if a.command == "fewshot":
        return [f"fewshot/{n}/{k}shot" for n in cfg.names or cfg.datasets for k in cfg.shots]
    return [f"linear_probe/{n}/full" for n in cfg.names or cfg.datasets]


def _promotion_target(a: argparse.Namespace, cfg: FewShotConfig | None, problems: list[str]) -> dict | None:
    """``{"name", "version", "metric"}`` for ``--promote``, checked before anything is evaluated."""
    if a.promote is None:
        if a.metric is not None:
            problems.append("--metric only applies with --promote ALIAS")
        return None
    from orchestration.experiment.config import name_problems
    from orchestration.tracking import resolve_model_source

    problems += name_problems("--promote", a.promote)
    if not a.model.startswith("models:/"):
        problems.append(f"--promote needs a registered --model (models:/NAME/VERSION or models:/NAME@ALIAS), "
                        f"got {a.model}")
        return None
    if cfg is None:
        return None
    keys = _expected_keys(a, cfg)
    metric = a.metric or (keys[0] if len(keys) == 1 else None)
    if metric not in keys:
        problems.append(f"--metric {a.metric!r}: --promote compares one number; choose one of {keys}" if a.metric
                        else f"--promote: the report has {len(keys)} numbers; choose one with --metric ({keys})")
        return None
    try:
        src = resolve_model_source(a.model, a.tracking_uri)
    except LookupError as e:
        problems.append(f"--model {a.model}: {one_line(e)}")
        return None
    return {"name": src["name"], "version": src["version"], "metric": metric}


def _promote(a: argparse.Namespace, cfg: FewShotConfig, target: dict, metrics: dict[str, float]) -> int:
    from orchestration.tracking import load_model
    from orchestration.tracking.promotion import promote

    name, metric = target["name"], target["metric"]

    def champion_value(version: int) -> float:
        uri = f"models:/{name}/{version}"
        print(f"evaluating the current {a.promote} {uri} the same way", flush=True)
        rep, _ = _evaluate(a, load_model(uri, a.tracking_uri), cfg, uri)
        return rep.metrics()[metric]

    try:
        res = promote(name, target["version"], a.promote, metric=metric, value=metrics[metric],
                      champion_value=champion_value, uri=a.tracking_uri)
    except EvaluationError as e:
        return report([f"the current {a.promote}: {one_line(e)}"])
    champ = ("" if res["champion_version"] is None else
             f" vs version {res['champion_version']} {res['champion_value']:.4f}")
    print(f"promote {a.promote}: {name}/{target['version']} {metric} {res['value']:.4f}{champ}: {res['decision']}")
    return 0


def main(argv: list[str] | None = None, prog: str = "orchestration/evaluate.py") -> int:
    a = _parser(prog).parse_args(argv)
    if a.command in ("fewshot", "linear"):
        return evaluate_main(a)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
