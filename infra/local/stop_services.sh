#!/usr/bin/env bash
# Stop the services started by infra/local/start_services.sh, by pid only (never `ray stop`,
# which would also kill other people's Ray instances on a shared machine).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${VITSCALE_STATE_DIR:-$ROOT/.smoke}"

log() { printf '[services] %s\n' "$*" >&2; }

# stop NAME: SIGTERM the pid in $STATE/NAME.pid, wait, then SIGKILL if it is still there.
stop() {
  local name=$1 file="$STATE/$1.pid" pid i
  [[ -f "$file" ]] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 120; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name (pid $pid) ignored SIGTERM for 30s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    log "stopped $name (pid $pid)"
  fi
  rm -f "$file"
}

stop ray
# `ray start --block` tears down its node on SIGTERM; anything left in its session (a raylet
# or worker that outlived it) is found by the temp dir only this head used.
if [[ -f "$STATE/ray.tmpdir" ]]; then
  tmp=$(cat "$STATE/ray.tmpdir")
  if [[ -n "$tmp" && "$tmp" == /tmp/vsray-* ]]; then
    for pid in $(pgrep -f -- "$tmp" 2>/dev/null); do
      [[ "$pid" == "$$" ]] || kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
  fi
  rm -f "$STATE/ray.tmpdir"
fi
stop moto
