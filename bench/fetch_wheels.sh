#!/usr/bin/env bash
# Download, on a machine with the package registry, the wheels the lent GPU machine lacks
# (it has torch, triton, transformers, peft and pytest, no bitsandbytes or liger-kernel,
# and no network) for its Python 3.12 on x86-64 Linux, into an ignored folder that the
# device tool carries with the working tree (at most 64 MiB with the tree).
#
#   bench/fetch_wheels.sh [DIR]          # default DIR: bench/wheels
#
# --no-deps: both need only what that machine has (torch, numpy, packaging, triton);
# the versions are pinned so that a session is reproducible. bench/gpu_session.sh
# installs them offline (pip install --no-index --no-deps) when they are missing.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-$REPO/bench/wheels}
PY=${PYTHON:-$(command -v python3 || command -v python)}
WHEELS=("bitsandbytes==0.50.2" "liger-kernel==0.8.5")
LIMIT=$((64 * 1024 * 1024))
mkdir -p "$DIR"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest "$DIR" "${WHEELS[@]}"
total=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
ls -l "$DIR"/*.whl
echo "fetch_wheels.sh: $total bytes ($((total / 1024 / 1024)) MiB) in $DIR"
if (( total > LIMIT )); then
    echo "fetch_wheels.sh: error: $DIR holds more than 64 MiB; the device tool carries at most" \
         "64 MiB with the working tree" >&2
    exit 1
fi
