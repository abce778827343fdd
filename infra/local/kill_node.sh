#!/usr/bin/env bash
# Kill Ray worker node I (started by start_worker_node.sh / start_services.sh) the way a node
# dies: SIGKILL (or the given signal) to its whole process tree at once, `ray start`, raylet,
# agents and every worker process it runs. By pid only (never `ray stop`, never by name).
#
#   infra/local/kill_node.sh 1            # SIGKILL node 1's tree
#   infra/local/kill_node.sh 1 TERM       # a graceful stop of node 1 instead
#
# The head then marks the node dead after its health checks fail (~15 s with Ray's defaults).
# Restart it with infra/local/start_worker_node.sh 1. Prints the pids it signalled.
set -uo pipefail

I="${1:?usage: kill_node.sh INDEX [SIGNAL]}"
SIG="${2:-KILL}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${VITSCALE_STATE_DIR:-${VITSCALE_HOME:-$ROOT/.vitscale}}"
FILE="$STATE/ray_worker_$I.pid"

descendants() {
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}

if [[ ! -f "$FILE" ]]; then
  echo "kill_node.sh: no worker node $I in $STATE (no $FILE); start it with infra/local/start_worker_node.sh $I" >&2
  exit 1
fi
PID=$(cat "$FILE")
if ! kill -0 "$PID" 2>/dev/null; then
  echo "kill_node.sh: worker node $I (pid $PID) is not running" >&2
  exit 1
fi
# Collect the tree first, then signal it all in one call: a raylet killed before its workers
# would leave them orphaned (re-parented to init) and out of reach of a later walk. A second
# pass catches a worker the raylet forked while we were walking.
killed=""
for _ in 1 2; do
  tree="$PID $(descendants "$PID")"
  live=""
  for p in $tree; do kill -0 "$p" 2>/dev/null && live="$live $p"; done
  [[ -z "$live" ]] && break
  # shellcheck disable=SC2086
  kill "-$SIG" $live 2>/dev/null || true
  killed="$killed$live"
  [[ "$SIG" != KILL && "$SIG" != 9 ]] && break  # a graceful stop: let the tree wind down itself
  sleep 0.2
done
# A SIGKILLed tree is gone only once the kernel has torn it down: wait for that (10 s at most),
# so a restart right after this script never sees the old node's pid as still running.
if [[ "$SIG" == KILL || "$SIG" == 9 ]]; then
  for ((t = 0; t < 50; t++)); do
    alive=""
    for p in $killed; do kill -0 "$p" 2>/dev/null && [[ "$(ps -o stat= -p "$p" 2>/dev/null)" != Z* ]] && alive="$alive $p"; done
    [[ -z "$alive" ]] && break
    sleep 0.2
  done
fi
echo "$killed" | xargs -n1 | sort -un | xargs
