"""CLI: fit the scaling law of a study's points table, draw its plots, print the report.

Zhai et al. 2021's saturating power law E = a·(C + d)^(−b) + c, fitted to the compute-efficient
frontier (:mod:`orchestration.studies.law`); plots and ``fit_<metric>.json`` by
:func:`orchestration.studies.scaling_report.analyze`. Pure numpy/scipy/matplotlib/pyarrow: runs on a
laptop on a table copied off the cluster::

    python -m orchestration.scaling study/points.parquet --out study/analysis
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file (python orchestration/scaling.py)
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[1]))

import argparse
import sys
from collections.abc import Sequence

from orchestration.studies.scaling_report import analyze, format_report
from orchestration.studies.table import METRICS, read_points


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestration.scaling", description=__doc__.split("\n")[0])
    p.add_argument("table", help="points table (Parquet) written by orchestration.sweep")
    p.add_argument("--out", required=True, help="directory for fit_<metric>.json and the PNG plots")
    p.add_argument("--metric", default="eval_error",
                   help=f"{', '.join(METRICS)} or a logged-metric column, e.g. fewshot/NAME/10shot")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples of trials")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drop-nonfinite", action="store_true", help="drop NaN/inf points (diverged trials)")
    args = p.parse_args(argv)
    try:
        report = analyze(read_points(args.table), args.out, metric=args.metric, n_boot=args.n_boot,
                         confidence=args.confidence, seed=args.seed, drop_nonfinite=args.drop_nonfinite)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
