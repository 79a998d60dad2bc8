#!/usr/bin/env bash
# `make demo`: the whole job on this machine, as it runs on a cluster.
#
#   1. start a loopback-only Ray head, the local S3 server and the synthetic image server
#      (infra/local/up.sh),
#   2. generate DEMO_ROWS (2000) synthetic rows and put the URL list on S3,
#   3. submit jobs/embed_laion.py with `ray job submit` (config: jobs/demo.yaml),
#   4. copy report.html, _stats.json and config.yaml out of S3 to out/demo/ and print the path,
#   5. stop everything (also on failure or Ctrl-C).
#
# Environment: VENV (default <repo>/.venv), DEMO_ROWS (2000), DEMO_RUN_DIR
# (/tmp/clipcurate-demo; at most 40 characters, Ray's socket paths live under it), DEMO_ARGS
# (more job flags, e.g. DEMO_ARGS="--set filter.clip_score_threshold=0.25").
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
export VENV="$(cd "$VENV" && pwd)"  # absolute: up.sh runs ray from another directory
PY="$VENV/bin/python"
ROWS="${DEMO_ROWS:-2000}"
RUN_DIR="${DEMO_RUN_DIR:-/tmp/clipcurate-demo}"
RESULT="$REPO/out/demo"
WORLD="$RUN_DIR/world"
BUCKET="demo"
# Logical CPUs for the local Ray: at least 4, so download, decode, embedding and writing
# overlap even on a 2-core machine (the work is partly waiting on the network and disk).
CPUS=$(( $(nproc) < 4 ? 4 : $(nproc) ))

say() { printf '\n== %s\n' "$*"; }
started=$(date +%s)

stop() {
  local rc=$?
  say "stopping the local stack"
  "$REPO/infra/local/down.sh" --run-dir "$RUN_DIR" --quiet || true
  exit $rc
}
trap stop EXIT INT TERM

# A world left by an earlier demo is regenerated: it is cheap and its URLs name old ports.
"$REPO/infra/local/down.sh" --run-dir "$RUN_DIR" --quiet || true
rm -rf "$WORLD"
mkdir -p "$WORLD" "$RESULT"

say "starting Ray, local S3 and the image server (infra/local/up.sh)"
"$REPO/infra/local/up.sh" --run-dir "$RUN_DIR" --num-cpus "$CPUS" --images "$WORLD" >/dev/null
# shellcheck disable=SC1091
source "$RUN_DIR/state.env"
echo "Ray dashboard $RAY_ADDRESS, S3 $S3_ENDPOINT_URL, images $IMAGES_URL"

say "generating $ROWS synthetic rows"
"$PY" -m testkit.synthetic --rows "$ROWS" --seed 0 --out "$WORLD" \
  --base-url "$IMAGES_URL/" --min-side 128 --max-side 640 --unsafe-rate 0.1
"$PY" - "$S3_ENDPOINT_URL" "$BUCKET" "$WORLD/urls.parquet" <<'PY'
import sys

import boto3

endpoint, bucket, path = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
s3.create_bucket(Bucket=bucket)
s3.upload_file(path, bucket, "input/urls.parquet")
print(f"uploaded the URL list to s3://{bucket}/input/urls.parquet")
PY

say "ray job submit ... -- python jobs/embed_laion.py --config jobs/demo.yaml"
cd "$REPO"
"$VENV/bin/ray" job submit --address "$RAY_ADDRESS" --working-dir "$REPO" -- \
  python jobs/embed_laion.py --config jobs/demo.yaml \
    --input "s3://$BUCKET/input/urls.parquet" --output "s3://$BUCKET/run" \
    --s3-endpoint-url "$S3_ENDPOINT_URL" ${DEMO_ARGS:-}

"$PY" - "$S3_ENDPOINT_URL" "$BUCKET" "$RESULT" <<'PY'
import sys

import boto3

endpoint, bucket, result = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
for name in ("report.html", "_stats.json", "config.yaml"):
    s3.download_file(bucket, f"run/{name}", f"{result}/{name}")
PY

say "done in $(( $(date +%s) - started )) s"
echo "report: $RESULT/report.html"
echo "stats:  $RESULT/_stats.json   config: $RESULT/config.yaml"
