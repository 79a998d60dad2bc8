#!/usr/bin/env bash
# Fail unless every listening TCP socket and bound UDP socket of the run's processes (all Ray
# daemons, workers and job drivers, the local S3 server, the image server) is on a loopback
# address: 127.0.0.0/8, ::1, or IPv4-mapped ::ffff:127.x.y.z. Wildcards (0.0.0.0, ::, *) fail.
#
#   infra/local/check_loopback.sh [--run-dir DIR]
#
# Prints one line per socket (pid, command, protocol, address:port) from `ss -Hltunp`.
# Exit 0: all on loopback; 1: some socket is not, or no process of the run is running.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"

RUN_DIR="${CLIPCURATE_RUN_DIR:-/tmp/clipcurate-local}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run-dir) RUN_DIR="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "check_loopback.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
command -v ss >/dev/null || { echo "check_loopback.sh: ss (iproute2) not found" >&2; exit 1; }
[[ -d "$RUN_DIR" ]] || { echo "check_loopback.sh: no run directory $RUN_DIR" >&2; exit 1; }
exec "$PY" "$HERE/localrun.py" check "$(cd "$RUN_DIR" && pwd -P)"
