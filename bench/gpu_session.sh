#!/usr/bin/env bash
# The GPU session: every headline number against the peers, one command, <= 480 s of
# wall time on an H100/H200 from a cold Triton cache (the step budgets add up to 470 s).
#
#   bench/gpu_session.sh OUT              # on the GPU machine, from anywhere
#   bench/gpu_session.sh OUT --smoke      # the same steps at smoke sizes (CPU rehearsal)
#   bench/gpu_session.sh --plan           # the steps and their budgets, nothing run
#   bench/gpu_session.sh OUT --only train_anita,headline   # rerun steps into OUT
#
# Steps, budgets, the offline peer install and what each writes: bench/session.py and
# bench/README.md ("The GPU session"). PYTHON picks the interpreter (default python3),
# WHEELS the wheels folder (default bench/wheels, filled by bench/fetch_wheels.sh).
set -u
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac   # steps run in REPO
export PYTHON=$PY
exec "$PY" "$REPO/bench/session.py" "$@"
