"""Plan a run before paying for it: memory per GPU, time, data rate, checkpoints and cost.

Examples::

    python orchestration/plan.py --recipe vit_h14_jft --gpus 64 --gpu h100
    python orchestration/plan.py --recipe vit_b16_i21k --gpus 8 --gpu a100 --data s3://bucket/imagenet21k \\
        --price-per-gpu-hour 2.5 --json plan.json
    python orchestration/plan.py --recipe vit_h14_jft --gpus 1 --gpu t4 --set train.engine.zero_stage=1

Nothing is started and nothing is allocated: the model is traced on the meta device. A run that
does not fit says so and lists the changes that make it fit (``--set ...``, ``--gpus``), each
re-planned. Where every number comes from: docs/planning.md. The last stdout line is
``VITSCALE_RESULT {json}`` (the plan), as for every CLI.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[1]))

import argparse
import json
import sys
from pathlib import Path

from orchestration.experiment import RECIPES, OverrideError, apply_overrides, get_recipe, validation
from orchestration.planning import DEVICES, default_facts, get_device, plan, read_facts, render

RESULT_PREFIX = "VITSCALE_RESULT "


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orchestration/plan.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=False, help=f"recipe name: {', '.join(sorted(RECIPES))}")
    p.add_argument("--gpus", type=int, default=None, help="number of devices (default: the recipe's workers)")
    p.add_argument("--gpu", default="h100", help=f"device kind: {', '.join(DEVICES)} (default h100)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="typed override, repeatable, as for pretrain.py: train.engine.zero_stage=3, train.micro_batch=16")
    p.add_argument("--data", default=None, help="dataset URL written by write_shards: its index gives the images, "
                   "classes, bytes per sample and shards (default: the recipe's dataset at the paper's size)")
    p.add_argument("--storage-gbs", type=float, default=1.0,
                   help="checkpoint write bandwidth per node, GB/s (default 1.0)")
    p.add_argument("--price-per-gpu-hour", type=float, default=None, help="price of one GPU-hour, for the cost")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the plan as JSON to this file")
    p.add_argument("--list-recipes", action="store_true", help="print the recipe names and exit")
    return p


def problems_of_args(args: argparse.Namespace) -> list[str]:
    """Everything wrong with the arguments, before any tracing."""
    p: list[str] = []
    if not args.recipe:
        p.append("--recipe is required (--list-recipes prints them)")
    elif args.recipe not in RECIPES:
        p.append(f"unknown --recipe {args.recipe!r}; valid recipes: {', '.join(sorted(RECIPES))}")
    if args.gpu.strip().lower() not in DEVICES:
        p.append(f"unknown --gpu {args.gpu!r}; choose one of {', '.join(DEVICES)}")
    if args.gpus is not None and args.gpus < 1:
        p.append(f"--gpus {args.gpus}: need at least 1")
    if not args.storage_gbs > 0:
        p.append(f"--storage-gbs {args.storage_gbs}: must be > 0 (GB/s per node)")
    if args.price_per_gpu_hour is not None and not args.price_per_gpu_hour >= 0:
        p.append(f"--price-per-gpu-hour {args.price_per_gpu_hour}: must be >= 0")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        p.append(f"--json {args.json}: folder {Path(args.json).resolve().parent} does not exist")
    if args.data:
        p += validation.location_problems(args.data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_recipes:
        print("\n".join(sorted(RECIPES)))
        return 0
    problems = problems_of_args(args)
    if problems:
        return validation.report(problems)
    try:
        exp = apply_overrides(get_recipe(args.recipe), args.overrides)
    except (OverrideError, ValueError) as e:
        return validation.report(validation.problems_of(e))
    try:
        facts = read_facts(args.data) if args.data else default_facts(exp.dataset_name)
    except Exception as e:  # noqa: BLE001 - unreadable / missing dataset: one line, like pretrain.py
        return validation.report([f"--data {args.data}: cannot read the dataset's index "
                                  f"({type(e).__name__}: {validation.one_line(e)})"])
    try:
        result = plan(exp, get_device(args.gpu), gpus=args.gpus or exp.resources.workers, data=facts,
                      storage_gbs=args.storage_gbs, price=args.price_per_gpu_hour)
    except ValueError as e:
        return validation.report(validation.problems_of(e))
    d = result.to_dict()
    print(render(d))
    if args.json:
        Path(args.json).write_text(json.dumps(d, indent=2) + "\n")
    print(RESULT_PREFIX + json.dumps({k: d[k] for k in ("recipe", "device", "gpus")} | {
        "fits": d["memory"]["fits"], "peak_bytes": d["memory"]["peak"], "step_s": d["compute"]["step_s"],
        "run_s": d["compute"]["run_s"], "gpu_hours": d["cost"]["gpu_hours"], "cost": d["cost"]["total"],
        "fixes": [f["command"] for f in d["fixes"]], "speedups": [f["command"] for f in d["speedups"]]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
