#!/bin/bash
# The architecture study of docs/architectures.md, end to end (2 CPU cores: ~6 minutes of training).
# Usage: bash docs/studies/digits-archs/run.sh [WORK_DIR]   (default /tmp/archstudy)
set -euo pipefail
cd "$(dirname "$0")/../../.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=${PYTHON:-.venv/bin/python}
W=${1:-/tmp/archstudy}
mkdir -p "$W/dg"
# upstream (pre-training): digits 0-4; downstream (10-shot): digits 5-9, never seen in pre-training
$PY -m pipeline.demo_data digits "$W/dg/up" --image-size 32 && cp -r "$W/dg/up" "$W/dg/down"
rm -r "$W"/dg/up/{5,6,7,8,9} "$W"/dg/down/{0,1,2,3,4}
$PY -m pipeline.write_shards "$W/dg/up" "$W/dg/up-shards" --val-fraction 0.1
$PY -m pipeline.write_shards "$W/dg/down" "$W/dg/down-shards" --val-fraction 0.5
# five architectures at 1.7-2.0 M multiply-adds per 32 px image (model.flops counts each)
V="mu/4"
V="$V,timm:deit_tiny_patch16_224:patch_size=4:embed_dim=32:depths=2:num_heads=2:mlp_ratio=2.0"
V="$V,timm:swin_tiny_patch4_window7_224:patch_size=2:embed_dim=16:depths=1,1:num_heads=1,2:window_size=4"
V="$V,timm:pvt_v2_b0:embed_dim=24,48:depths=1,1:num_heads=1,2:sr_ratios=4,1"
V="$V,timm:cait_xxs24_224:patch_size=4:embed_dim=32:depths=2:num_heads=2:mlp_ratio=2.0:class_depth=1"
$PY orchestration/sweep.py --study scaling --variants "$V" \
    --steps 150,300,600 --evals-per-trial 3 \
    --data "$W/dg/up-shards" --fewshot-data digits59="$W/dg/down-shards" \
    --metric fewshot/digits59/10shot --image-size 32 --batch-size 32 --lr 2e-3 --crop-min 0.6 --no-hflip \
    --loader-workers 0 --storage "$W/studies" --name digits-archs --no-tracking
$PY -m orchestration.studies.arch_plot "$W/studies/digits-archs-analysis/points.parquet" \
    --out "$W/studies/digits-archs-analysis" --metric eval_top1 --metric fewshot/digits59/10shot
