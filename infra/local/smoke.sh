#!/usr/bin/env bash
# End-to-end smoke run (`make smoke`): local S3 + Ray head -> demo dataset in the bucket ->
# `ray job submit` pre-training (ViT-S/16 on a CUDA GPU, else the tiny CPU recipe) -> model
# registry -> `ray job submit` fine-tuning of the registered model at a higher resolution ->
# attention maps -> summary. Stops the services it started on exit (trap), whatever happens.
#
# Knobs: VITSCALE_STATE_DIR (default .smoke/; wiped at start, kept at the end for the MLflow UI),
#        SMOKE_STEPS / SMOKE_FT_STEPS (pre-training / fine-tuning steps), AWS_ENDPOINT_URL
#        (use a real S3/MinIO instead of moto; the bucket SMOKE_BUCKET must be writable).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export VITSCALE_STATE_DIR="${VITSCALE_STATE_DIR:-$ROOT/.smoke}"
STATE="$VITSCALE_STATE_DIR"
PY="${PYTHON:-python}"
export PYTHON="$PY"
BUCKET="${SMOKE_BUCKET:-vitscale-smoke}"
T0=$(date +%s)
say() { printf '\n[smoke %4ds] %s\n' "$(($(date +%s) - T0))" "$*"; }

if [[ -f "$STATE/ray.pid" ]] && kill -0 "$(cat "$STATE/ray.pid")" 2>/dev/null; then
  echo "services from an earlier run are still up in $STATE; run infra/local/stop_services.sh first" >&2
  exit 1
fi
# Start from a clean slate, removing only what an earlier smoke run wrote there.
mkdir -p "$STATE"
(cd "$STATE" && rm -rf mlflow.db mlruns runs ray_results digits attention logs env.sh ./*.json ./*.log)
trap 'say "stopping services"; bash "$ROOT/infra/local/stop_services.sh"' EXIT
trap 'exit 130' INT TERM

# Runs (checkpoints, exported weights) live in the bucket too: the S3 CheckpointStore path.
export VITSCALE_STORAGE="${VITSCALE_STORAGE:-s3://$BUCKET/runs}"
say "starting local services (moto S3 unless AWS_ENDPOINT_URL is set, Ray head)"
bash infra/local/start_services.sh
# shellcheck disable=SC1091
source "$STATE/env.sh"

DATA="s3://$BUCKET/digits"
say "building the demo dataset: sklearn digits -> I21k-style folder -> shards at $DATA"
"$PY" - "$BUCKET" <<'PYEOF'
import sys, boto3
s3 = boto3.client("s3")
try:
    s3.head_bucket(Bucket=sys.argv[1])
except Exception:
    s3.create_bucket(Bucket=sys.argv[1])
PYEOF
"$PY" -m pipeline.demo_data digits "$STATE/digits" > /dev/null
"$PY" -m pipeline.write_shards "$STATE/digits" "$DATA" --val-fraction 0.2 --samples-per-shard 300 \
  --workers 1 --quiet

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  RECIPE=vit_s16_t4; FT_SIZE=288; FT_GPUS=1; FT_WORKERS=1  # one T4
  STEPS="${SMOKE_STEPS:-300}"; FT_STEPS="${SMOKE_FT_STEPS:-100}"
  PRE_SET=(--set "train.total_steps=$STEPS" --set train.warmup_steps=30 --set train.eval_every=100
           --set train.checkpoint_every=100 --set data.num_workers=2)
  FT_SET=(--set "train.total_steps=$FT_STEPS" --set train.warmup_steps=10 --set train.global_batch=64
          --set train.lr=0.01 --set train.eval_every=50 --set train.checkpoint_every=50 --set train.precision=fp16)
else
  RECIPE=vit_mu_smoke; FT_SIZE=48; FT_GPUS=0; FT_WORKERS=2
  STEPS="${SMOKE_STEPS:-300}"; FT_STEPS="${SMOKE_FT_STEPS:-120}"
  PRE_SET=(--set "train.total_steps=$STEPS")
  FT_SET=(--set "train.total_steps=$FT_STEPS" --set train.warmup_steps=12 --set train.global_batch=64
          --set train.lr=0.03 --set train.eval_every=60 --set train.checkpoint_every=60)
fi

say "ray job submit: pre-training recipe $RECIPE ($STEPS steps) on $DATA"
ray job submit --working-dir . --entrypoint-num-cpus 0 -- \
  python orchestration/pretrain.py --recipe "$RECIPE" --data "$DATA" --experiment smoke "${PRE_SET[@]}" \
  2>&1 | tee "$STATE/pretrain.log" | grep -E "VITSCALE_RESULT|Error|error:|Traceback|succeeded|failed" || true
grep -q '^VITSCALE_RESULT ' "$STATE/pretrain.log" || { echo "pre-training job failed; see $STATE/pretrain.log" >&2; exit 1; }
grep '^VITSCALE_RESULT ' "$STATE/pretrain.log" | tail -1 | cut -d' ' -f2- > "$STATE/pretrain.json"
MODEL_URI=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["model_uri"])' "$STATE/pretrain.json")

say "ray job submit: fine-tuning $MODEL_URI at ${FT_SIZE}px ($FT_STEPS steps)"
ray job submit --working-dir . --entrypoint-num-cpus 0 -- \
  python orchestration/finetune.py --from "$MODEL_URI" --data "$DATA" --image-size "$FT_SIZE" \
  --workers "$FT_WORKERS" --gpus-per-worker "$FT_GPUS" "${FT_SET[@]}" \
  2>&1 | tee "$STATE/finetune.log" | grep -E "VITSCALE_RESULT|Error|error:|Traceback|succeeded|failed" || true
grep -q '^VITSCALE_RESULT ' "$STATE/finetune.log" || { echo "fine-tuning job failed; see $STATE/finetune.log" >&2; exit 1; }
grep '^VITSCALE_RESULT ' "$STATE/finetune.log" | tail -1 | cut -d' ' -f2- > "$STATE/finetune.json"
FT_URI=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["model_uri"])' "$STATE/finetune.json")

say "attention maps of $FT_URI"
IMG=$("$PY" -c 'import pathlib, sys; print(min(pathlib.Path(sys.argv[1]).rglob("*.jpg")))' "$STATE/digits")
"$PY" orchestration/visualize.py --model "$FT_URI" --image "$IMG" --out "$STATE/attention" > /dev/null

"$PY" - "$STATE" "$(($(date +%s) - T0))" <<'PYEOF'
import json, sys
state, secs = sys.argv[1], int(sys.argv[2])
pre = json.load(open(f"{state}/pretrain.json"))
ft = json.load(open(f"{state}/finetune.json"))
def pct(v):
    return "n/a" if v is None else f"{100 * float(v):.1f}%"
uri = pre["tracking_uri"]
print("\n================ vitscale smoke summary ================")
print(f"pre-training run   {pre['run_id']}  (experiment {pre['experiment']})")
print(f"  registered       {pre['model_uri']}  steps={int(pre['metrics'].get('step', 0))}"
      f"  eval top-1={pct(pre['metrics'].get('eval_top1'))}")
print(f"fine-tuning run    {ft['run_id']}  (nested under {ft['source_run_id']})")
print(f"  registered       {ft['model_uri']}  {ft['image_size_before']}px -> {ft['image_size_after']}px")
print(f"top-1 before/after fine-tuning: {pct(ft['top1_before'])} -> {pct(ft['top1_after'])}")
print(f"attention maps     {state}/attention/")
print(f"MLflow UI          mlflow ui --backend-store-uri {uri} --port 5000   (then open http://127.0.0.1:5000)")
print(f"total              {secs}s")
print("========================================================")
PYEOF
