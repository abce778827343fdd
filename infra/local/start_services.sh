#!/usr/bin/env bash
# Start the local services vitscale needs: an S3 endpoint and a Ray head, both on 127.0.0.1.
#
#   infra/local/start_services.sh     # `make services-up`; state (pids, logs, env.sh) in the state dir
#   source .vitscale/env.sh           # AWS_*, RAY_ADDRESS, MLFLOW_TRACKING_URI, VITSCALE_HOME, ...
#   infra/local/stop_services.sh      # `make services-down`: stops exactly what this script started (by pid)
#
# State dir: $VITSCALE_STATE_DIR (tests, `make smoke`), else $VITSCALE_HOME, else .vitscale/ in the
# checkout: the project's state dir (orchestration/state.py), whose mlflow.db and runs/ are also
# the defaults without env.sh, so a shell with env.sh and one without share one tracking store.
# A bucket s3://$VITSCALE_BUCKET (default vitscale; empty: none) is created if it is missing.
#
# S3: a moto server (real S3 wire protocol) unless AWS_ENDPOINT_URL already points at a real
# store (MinIO, S3), which is then used as is with the caller's credentials.
# Ray: `ray start --head --block` in the background with its own temp dir and free ports, so it
# never collides with (or attaches to) another Ray on the machine; SIGTERM to that one pid
# shuts its whole process tree down. Both get a health check before this script returns.
#
# Multi-node: VITSCALE_RAY_WORKER_NODES=N (default 0) also starts N worker nodes, each a
# separate raylet joined with `ray start --address <gcs> --block` (infra/local/start_worker_node.sh:
# own IP 127.0.0.(i+1), temp dir, TMPDIR, VITSCALE_RAY_WORKER_CPUS CPUs, custom resource node_i),
# each health-checked. The head then also gets its own TMPDIR. Run storage must then be s3://
# (VITSCALE_STORAGE, VITSCALE_RAY_STORAGE): no node may read another node's local disk.
# infra/local/kill_node.sh i kills node i's whole process tree (fault tests).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${VITSCALE_STATE_DIR:-${VITSCALE_HOME:-$ROOT/.vitscale}}"
PY="${PYTHON:-python}"
RAY_BIN="${RAY_BIN:-ray}"
mkdir -p "$STATE/logs"
STATE="$(cd "$STATE" && pwd -P)"  # absolute, as Python resolves it: env.sh is sourced from anywhere
ENV_FILE="$STATE/env.sh"

log() { printf '[services] %s\n' "$*" >&2; }
# The env.sh to source, as short as it can be said from here.
env_hint() {
  local rel="$ENV_FILE" here
  here="$(pwd -P)"
  [[ "$ENV_FILE" == "$here"/* ]] && rel="${ENV_FILE#"$here"/}"
  log "in every shell that uses them: source $rel   (stop them: make services-down)"
}
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# wait_http URL SECONDS NAME PID: poll until URL answers (any HTTP status), or fail if PID died.
wait_http() {
  local url=$1 secs=$2 name=$3 pid=$4 i
  for ((i = 0; i < secs * 4; i++)); do
    if "$PY" - "$url" <<'PYEOF' 2>/dev/null; then return 0; fi
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError:
    pass  # the server answered
PYEOF
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name (pid $pid) exited during start-up; see $STATE/logs/$name.log"
      tail -20 "$STATE/logs/$name.log" >&2 || true
      return 1
    fi
    sleep 0.25
  done
  log "$name did not answer on $url within ${secs}s; see $STATE/logs/$name.log"
  return 1
}

WORKER_NODES="${VITSCALE_RAY_WORKER_NODES:-0}"
if ! [[ "$WORKER_NODES" =~ ^[0-9]+$ ]] || ((WORKER_NODES > 253)); then
  log "VITSCALE_RAY_WORKER_NODES must be an integer in 0..253, got '$WORKER_NODES'"
  exit 2
fi
case "${VITSCALE_RAY_NODE_ISOLATION:-auto}" in
  auto | mount | none) ;;
  *) log "VITSCALE_RAY_NODE_ISOLATION must be auto, mount or none, got '$VITSCALE_RAY_NODE_ISOLATION'"; exit 2 ;;
esac
if [[ -f "$STATE/ray.pid" ]] && kill -0 "$(cat "$STATE/ray.pid")" 2>/dev/null; then
  log "services already running (state in $STATE); stop them with infra/local/stop_services.sh"
  env_hint
  exit 0
fi
: > "$ENV_FILE"

# ---- S3 -------------------------------------------------------------------------------------
if [[ -n "${AWS_ENDPOINT_URL:-}" ]]; then
  log "using the S3 endpoint from AWS_ENDPOINT_URL (${AWS_ENDPOINT_URL}); no moto server started"
  echo "export AWS_ENDPOINT_URL='${AWS_ENDPOINT_URL}'" >> "$ENV_FILE"
else
  S3_PORT=$(free_port)
  "$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT" > "$STATE/logs/moto.log" 2>&1 &
  echo $! > "$STATE/moto.pid"
  wait_http "http://127.0.0.1:$S3_PORT/" 60 moto "$(cat "$STATE/moto.pid")"
  log "moto S3 on http://127.0.0.1:$S3_PORT (pid $(cat "$STATE/moto.pid"))"
  # Dummy credentials for the local moto server only (never real secrets).
  cat >> "$ENV_FILE" <<EOT
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
EOT
fi

# ---- MLflow / storage defaults (inherited by the Ray head, hence by every job and worker) ----
# VITSCALE_HOME: jobs run from a copy of the checkout (ray job submit --working-dir), whose own
# default state dir would vanish with the job. VITSCALE_CHECKOUT: where such a job finds the git
# commit of the code it runs (Ray leaves .git out of the copy; orchestration/tracking/runs.py).
echo "export VITSCALE_HOME='$STATE'" >> "$ENV_FILE"
echo "export VITSCALE_CHECKOUT='$ROOT'" >> "$ENV_FILE"
echo "export MLFLOW_TRACKING_URI='${MLFLOW_TRACKING_URI:-sqlite:///$STATE/mlflow.db}'" >> "$ENV_FILE"
echo "export VITSCALE_STORAGE='${VITSCALE_STORAGE:-$STATE/runs}'" >> "$ENV_FILE"
echo "export VITSCALE_RAY_STORAGE='${VITSCALE_RAY_STORAGE:-$STATE/ray_results}'" >> "$ENV_FILE"
# shellcheck disable=SC1090
source "$ENV_FILE"
BUCKET="${VITSCALE_BUCKET-vitscale}"
if [[ -n "$BUCKET" ]]; then
  if "$PY" - "$BUCKET" <<'PYEOF'; then log "bucket s3://$BUCKET ready"; else log "could not create bucket s3://$BUCKET (continuing)"; fi
import sys

import boto3
from botocore.exceptions import ClientError

s3 = boto3.client("s3")
try:
    s3.head_bucket(Bucket=sys.argv[1])
except ClientError:
    s3.create_bucket(Bucket=sys.argv[1])
PYEOF
fi

# ---- Ray head -------------------------------------------------------------------------------
GCS_PORT=$(free_port); DASH_PORT=$(free_port); CLIENT_PORT=$(free_port)
AGENT_HTTP=$(free_port); AGENT_GRPC=$(free_port); RTENV_PORT=$(free_port); METRICS_PORT=$(free_port)
RAY_TMP="/tmp/vsray-$(date +%s)-$$"  # short: Ray's unix socket paths must stay < 108 bytes
echo "$RAY_TMP" > "$STATE/ray.tmpdir"
NUM_CPUS="${VITSCALE_RAY_CPUS:-4}"  # logical slots (2 train workers + fine-tune + spare), not cores
HEAD_TMPDIR="${TMPDIR:-/tmp}"
HEAD_LAUNCH=()
ISOLATION=none
if ((WORKER_NODES > 0)); then
  # Each node its own TMPDIR (what tempfile gives its processes), as separate machines have.
  # Isolation (VITSCALE_RAY_NODE_ISOLATION=auto|mount|none; auto = mount where allowed): every
  # node runs in its own mount namespace and sees its own folder at one common path,
  # $RAY_TMP-tmp, like /tmp on separate machines (same path, different disks); worker nodes
  # also see the head's temp dir as an empty tmpfs (start_worker_node.sh). Without mount
  # namespaces (needs root/CAP_SYS_ADMIN) each node's TMPDIR is its own real path instead.
  ISOLATION="${VITSCALE_RAY_NODE_ISOLATION:-auto}"
  can_unshare() { unshare --mount --propagation private true 2>/dev/null; }
  case "$ISOLATION" in
    auto) if can_unshare; then ISOLATION=mount; else ISOLATION=none; fi ;;
    mount) can_unshare || { log "VITSCALE_RAY_NODE_ISOLATION=mount needs 'unshare --mount' (root/CAP_SYS_ADMIN); use auto or none"; exit 2; } ;;
    none) ;;
    *) log "VITSCALE_RAY_NODE_ISOLATION must be auto, mount or none, got '$ISOLATION'"; exit 2 ;;
  esac
  HEAD_TMPDIR="$RAY_TMP/tmp"
  mkdir -p "$HEAD_TMPDIR"
  if [[ "$ISOLATION" == mount ]]; then
    mkdir -p "$RAY_TMP-tmp"
    # unshare execs (no fork): the recorded pid stays the `ray start` process.
    # shellcheck disable=SC2016
    HEAD_LAUNCH=(unshare --mount --propagation private bash -ec 'mount --bind "$1" "$2"; shift 2; exec "$@"' \
      _ "$HEAD_TMPDIR" "$RAY_TMP-tmp")
    HEAD_TMPDIR="$RAY_TMP-tmp"
  fi
fi
echo "$ISOLATION" > "$STATE/ray.isolation"
# Token auth stays on: a loopback head still runs code for every local user who reaches its
# ports. The cluster's token is made here, for this cluster only, inside the state dir (0600,
# never printed); RAY_AUTH_TOKEN_PATH points the head, every worker, `ray job submit` and the
# job drivers at it, so nothing is read from or written to ~/.ray. stop_services.sh removes it.
TOKEN_FILE="$STATE/ray_auth_token"
( umask 077; rm -f "$TOKEN_FILE"; "$PY" -c 'import secrets, sys; sys.stdout.write(secrets.token_hex(32))' > "$TOKEN_FILE" )
chmod 600 "$TOKEN_FILE"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE"
unset RAY_AUTH_TOKEN  # a token inherited from the caller's shell would override the file
cat >> "$ENV_FILE" <<EOT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH='$TOKEN_FILE'
EOT
# RAY_ADDRESS (GCS form) is inherited by every process of this cluster: Ray-internal actors
# that resolve address="auto" then find this head, not "multiple active Ray instances".
# No drain phase on SIGTERM (it exists for Serve proxies; nothing here needs it): stop is quick.
TMPDIR="$HEAD_TMPDIR" RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
RAY_ADDRESS="127.0.0.1:$GCS_PORT" RAY_DEDUP_LOGS=0 "${HEAD_LAUNCH[@]}" "$RAY_BIN" start --head --block \
  --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --include-dashboard=true \
  --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$AGENT_HTTP" \
  --dashboard-agent-grpc-port="$AGENT_GRPC" --runtime-env-agent-port="$RTENV_PORT" \
  --metrics-export-port="$METRICS_PORT" --num-cpus="$NUM_CPUS" \
  --temp-dir="$RAY_TMP" --disable-usage-stats > "$STATE/logs/ray.log" 2>&1 &
echo $! > "$STATE/ray.pid"
wait_http "http://127.0.0.1:$DASH_PORT/api/version" 180 ray "$(cat "$STATE/ray.pid")"
# The job API answers (401 without a token counts as "up") a little after the dashboard itself.
wait_http "http://127.0.0.1:$DASH_PORT/api/jobs/" 120 ray "$(cat "$STATE/ray.pid")"
log "Ray head: GCS 127.0.0.1:$GCS_PORT, dashboard/jobs http://127.0.0.1:$DASH_PORT (pid $(cat "$STATE/ray.pid"))"
cat >> "$ENV_FILE" <<EOT
export RAY_ADDRESS=http://127.0.0.1:$DASH_PORT
export VITSCALE_RAY_GCS=127.0.0.1:$GCS_PORT
EOT
log "environment written to $ENV_FILE"

# ---- Ray worker nodes (VITSCALE_RAY_WORKER_NODES) -------------------------------------------
# Ray gives a joining raylet 30 s to register with the GCS (ray/_private/node.py) and `ray start` exits
# when it misses that, which a loaded machine does now and then: one more try. If a node still fails,
# stop everything this script started (the head, moto, the nodes before it) instead of leaving it running.
for ((i = 1; i <= WORKER_NODES; i++)); do
  started=0
  for try in 1 2; do
    if VITSCALE_STATE_DIR="$STATE" PYTHON="$PY" RAY_BIN="$RAY_BIN" bash "$ROOT/infra/local/start_worker_node.sh" "$i"; then
      started=1
      break
    fi
    if ((try == 1)); then log "worker node $i did not start; trying once more"; fi
  done
  if ((started == 0)); then
    log "worker node $i did not start twice; stopping the services this script started"
    VITSCALE_STATE_DIR="$STATE" PYTHON="$PY" bash "$ROOT/infra/local/stop_services.sh" || true
    exit 1
  fi
done
log "ready: S3 ${AWS_ENDPOINT_URL:-(AWS)}, Ray jobs http://127.0.0.1:$DASH_PORT; state (pids, logs, env.sh) in $STATE"
env_hint
