#!/usr/bin/env bash
# End-to-end smoke run (`make smoke`): local S3 + Ray head -> demo dataset in the bucket ->
# `ray job submit` pre-training (ViT-S/16 on a CUDA GPU, else the tiny CPU recipe) -> model
# registry -> `ray job submit` fine-tuning of the registered model at a higher resolution ->
# attention maps -> summary. Stops the services it started on exit (trap), whatever happens.
#
# Knobs: VITSCALE_STATE_DIR (default .vitscale/smoke/, its own services and MLflow store next to
#        those of `make services-up`; wiped at start, kept at the end for the MLflow UI),
#        SMOKE_STEPS / SMOKE_FT_STEPS (pre-training / fine-tuning steps), AWS_ENDPOINT_URL
#        (use a real S3/MinIO instead of moto; the bucket SMOKE_BUCKET must be writable).
# Tracking: the embedded sqlite store in the state dir by default;
#        MLFLOW_TRACKING_URI=http://HOST:PORT (user:password@ allowed, never printed) targets an
#        `mlflow server` you run (health-checked on /health before anything starts);
#        SMOKE_MLFLOW_SERVER=1 starts one here (sqlite store + artifacts proxied by the server,
#        both in the state dir) and stops it by pid at the end.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export VITSCALE_STATE_DIR="${VITSCALE_STATE_DIR:-${VITSCALE_HOME:-$ROOT/.vitscale}/smoke}"
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
(cd "$STATE" && rm -rf mlflow.db mlruns runs ray_results digits attention logs env.sh ./*.json ./*.log \
  mlflow-server.db mlflow-artifacts mlflow-server.pid)
stop_mlflow_server() {  # the server leads its own process group (setsid): its workers go with it
  [[ -f "$STATE/mlflow-server.pid" ]] || return 0
  local pid i
  pid=$(cat "$STATE/mlflow-server.pid")
  kill -TERM -- "-$pid" 2>/dev/null || true
  for ((i = 0; i < 60; i++)); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.25; done
  kill -KILL -- "-$pid" 2>/dev/null || true  # still there after 15 s
  rm -f "$STATE/mlflow-server.pid"
  say "stopped mlflow server (pid $pid)"
}
trap 'say "stopping services"; stop_mlflow_server; bash "$ROOT/infra/local/stop_services.sh"' EXIT
trap 'exit 130' INT TERM
# Never echo a tracking URI as given: it may carry user:password@.
redacted_uri() { sed -E 's#://[^/@]+@#://***@#' <<< "$1"; }
wait_mlflow() {  # wait_mlflow URI SECONDS: poll URI/health until it answers 200
  "$PY" - "$1" "$2" <<'PYEOF'
import sys, time, urllib.request
from urllib.parse import urlsplit

p = urlsplit(sys.argv[1].rstrip("/"))
base = f"{p.scheme}://{p.hostname}" + (f":{p.port}" if p.port else "") + p.path  # no user:password@
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception as e:  # noqa: BLE001 - any failure means "not yet"
        if time.monotonic() > deadline:
            sys.exit(f"MLflow server {base} is not healthy after {sys.argv[2]}s ({type(e).__name__}); start it "
                     "(mlflow server --backend-store-uri sqlite:///mlflow.db --serve-artifacts ...) or unset "
                     "MLFLOW_TRACKING_URI")
    time.sleep(0.5)
PYEOF
}
if [[ "${SMOKE_MLFLOW_SERVER:-0}" == 1 ]]; then
  MLFLOW_PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
  say "starting mlflow server on $MLFLOW_TRACKING_URI (sqlite store, proxied artifacts in $STATE)"
  setsid "$PY" -m mlflow server --backend-store-uri "sqlite:///$STATE/mlflow-server.db" --serve-artifacts \
    --artifacts-destination "$STATE/mlflow-artifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    > "$STATE/mlflow-server.log" 2>&1 &
  echo $! > "$STATE/mlflow-server.pid"
  wait_mlflow "$MLFLOW_TRACKING_URI" 180
elif [[ "${MLFLOW_TRACKING_URI:-}" == http* ]]; then
  say "tracking to the MLflow server at $(redacted_uri "$MLFLOW_TRACKING_URI")"
  wait_mlflow "$MLFLOW_TRACKING_URI" 30
fi

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
  PRE_SET=(--set "train.schedule.total_steps=$STEPS" --set train.schedule.warmup_steps=30 --set train.eval_every=100
           --set train.checkpoint.every=100 --set data.io.num_workers=2)
  FT_SET=(--set "train.schedule.total_steps=$FT_STEPS" --set train.schedule.warmup_steps=10 --set train.global_batch=64
          --set train.optim.lr=0.01 --set train.eval_every=50 --set train.checkpoint.every=50 --set train.engine.precision=fp16)
else
  RECIPE=vit_mu_smoke; FT_SIZE=48; FT_GPUS=0; FT_WORKERS=2
  STEPS="${SMOKE_STEPS:-300}"; FT_STEPS="${SMOKE_FT_STEPS:-120}"
  PRE_SET=(--set "train.schedule.total_steps=$STEPS")
  FT_SET=(--set "train.schedule.total_steps=$FT_STEPS" --set train.schedule.warmup_steps=12 --set train.global_batch=64
          --set train.optim.lr=0.03 --set train.eval_every=60 --set train.checkpoint.every=60)
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
if uri.startswith("http"):  # a server: its own UI (the result line carries the URI redacted)
    print(f"MLflow UI          {uri}")
else:
    print(f"MLflow UI          mlflow ui --backend-store-uri {uri} --port 5000   (then open http://127.0.0.1:5000)")
print(f"total              {secs}s")
print("========================================================")
PYEOF
