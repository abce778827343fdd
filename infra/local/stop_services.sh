#!/usr/bin/env bash
# Stop the services started by infra/local/start_services.sh (`make services-down`), by pid only
# (never `ray stop`, which would also kill other people's Ray instances on a shared machine).
# State dir: $VITSCALE_STATE_DIR, else $VITSCALE_HOME, else .vitscale/ in the checkout.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${VITSCALE_STATE_DIR:-${VITSCALE_HOME:-$ROOT/.vitscale}}"

log() { printf '[services] %s\n' "$*" >&2; }
if ! compgen -G "$STATE/*.pid" > /dev/null; then
  log "no local services recorded in $STATE: nothing to stop"
fi

# descendants PID: every process below PID (recursively), printed one pid per line.
descendants() {
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}

# stop NAME: SIGTERM the pid in $STATE/NAME.pid, wait, then SIGKILL it and any of the
# descendants recorded before the SIGTERM (raylet, workers) that outlived it. By pid only.
stop() {
  local name=$1 file="$STATE/$1.pid" pid i tree left
  [[ -f "$file" ]] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    tree=$(descendants "$pid")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 60; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name (pid $pid) still up 15s after SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    sleep 1
    left=""
    for p in $tree; do kill -0 "$p" 2>/dev/null && left="$left $p"; done
    if [[ -n "$left" ]]; then
      log "$name: SIGKILL to leftover processes:$left"
      # shellcheck disable=SC2086
      kill -KILL $left 2>/dev/null || true
    fi
    log "stopped $name (pid $pid)"
  fi
  rm -f "$file"
}

# drop_tmp NAME: keep node NAME's Ray logs next to ours, then drop its temp folder (sockets,
# spill, the node's TMPDIR with any checkpoint staging).
drop_tmp() {
  local name=$1 tmp
  [[ -f "$STATE/$name.tmpdir" ]] || return 0
  tmp=$(cat "$STATE/$name.tmpdir")
  if [[ -n "$tmp" && "$tmp" == /tmp/vsray-* && -d "$tmp" ]]; then
    local dest="$STATE/logs/ray-session"
    [[ "$name" == ray ]] || dest="$STATE/logs/$name-session"
    mkdir -p "$dest"
    cp -r "$tmp"/session_latest/logs/. "$dest/" 2>/dev/null || true
    rm -rf "$tmp"
  fi
  rm -f "$STATE/$name.tmpdir" "$STATE/$name.isolation"
}

# Worker nodes first (start_worker_node.sh / VITSCALE_RAY_WORKER_NODES), each by its pid;
# a node already killed by kill_node.sh only has its files cleaned up.
for file in "$STATE"/ray_worker_*.pid; do
  [[ -e "$file" ]] || continue
  name=$(basename "$file" .pid)
  stop "$name"
  drop_tmp "$name"
done
for file in "$STATE"/ray_worker_*.tmpdir; do
  [[ -e "$file" ]] && drop_tmp "$(basename "$file" .tmpdir)"
done
tmp=$(cat "$STATE/ray.tmpdir" 2>/dev/null || true)
stop ray
drop_tmp ray
# The common TMPDIR mount point of isolated nodes (empty outside their namespaces).
[[ -n "$tmp" && "$tmp" == /tmp/vsray-* && -d "$tmp-tmp" ]] && rmdir "$tmp-tmp" 2>/dev/null
rm -f "$STATE/ray.isolation"
stop moto
# The cluster is gone: its token authenticates nothing any more, and must not outlive it.
rm -f "$STATE/ray_auth_token"
