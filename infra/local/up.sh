#!/usr/bin/env bash
# Start a loopback-only local stack: a Ray head with the job-submission dashboard, the local S3
# server (moto) and, with --images, the synthetic image server. Every socket is bound to
# 127.0.0.1; check_loopback.sh verifies that. Linux only.
#
#   infra/local/up.sh [--run-dir DIR] [--num-cpus N] [--object-store-mb MB] [--images DIR]
#                     [--no-s3] [-- extra `ray start` flags]
#
# Writes DIR/state.env (sourceable: ports, addresses, pids, RAY_ADDRESS, the auth token path)
# and logs under DIR/logs. Idempotent: when DIR/state.env describes a stack that is still
# healthy and was started with the same options, it prints it and exits 0. A stale or
# different previous run in DIR is stopped first (down.sh), whatever is left of it.
#
# Environment: VENV (default: <repo>/.venv), CLIPCURATE_RUN_DIR (default run dir).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
RAY="$VENV/bin/ray"

RUN_DIR="${CLIPCURATE_RUN_DIR:-/tmp/clipcurate-local}"
NUM_CPUS="$(nproc)"
OBJECT_STORE_MB=""
IMAGES=""
WITH_S3=1
EXTRA_RAY_ARGS=()

die() { echo "up.sh: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --run-dir) RUN_DIR="$2"; shift 2 ;;
    --num-cpus) NUM_CPUS="$2"; shift 2 ;;
    --object-store-mb) OBJECT_STORE_MB="$2"; shift 2 ;;
    --images) IMAGES="$2"; shift 2 ;;
    --no-s3) WITH_S3=0; shift ;;
    --) shift; EXTRA_RAY_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ -x "$RAY" ]] || die "$RAY not found; set VENV to the project's virtualenv"
command -v ss >/dev/null || die "ss (iproute2) is needed to verify the sockets"
# Without ray[default] the dashboard starts in minimal mode: no HTTP server, no job API.
"$PY" -c 'import aiohttp, aiohttp_cors, grpc' 2>/dev/null \
  || die "$VENV lacks ray[default] (dashboard and job server): pip install 'ray[default]'"
if [[ -n "$IMAGES" ]]; then
  [[ -d "$IMAGES" ]] || die "--images $IMAGES is not a directory"
  IMAGES="$(cd "$IMAGES" && pwd)"
fi
mkdir -p "$RUN_DIR"
RUN_DIR="$(cd "$RUN_DIR" && pwd -P)"
# Ray puts unix sockets under <temp dir>/session_<date>_<pid>/sockets/; Linux caps socket paths
# at 107 bytes, and the session part takes about 60.
(( ${#RUN_DIR} <= 40 )) || die "run dir path $RUN_DIR is too long for Ray's unix sockets (max 40 chars)"

STATE="$RUN_DIR/state.env"
LOGS="$RUN_DIR/logs"
WANT="NUM_CPUS=$NUM_CPUS OBJECT_STORE_MB=$OBJECT_STORE_MB IMAGES=$IMAGES WITH_S3=$WITH_S3 EXTRA=${EXTRA_RAY_ARGS[*]:-}"

healthy() {
  # shellcheck disable=SC1090
  ( source "$STATE" 2>/dev/null || exit 1
    [[ "${CLIPCURATE_UP_OPTIONS:-}" == "$WANT" ]] || exit 1
    for pid in ${CLIPCURATE_PIDS:-}; do kill -0 "$pid" 2>/dev/null || exit 1; done
    "$PY" "$HERE/localrun.py" wait-http "$RAY_ADDRESS/api/version" 3 || exit 1
    if [[ -n "${S3_ENDPOINT_URL:-}" ]]; then "$PY" "$HERE/localrun.py" wait-http "$S3_ENDPOINT_URL/moto-api/" 3 || exit 1; fi
    if [[ -n "${IMAGES_URL:-}" ]]; then "$PY" "$HERE/localrun.py" wait-http "$IMAGES_URL/" 3 || exit 1; fi
  )
}

if [[ -f "$STATE" ]] && healthy; then
  echo "up.sh: already running ($STATE)" >&2
  cat "$STATE"
  exit 0
fi
# Anything left from an earlier run in this directory (crashed, half-started, or started with
# other options) goes first; down.sh finds it by its environment marker, state file or not.
"$HERE/down.sh" --run-dir "$RUN_DIR" --quiet
mkdir -p "$LOGS"

# Every service gets the marker and a session of its own (setsid); down.sh and
# check_loopback.sh find the run's processes by the two (localrun.py run_pids). The marker is
# given to those commands only, never exported here: the helper scripts this script runs
# must not look like part of the stack.
MARK=(env "CLIPCURATE_LOCAL_RUN=$RUN_DIR")
# Loopback-only Ray: node address 127.0.0.1, no joining from other machines, no usage report.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=0
# Token auth with a token private to this run (not ~/.ray/auth_token, which other Ray
# instances of this user share). The ray CLI and ray.init read it from these two variables.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$RUN_DIR/auth_token"
( umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH" )
# Job entrypoints run `python ...` in the head's environment: make that the project's venv.
export PATH="$VENV/bin:$PATH"

PIDS=()
S3_ENDPOINT_URL=""
S3_PID=""
if (( WITH_S3 )); then
  rm -f "$RUN_DIR/s3.port"
  ( cd "$REPO" && exec "${MARK[@]}" setsid "$PY" -m testkit.s3_server --port 0 \
      --port-file "$RUN_DIR/s3.port" </dev/null >"$LOGS/s3.log" 2>&1 ) &
  S3_PID=$!
  for _ in $(seq 600); do [[ -s "$RUN_DIR/s3.port" ]] && break; kill -0 "$S3_PID" 2>/dev/null || break; sleep 0.1; done
  [[ -s "$RUN_DIR/s3.port" ]] || { cat "$LOGS/s3.log" >&2; "$HERE/down.sh" --run-dir "$RUN_DIR" --quiet; die "local S3 server did not start"; }
  S3_ENDPOINT_URL="http://127.0.0.1:$(cat "$RUN_DIR/s3.port")"
  if ! "$PY" "$HERE/localrun.py" wait-http "$S3_ENDPOINT_URL/moto-api/" 60; then
    "$HERE/down.sh" --run-dir "$RUN_DIR" --quiet
    die "local S3 server does not answer on $S3_ENDPOINT_URL"
  fi
  PIDS+=("$S3_PID")
  # The Ray head (and so every job) talks to the local S3 server with fake credentials.
  export AWS_ENDPOINT_URL="$S3_ENDPOINT_URL" AWS_ENDPOINT_URL_S3="$S3_ENDPOINT_URL"
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_SESSION_TOKEN=testing
  export AWS_DEFAULT_REGION=us-east-1 AWS_REGION=us-east-1
  unset AWS_PROFILE AWS_DEFAULT_PROFILE AWS_ROLE_ARN AWS_WEB_IDENTITY_TOKEN_FILE
fi

IMAGES_URL=""
IMAGES_PID=""
if [[ -n "$IMAGES" ]]; then
  ( cd "$REPO" && exec "${MARK[@]}" setsid "$PY" -u -m testkit.http_server --root "$IMAGES" \
      --port 0 --host 127.0.0.1 </dev/null >"$LOGS/images.log" 2>&1 ) &
  IMAGES_PID=$!
  for _ in $(seq 300); do
    IMAGES_URL="$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$LOGS/images.log" 2>/dev/null | head -1 || true)"
    [[ -n "$IMAGES_URL" ]] && break
    kill -0 "$IMAGES_PID" 2>/dev/null || break
    sleep 0.1
  done
  [[ -n "$IMAGES_URL" ]] || { cat "$LOGS/images.log" >&2; "$HERE/down.sh" --run-dir "$RUN_DIR" --quiet; die "image server did not start"; }
  PIDS+=("$IMAGES_PID")
fi

# Pin every port Ray would otherwise take from its defaults (6379, 8265, 10001, 52365, ...):
# defaults collide with other Ray instances on the machine, and pinned ports are what the
# state file reports.
mapfile -t P < <("$PY" "$HERE/localrun.py" free-ports 9)
GCS_PORT=${P[0]} DASHBOARD_PORT=${P[1]} CLIENT_PORT=${P[2]} NODE_MANAGER_PORT=${P[3]}
OBJECT_MANAGER_PORT=${P[4]} AGENT_HTTP_PORT=${P[5]} AGENT_GRPC_PORT=${P[6]}
RUNTIME_ENV_AGENT_PORT=${P[7]} METRICS_PORT=${P[8]}
RAY_ARGS=(
  start --head
  --node-ip-address 127.0.0.1
  --port "$GCS_PORT"
  --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT"
  --ray-client-server-port "$CLIENT_PORT"
  --node-manager-port "$NODE_MANAGER_PORT"
  --object-manager-port "$OBJECT_MANAGER_PORT"
  --dashboard-agent-listen-port "$AGENT_HTTP_PORT"
  --dashboard-agent-grpc-port "$AGENT_GRPC_PORT"
  --runtime-env-agent-port "$RUNTIME_ENV_AGENT_PORT"
  --metrics-export-port "$METRICS_PORT"
  --temp-dir "$RUN_DIR/ray"
  --num-cpus "$NUM_CPUS"
  --disable-usage-stats
)
[[ -n "$OBJECT_STORE_MB" ]] && RAY_ARGS+=(--object-store-memory "$((OBJECT_STORE_MB * 1024 * 1024))")
RAY_ARGS+=("${EXTRA_RAY_ARGS[@]}")
# setsid: the Ray daemons outlive this script and must not get the caller's terminal signals.
if ! ( cd "$RUN_DIR" && "${MARK[@]}" setsid "$RAY" "${RAY_ARGS[@]}" </dev/null >"$LOGS/ray-start.log" 2>&1 ); then
  cat "$LOGS/ray-start.log" >&2
  "$HERE/down.sh" --run-dir "$RUN_DIR" --quiet
  die "ray start failed (log above)"
fi
RAY_ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"
if ! "$PY" "$HERE/localrun.py" wait-http "$RAY_ADDRESS/api/version" 60; then
  "$HERE/down.sh" --run-dir "$RUN_DIR" --quiet
  die "Ray dashboard did not answer on $RAY_ADDRESS"
fi
# `ray start` returns before the raylet's agents (dashboard agent, runtime-env agent, metrics)
# listen; jobs cannot be submitted and the socket check would miss them until they do.
if ! "$PY" "$HERE/localrun.py" wait-listening 90 "${P[@]}"; then
  tail -n 30 "$RUN_DIR"/ray/session_latest/logs/raylet.out >&2 || true
  "$HERE/down.sh" --run-dir "$RUN_DIR" --quiet
  die "Ray did not open all of its ports"
fi
GCS_PID=""
for pid in $("$PY" "$HERE/localrun.py" pids "$RUN_DIR"); do
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == gcs_server ]] && GCS_PID="$pid"
done
[[ -n "$GCS_PID" ]] && PIDS+=("$GCS_PID")

{
  q() { printf 'export %s=%q\n' "$1" "$2"; }
  echo "# written by infra/local/up.sh at $(date -u +%FT%TZ); source it to use the stack"
  q CLIPCURATE_RUN_DIR "$RUN_DIR"
  q CLIPCURATE_UP_OPTIONS "$WANT"
  q CLIPCURATE_PIDS "${PIDS[*]}"
  q VENV "$VENV"
  q RAY_ADDRESS "$RAY_ADDRESS"
  q RAY_GCS_ADDRESS "127.0.0.1:$GCS_PORT"
  q RAY_CLIENT_ADDRESS "ray://127.0.0.1:$CLIENT_PORT"
  q RAY_AUTH_MODE token
  q RAY_AUTH_TOKEN_PATH "$RAY_AUTH_TOKEN_PATH"
  q RAY_TEMP_DIR "$RUN_DIR/ray"
  q RAY_GCS_PID "$GCS_PID"
  q RAY_GCS_PORT "$GCS_PORT"
  q RAY_DASHBOARD_PORT "$DASHBOARD_PORT"
  q RAY_CLIENT_PORT "$CLIENT_PORT"
  q RAY_NODE_MANAGER_PORT "$NODE_MANAGER_PORT"
  q RAY_OBJECT_MANAGER_PORT "$OBJECT_MANAGER_PORT"
  q RAY_DASHBOARD_AGENT_LISTEN_PORT "$AGENT_HTTP_PORT"
  q RAY_DASHBOARD_AGENT_GRPC_PORT "$AGENT_GRPC_PORT"
  q RAY_RUNTIME_ENV_AGENT_PORT "$RUNTIME_ENV_AGENT_PORT"
  q RAY_METRICS_EXPORT_PORT "$METRICS_PORT"
  q S3_ENDPOINT_URL "$S3_ENDPOINT_URL"
  q S3_PID "$S3_PID"
  q IMAGES_URL "$IMAGES_URL"
  q IMAGES_PID "$IMAGES_PID"
  q IMAGES_ROOT "$IMAGES"
} > "$STATE.tmp"
mv "$STATE.tmp" "$STATE"

if ! "$HERE/check_loopback.sh" --run-dir "$RUN_DIR" >"$LOGS/check_loopback.txt" 2>&1; then
  cat "$LOGS/check_loopback.txt" >&2
  "$HERE/down.sh" --run-dir "$RUN_DIR" --quiet
  die "a process of the stack listens on a non-loopback address; stopped everything"
fi
cat "$STATE"
