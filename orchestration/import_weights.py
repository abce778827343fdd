"""Import released ViT weights (the paper's ``.npz``, big_vision / AugReg, timm safetensors) into the registry.

Usage::

    python orchestration/import_weights.py B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz \\
        --name vit-b16-augreg-i1k --variant B/16 --classes imagenet1k_classes.txt
    python orchestration/import_weights.py ViT-B_16.npz --name vit-b16-i21k --num-classes 0   # embedding only
    python orchestration/import_weights.py vit_small_patch16_224.safetensors --name vit-s16-timm

The config is read off the arrays (``--variant`` checks it; a timm state dict needs it when its
shape is not one paper variant). ``--image-size`` other than the file's resamples the position
embedding; ``--num-classes 0`` drops the head (the model then serves embeddings). The eval
transform defaults to Google's (mean/std 0.5, centre crop 0.9 at < 384 px, none at >= 384 px);
``--crop-pct`` / ``--mean`` / ``--std`` override it. Pickles (``.pth``, ``.bin``, ``.pkl``) are
refused. Prints ``models:/NAME/VERSION``; the version's tags carry the source file's name and
sha256 (and AugReg's training settings parsed from the file name).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: repo root on the path
    import sys
    from pathlib import Path as _P

    sys.path.insert(0, str(_P(__file__).resolve().parents[1]))

import argparse
import json
import os
import sys
from pathlib import Path


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> int:
    from orchestration import tracking
    from orchestration.experiment import validation
    from orchestration.experiment.config import name_problems

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help=".npz (google-research/vision_transformer, big_vision, AugReg) or .safetensors (timm)")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--variant", default="", help="paper variant to check the shapes against, e.g. B/16")
    p.add_argument("--image-size", type=int, default=None, help="serve at this size (resamples the position embedding)")
    p.add_argument("--num-classes", type=int, default=None, help="0: drop the head (an embedding model)")
    p.add_argument("--classes", default=None, help="class names: a JSON list or a text file, one name per line")
    p.add_argument("--crop-pct", type=float, default=None, help="eval centre crop (default 0.9, 1.0 at >= 384 px)")
    p.add_argument("--mean", type=_floats, default=(0.5, 0.5, 0.5), help="normalisation mean, R,G,B")
    p.add_argument("--std", type=_floats, default=(0.5, 0.5, 0.5), help="normalisation std, R,G,B")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI or sqlite)")
    a = p.parse_args(argv)
    tracking.install_log_redaction()
    problems = []
    if not (os.path.isfile(a.file) and os.access(a.file, os.R_OK)):
        problems.append(f"{a.file}: no such readable file")
    problems += name_problems("--name", a.name)
    if a.image_size is not None and a.image_size <= 0:
        problems.append(f"--image-size {a.image_size} must be > 0")
    if a.num_classes is not None and a.num_classes < 0:
        problems.append(f"--num-classes {a.num_classes} must be >= 0")
    if problems:
        return validation.report(problems)
    from orchestration.tracking.importer import import_weights

    try:
        res = import_weights(Path(a.file), name=a.name, variant=a.variant, image_size=a.image_size,
                             num_classes=a.num_classes, classes=a.classes, crop_pct=a.crop_pct, mean=a.mean,
                             std=a.std, uri=a.tracking_uri)
    except (ValueError, OSError) as e:
        return validation.report([validation.one_line(e)])
    print(json.dumps({k: res[k] for k in ("name", "version", "uri", "run_id")}))
    print(res["uri"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
