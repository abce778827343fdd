#!/usr/bin/env bash
# The GPU checks, as one script for the lent GPU machine (see BENCHMARKS.md):
#   model step ours/timm (S/16 bf16) + B/16 img/s and MFU, and the Trainer's B/16 bf16 MFU
#   and Trainer / plain-compiled-loop ratio (issue #15 goals: >= 45 % MFU, ratio <= 1.05).
# The GPU image has torch + timm but no DeepSpeed: wheels built here travel in .whl/
# (`pip wheel --no-deps deepspeed==0.19.8`, plus hjson and pydantic for cp312).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
out=${OUT:-/tmp}
python3 bench/model_step.py --device cuda --dtype bf16 --batch 64 --iters 20 --warmup 5 --mfu-batch 256 \
  2>&1 | tee "$out/model_step.txt"
# The Trainer compiles through TrainConfig.compile (inside DeepSpeed), the baseline with model.compile().
timeout 300 python3 bench/train_step.py --device cuda --compile --batch 256 2>&1 | tee "$out/train_step.txt"
echo "== issue #15 summary (B/16 bf16, batch 256, compiled) =="
grep -E "^(Trainer |plain   ):|^ratio Trainer / plain" "$out/train_step.txt" || echo "train_step.py produced no summary: see $out/train_step.txt"
# Issue #29: the plan's activation memory (torch.cuda.max_memory_allocated) and step time vs a real B/16 step.
echo "== issue #29: plan vs measured (B/16 bf16, micro 128) =="
timeout 300 python3 bench/plan_check.py --device cuda --variant B/16 --image-size 224 --micro 128 --precision bf16 \
  --iters 10 2>&1 | tee "$out/plan_check.txt"
