#!/usr/bin/env bash
# Start (or restart, after kill_node.sh) Ray worker node I of the cluster that
# infra/local/start_services.sh started, and wait until the head lists it as ALIVE.
#
#   infra/local/start_worker_node.sh 1        # state dir: $VITSCALE_STATE_DIR, $VITSCALE_HOME or .vitscale/
#
# The node is a separate raylet joined with `ray start --address <gcs> --block`, as on a real
# cluster, with its own:
#   - IP: 127.0.0.(I+1) (all of 127/8 is loopback on Linux). Ray Train groups ranks into nodes
#     by IP (node_rank, local_rank), so a second node on 127.0.0.1 would count as the same host;
#   - Ray temp dir (sockets, logs, object spill, the job's working_dir): /tmp/vsray-...-wI, short
#     because Ray's unix socket paths must stay < 108 bytes;
#   - TMPDIR (its folder $tmp/tmp): what Python's tempfile gives every process of the node
#     (checkpoint staging, downloads), so no node reads files another node wrote locally;
#   - CPUs (--num-cpus $VITSCALE_RAY_WORKER_CPUS, default 1) and a custom resource node_I (1.0)
#     that jobs can target with resources={"node_I": ...};
#   - ports, picked free on its IP.
# Same token auth as the head: RAY_AUTH_TOKEN_PATH from env.sh (the cluster's own token file).
# Recorded in $STATE/ray_worker_I.pid (SIGTERM to it stops the node's whole process tree, as
# stop_services.sh does) and $STATE/ray_worker_I.tmpdir.
set -euo pipefail

I="${1:?usage: start_worker_node.sh INDEX (1..253)}"
if ! [[ "$I" =~ ^[0-9]+$ ]] || ((I < 1 || I > 253)); then
  echo "start_worker_node.sh: INDEX must be an integer in 1..253, got '$I'" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="$(cd "${VITSCALE_STATE_DIR:-${VITSCALE_HOME:-$ROOT/.vitscale}}" && pwd -P)"
PY="${PYTHON:-python}"
RAY_BIN="${RAY_BIN:-ray}"
NAME="ray_worker_$I"
log() { printf '[services] %s\n' "$*" >&2; }

if [[ ! -f "$STATE/env.sh" || ! -f "$STATE/ray.pid" ]] || ! kill -0 "$(cat "$STATE/ray.pid")" 2>/dev/null; then
  log "no running Ray head in $STATE; start one first with infra/local/start_services.sh"
  exit 1
fi
running() { kill -0 "$1" 2>/dev/null && [[ "$(ps -o stat= -p "$1" 2>/dev/null)" != Z* ]]; }
if [[ -f "$STATE/$NAME.pid" ]] && running "$(cat "$STATE/$NAME.pid")"; then
  log "worker node $I already running (pid $(cat "$STATE/$NAME.pid")); kill it first (infra/local/kill_node.sh $I)"
  exit 1
fi
# shellcheck disable=SC1091
source "$STATE/env.sh"  # VITSCALE_RAY_GCS, RAY_ADDRESS (dashboard), token path, S3 + MLflow env
GCS="${VITSCALE_RAY_GCS:?env.sh has no VITSCALE_RAY_GCS}"
DASH_URL="${RAY_ADDRESS:?env.sh has no RAY_ADDRESS}"
unset RAY_AUTH_TOKEN  # a token inherited from the caller's shell would override the file

NODE_IP="127.0.0.$((I + 1))"
free_port() { "$PY" -c 'import socket, sys; s=socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$NODE_IP"; }
NM_PORT=$(free_port); OM_PORT=$(free_port); AGENT_HTTP=$(free_port); AGENT_GRPC=$(free_port)
RTENV_PORT=$(free_port); METRICS_PORT=$(free_port)
HEAD_TMP="$(cat "$STATE/ray.tmpdir")"
NODE_TMP="$HEAD_TMP-w$I"  # /tmp/vsray-<ts>-<pid>-wI: removed by stop_services.sh
rm -rf "$NODE_TMP"
mkdir -p "$NODE_TMP/tmp"
echo "$NODE_TMP" > "$STATE/$NAME.tmpdir"

# Isolation: the head's mode (start_services.sh, $STATE/ray.isolation). With "mount" the node
# runs in its own mount namespace: its TMPDIR folder is bound at the common path $HEAD_TMP-tmp
# (same path on every node, different disks, as /tmp on separate machines), and the head's
# temp dir and the other worker nodes' are empty tmpfs there, so a rank reading a path another
# node wrote fails here as it would on a real cluster.
ISOLATION="$(cat "$STATE/ray.isolation" 2>/dev/null || echo none)"
LAUNCH=()
NODE_TMPDIR="$NODE_TMP/tmp"
if [[ "$ISOLATION" == mount ]]; then
  HIDE=("$HEAD_TMP")
  for d in "$HEAD_TMP"-w*; do [[ -d "$d" && "$d" != "$NODE_TMP" ]] && HIDE+=("$d"); done
  # unshare execs (no fork): the pid recorded below stays the `ray start` process.
  # shellcheck disable=SC2016
  LAUNCH=(unshare --mount --propagation private bash -ec \
    'mount --bind "$1" "$2"; shift 2; n=$1; shift
     for ((k = 0; k < n; k++)); do mount -t tmpfs -o size=1m,mode=0755 vitscale-other-node "$1"; shift; done
     exec "$@"' \
    _ "$NODE_TMPDIR" "$HEAD_TMP-tmp" "${#HIDE[@]}" "${HIDE[@]}")
  NODE_TMPDIR="$HEAD_TMP-tmp"
fi
echo "$ISOLATION" > "$STATE/$NAME.isolation"

TMPDIR="$NODE_TMPDIR" RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 RAY_ADDRESS="$GCS" RAY_DEDUP_LOGS=0 \
"${LAUNCH[@]}" "$RAY_BIN" start --address="$GCS" --block \
  --node-ip-address="$NODE_IP" --node-manager-port="$NM_PORT" --object-manager-port="$OM_PORT" \
  --dashboard-agent-listen-port="$AGENT_HTTP" --dashboard-agent-grpc-port="$AGENT_GRPC" \
  --runtime-env-agent-port="$RTENV_PORT" --metrics-export-port="$METRICS_PORT" \
  --num-cpus="${VITSCALE_RAY_WORKER_CPUS:-1}" --resources="{\"node_$I\": 1}" \
  --temp-dir="$NODE_TMP" --disable-usage-stats > "$STATE/logs/$NAME.log" 2>&1 &
PID=$!
echo "$PID" > "$STATE/$NAME.pid"
STARTED_MS=$(( $(date +%s) * 1000 - 1000 ))

# Healthy = the head's state API (/api/v0/nodes, token in the Authorization header) lists an
# ALIVE node carrying resource node_I that started after this script did (a node killed a
# moment ago still shows ALIVE until the head's health checks give up on it). Fails fast if
# `ray start` exited.
for ((t = 0; t < 180 * 2; t++)); do
  if "$PY" - "$DASH_URL" "$RAY_AUTH_TOKEN_PATH" "node_$I" "$STARTED_MS" <<'PYEOF' 2>/dev/null; then
import json, sys, urllib.request
url, token_path, resource, started_ms = sys.argv[1:5]
token = open(token_path).read().strip()
req = urllib.request.Request(f"{url}/api/v0/nodes?detail=true&limit=1000",
                             headers={"Authorization": f"Bearer {token}"})
body = json.load(urllib.request.urlopen(req, timeout=5))
nodes = body["data"]["result"]["result"]
ok = any(n.get("state") == "ALIVE" and resource in (n.get("resources_total") or {})
         and int(n.get("start_time_ms") or 0) >= int(started_ms) for n in nodes)
sys.exit(0 if ok else 1)
PYEOF
    log "Ray worker node $I: $NODE_IP, ${VITSCALE_RAY_WORKER_CPUS:-1} CPU + node_$I, temp $NODE_TMP, isolation $ISOLATION (pid $PID)"
    exit 0
  fi
  if ! kill -0 "$PID" 2>/dev/null; then
    log "worker node $I (pid $PID) exited during start-up; see $STATE/logs/$NAME.log"
    tail -20 "$STATE/logs/$NAME.log" >&2 || true
    exit 1
  fi
  sleep 0.5
done
log "worker node $I never showed up ALIVE in $DASH_URL/api/v0/nodes within 180s; see $STATE/logs/$NAME.log"
exit 1
