"""Attention maps of a model over images: the ``visualize.py`` CLI.

Usage::

    python orchestration/visualize.py --model models:/vit-mu4-digits/1 --image digit.jpg --out attn/
    python orchestration/visualize.py --model runs:/<RUN_ID>/weights/model.safetensors --image cat.jpg --out attn/
    python orchestration/visualize.py --model weights/model.safetensors --image cat.jpg --out attn/

Writes ``<out>/<stem>_cls_attention.png`` and ``<out>/<stem>_rollout.png`` per image
(:func:`orchestration.tracking.attention_figures.attention_figures`). Models load through
:func:`orchestration.tracking.load_model` (safetensors + config only; pickles are refused).
A model with NaN/Inf weights, or whose attention comes out NaN/Inf, is refused (one ``error:``
line, exit 2) rather than drawn as blank maps.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file (python orchestration/visualize.py): repo root on the path
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[1]))

import argparse
import os
from pathlib import Path

from orchestration import tracking
from orchestration.evaluation.checks import EvaluationError, check_finite_weights
from orchestration.experiment import validation
from orchestration.tracking.attention_figures import (
    NonFiniteAttention,
    attention_figures,
    compute_attention,
    load_image,
)

__all__ = ["attention_figures", "compute_attention", "load_image", "main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME/VERSION | runs:/ID/PATH | weights.safetensors")
    p.add_argument("--image", required=True, nargs="+", help="image file(s)")
    p.add_argument("--out", default="attention", help="output folder (default: ./attention)")
    p.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: drop this fraction of weakest links")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI or sqlite)")
    args = p.parse_args(argv)
    tracking.install_log_redaction()
    problems = [f"--image {path}: no such readable file" for path in args.image
                if not (os.path.isfile(path) and os.access(path, os.R_OK))]
    if not 0.0 <= args.discard_ratio < 1.0:  # also false for nan
        problems.append(f"--discard-ratio {args.discard_ratio} must be in [0, 1)")
    problems += validation.storage_problems(args.out, "--out")
    model = None
    try:
        model = tracking.load_model(args.model, args.tracking_uri).float().eval()
    except Exception as e:  # noqa: BLE001 - missing file, unknown registry name, not a model: one line
        problems.insert(0, f"--model {args.model}: {validation.one_line(e)}")
    try:
        if model is not None:
            check_finite_weights(model, f"--model {args.model}")
    except EvaluationError as e:  # NaN/Inf weights would be drawn as blank maps
        problems.insert(0, validation.one_line(e))
    if problems or model is None:
        return validation.report(problems)
    for path in args.image:
        x = load_image(path, model.cfg.image_size)
        try:
            outs = attention_figures(model, x, Path(args.out), stem=Path(path).stem, discard_ratio=args.discard_ratio)
        except (NonFiniteAttention, EvaluationError) as e:
            return validation.report([f"--model {args.model} on --image {path}: {validation.one_line(e)}"])
        for out in outs:
            print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
