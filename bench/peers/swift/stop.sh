#!/usr/bin/env bash
# Stop the Swift peer started by setup.sh: each server runs in its own process
# group whose leader's "pid starttime" is in $SWIFT_PEER_BASE/run/*.pid.  We
# signal only those groups (after checking the start time, so a recycled PID is
# never hit): SIGTERM, wait up to 15 s, then SIGKILL.  Data is kept; use
# `setup.sh --fresh` or `rm -rf $SWIFT_PEER_BASE` to wipe it.
set -uo pipefail
BASE="${SWIFT_PEER_BASE:-/srv/bench-peers-swift}"
RUN="$BASE/run"
shopt -s nullglob
pgids=()
for f in "$RUN"/*.pid; do
  read -r pid st <"$f" || { rm -f "$f"; continue; }
  if [[ -n "${pid:-}" && -r /proc/$pid/stat && "$(awk '{print $22}' /proc/$pid/stat)" == "${st:-}" ]]; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    pgids+=("$pid")
    echo "[swift-stop] TERM $(basename "$f" .pid) (pgid $pid)" >&2
  fi
  rm -f "$f"
done
for _ in $(seq 150); do
  left=()
  for g in "${pgids[@]}"; do kill -0 -- "-$g" 2>/dev/null && left+=("$g"); done
  ((${#left[@]})) || exit 0
  sleep 0.1
done
for g in "${left[@]}"; do
  echo "[swift-stop] KILL pgid $g" >&2
  kill -KILL -- "-$g" 2>/dev/null
done
exit 0
