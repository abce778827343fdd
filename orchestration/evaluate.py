"""Evaluate a pre-trained ViT the way the ViT paper reports it.

Examples::

    # few-shot linear (frozen pre-logits, closed-form ridge, K images per class of the train split)
    python orchestration/evaluate.py fewshot --model models:/vit-mu4-digits/1 \\
        --data s3://vitscale/digits --shots 1,5,10,25 --out fewshot.json

    # linear probe (frozen pre-logits, the whole train split, the same ridge)
    python orchestration/evaluate.py linear --model run/export/model.safetensors --data s3://vitscale/digits

``--model``: ``models:/NAME/VERSION``, ``runs:/ID/PATH``, a ``.safetensors`` file or a model
folder. ``--data``: one or more datasets written by ``pipeline.write_shards`` (train split =
support / probe training set, ``val`` = test), ``NAME=URL`` to name one in the report. Every
result is a row of the shared report format (:mod:`orchestration.evaluation.report`). The code
lives in :mod:`orchestration.evaluation`; this file is the command users run.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: python orchestration/evaluate.py
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[1]))

import sys

from orchestration.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="orchestration/evaluate.py"))
