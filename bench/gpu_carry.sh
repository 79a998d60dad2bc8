#!/usr/bin/env bash
# What a lent GPU machine lacks to run bench/embed_gpu.py, fetched here; and the run there.
#
# The device tool's machines (its KINDS.md: Python 3.12 with torch, torchvision, numpy,
# pyarrow, Pillow, safetensors, timm, Cython and a compiler; nothing can be fetched there)
# lack open_clip (the baseline), ftfy and wcwidth (our tokenizer) and pdqhash (the decode
# stage's PDQ, run while the bench prepares its shards). pdqhash publishes only an sdist, so it
# is built there, against that machine's own numpy.
#
#   bash bench/gpu_carry.sh                 # here, once per checkout: fills .whl/ (~3 MB,
#                                           # kept out of git by .git/info/exclude)
#   bash bench/gpu_carry.sh --run ARGS...   # there, in the device tool's run with carry
#                                           # [".whl"]: installs into /tmp/site, then
#                                           # python3 bench/embed_gpu.py ARGS...
#
# PYTHON overrides the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--run" ]]; then
  shift
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site \
    .whl/pdqhash-*.tar.gz
  export PYTHONPATH="/tmp/site:$PWD" NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
  exec "$PY" bench/embed_gpu.py "$@"
fi

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5
"$PY" -m pip download -q --no-deps --no-binary pdqhash -d .whl pdqhash==0.2.8
ls -l .whl
