#!/usr/bin/env bash
# Stop everything infra/local/up.sh started for one run directory: the Ray head with all its
# daemons, workers and job drivers, the local S3 server and the image server.
#
#   infra/local/down.sh [--run-dir DIR] [--purge] [--quiet]
#
# Processes are found by the CLIPCURATE_LOCAL_RUN=<DIR> marker in their environment (see
# localrun.py), so this works without a state file, after a crash, and never touches other Ray
# instances on the machine (unlike `ray stop`, which stops every Ray process of the user).
# SIGTERM first, SIGKILL after 3 s. Exit 1 if something is still running at the end.
# --purge also removes DIR (logs, Ray session files, token); otherwise only state.env goes.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"

RUN_DIR="${CLIPCURATE_RUN_DIR:-/tmp/clipcurate-local}"
PURGE=0
QUIET=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run-dir) RUN_DIR="$2"; shift 2 ;;
    --purge) PURGE=1; shift ;;
    --quiet) QUIET=1; shift ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "down.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
say() { (( QUIET )) || echo "down.sh: $*" >&2; }

if [[ ! -d "$RUN_DIR" ]]; then
  say "$RUN_DIR does not exist; nothing to stop"
  exit 0
fi
RUN_DIR="$(cd "$RUN_DIR" && pwd -P)"

pids() { "$PY" "$HERE/localrun.py" pids "$RUN_DIR"; }

# Pids of "$@" still running. A zombie counts as gone: it has exited, and only its parent
# (maybe the caller of this script) can reap it.
alive() {
  local p s out=()
  for p in "$@"; do
    s="$(cat "/proc/$p/stat" 2>/dev/null)" || continue
    s="${s##*) }"
    [[ "${s%% *}" == Z ]] || out+=("$p")
  done
  echo "${out[*]}"
}

# Scan, stop, and scan again: a process may start (a worker, a job driver) while others stop.
for round in 1 2 3; do
  mapfile -t LEFT < <(pids)
  (( ${#LEFT[@]} )) || break
  say "stopping ${#LEFT[@]} processes: ${LEFT[*]}"
  kill -TERM "${LEFT[@]}" 2>/dev/null || true
  for _ in $(seq 30); do
    read -r -a LEFT <<<"$(alive "${LEFT[@]}")"
    (( ${#LEFT[@]} )) || break
    sleep 0.1
  done
  if (( ${#LEFT[@]} )); then
    # gcs_server and the autoscaler monitor can take many seconds to honour SIGTERM once the
    # raylet is gone; their state is in the run directory, so nothing is lost by not waiting.
    say "SIGKILL to ${#LEFT[@]} processes still running after 3 s: ${LEFT[*]}"
    kill -KILL "${LEFT[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
      read -r -a LEFT <<<"$(alive "${LEFT[@]}")"
      (( ${#LEFT[@]} )) || break
      sleep 0.1
    done
  fi
done
mapfile -t LEFT < <(pids)
if (( ${#LEFT[@]} )); then
  echo "down.sh: processes still running: ${LEFT[*]}" >&2
  exit 1
fi

rm -f "$RUN_DIR/state.env" "$RUN_DIR/state.env.tmp"
if (( PURGE )); then
  rm -rf "$RUN_DIR"
  say "stopped; removed $RUN_DIR"
else
  say "stopped; logs kept in $RUN_DIR/logs"
fi
