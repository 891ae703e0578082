#!/usr/bin/env bash
# The device twin: the lent GPU machine's Python and package versions on this machine,
# and the three things that must work there, run here first (no GPU needed).
#
#   bench/device_twin.sh [VENV_DIR] [OUT]   # build (or reuse) VENV_DIR, run the steps into OUT
#   bench/device_twin.sh --plan             # the versions and the steps; nothing built or run
#
# VENV_DIR (default $ANITA_TWIN_VENV, else ~/.cache/anita/device-twin) is made with
# `PYENV_VERSION=3.12.1 python3.12 -m venv` (else any python3.12 on the PATH) and gets the
# pinned packages below, about 4.6 GB (torch's CUDA wheels); a VENV_DIR that already has
# them is reused as it is. OUT (default: a new folder under $TMPDIR or /tmp) must be new
# or empty. Steps: (1) the GPU session at smoke sizes, (2) the sm_90 ahead-of-time
# compile of every kernel, (3) the main job, train_sft.py; each one's log is OUT/<step>.log
#
# One difference from the GPU machine, in step (1) only: at smoke sizes on a CPU the
# session interprets the kernels, and triton 3.6's interpreter cannot run with numpy
# >= 2.4 (csrc_triton refuses it in one line), so that step puts numpy 2.3.5 in front
# (VENV_DIR/interpreter-numpy, PYTHONPATH). The GPU machine compiles the kernels and
# never interprets; steps (2) and (3) run the twin's own numpy 2.5.2. Step (1) also gets
# the peers' wheels the GPU session carries (bench/fetch_wheels.sh into OUT/wheels).
# and its exit status is in the summary printed last. Exit 0 when every step passed, 1
# when one failed or the venv could not be built, 2 on bad input. See bench/README.md,
# "The device twin".
set -u
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=device_twin.sh
PYTHON_VERSION=3.12.1
PINNED="torch==2.11.0 triton==3.6.0 transformers==5.17.0 safetensors==0.8.0 tokenizers==0.23.2 numpy==2.5.2 accelerate==1.15.0"
UNPINNED="peft pyarrow xxhash pytest tqdm jinja2"
ABSENT="datasets bitsandbytes trl lm-eval gguf"     # the GPU machine does not have them
STEPS="session_smoke sm90_compile main_job"

die() { echo "$PROG: error: $*" >&2; exit "${2:-2}"; }

plan() {
    cat <<EOF
$PROG plan (nothing is built or run by --plan):
  python    $PYTHON_VERSION (PYENV_VERSION=$PYTHON_VERSION python3.12, else any python3.12 on the PATH)
  pinned    $PINNED
  unpinned  $UNPINNED
  absent    $ABSENT (as on the GPU machine: a venv holding one is not reused)
  size      about 4.6 GB; then pip install --no-deps -e $REPO
  steps     session_smoke  PYTHONPATH=VENV/interpreter-numpy (numpy 2.3.5: the CPU interpreter's)
                           WHEELS=OUT/wheels PYTHON=VENV/bin/python bench/gpu_session.sh OUT/session --smoke
            sm90_compile   VENV/bin/python -m tests.sm90_compile
            main_job       VENV/bin/python train_sft.py --output-dir OUT/main_job
EOF
}

case "${1:-}" in
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"
               echo; plan; exit 0 ;;
    --plan) plan; exit 0 ;;
    -*) die "unknown option $1 (usage: $PROG [VENV_DIR] [OUT] | --plan | --help)" ;;
esac
[ $# -le 2 ] || die "too many arguments (usage: $PROG [VENV_DIR] [OUT] | --plan | --help)"
VENV=${1:-${ANITA_TWIN_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/anita/device-twin}}
if [ -n "${2:-}" ]; then
    OUT=$2
    [ ! -e "$OUT" ] || [ -d "$OUT" ] || die "OUT $OUT is a file, not a folder"
    [ ! -d "$OUT" ] || [ -z "$(ls -A "$OUT")" ] || die "OUT $OUT exists and is not empty; give a new folder"
    mkdir -p "$OUT" || die "cannot create OUT $OUT"
else
    OUT=$(mktemp -d "${TMPDIR:-/tmp}/anita-device-twin.XXXXXX") || die "cannot create a folder under ${TMPDIR:-/tmp}"
fi
OUT=$(cd "$OUT" && pwd)

# what VENV_DIR's interpreter lacks or has too much, on one line ('' when it is a twin)
CHECK='
import importlib.metadata as m, sys
pinned, unpinned, absent = (a.split() for a in sys.argv[1:4])
def version(d):
    try:
        return m.version(d).split("+")[0]
    except m.PackageNotFoundError:
        return None
bad = [] if sys.version_info[:2] == (3, 12) else ["python %s, not 3.12" % sys.version.split()[0]]
for pin in pinned:
    name, want = pin.split("==")
    if version(name) != want:
        bad.append("%s %s, not %s" % (name, version(name) or "absent", want))
bad += ["%s absent" % d for d in unpinned if version(d) is None]
bad += ["%s %s installed" % (d, version(d)) for d in absent if version(d)]
print("; ".join(bad))
'
twin_problems() { "$VENV/bin/python" -c "$CHECK" "$PINNED" "$UNPINNED" "$ABSENT" 2>&1; }

find_python() {     # the command that runs Python 3.12, printed; nothing when there is none
    local ok='import sys; sys.exit(sys.version_info[:2] != (3, 12))'
    if PYENV_VERSION=$PYTHON_VERSION python3.12 -c "$ok" 2>/dev/null; then
        echo "env PYENV_VERSION=$PYTHON_VERSION python3.12"; return
    fi
    local p
    for p in $(type -ap python3.12); do
        if "$p" -c "$ok" 2>/dev/null; then echo "$p"; return; fi
    done
}

build_venv() {
    if [ -x "$VENV/bin/python" ]; then
        local problems; problems=$(twin_problems)
        if [ -z "$problems" ]; then echo "[$PROG] reusing $VENV (versions match)"; return 0; fi
        case "$problems" in
            *"not 3.12"*|*installed*) die "$VENV is not a twin of the GPU machine ($problems); remove it or name another VENV_DIR" 1 ;;
        esac
        echo "[$PROG] $VENV: $problems; installing the pinned packages into it"
    else
        local py; py=$(find_python)
        [ -n "$py" ] || die "no Python 3.12 found (tried PYENV_VERSION=$PYTHON_VERSION python3.12 and every python3.12 on the PATH); install it (e.g. pyenv install $PYTHON_VERSION)" 1
        echo "[$PROG] creating $VENV with $py"
        $py -m venv "$VENV" || die "$py -m venv $VENV failed" 1
    fi
    echo "[$PROG] pip install (about 4.6 GB: several minutes on a fast link)"
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install -q $PINNED $UNPINNED || die "pip install into $VENV failed" 1
    local problems; problems=$(twin_problems)
    [ -z "$problems" ] || die "$VENV after pip install: $problems" 1
}

install_anita() {   # editable, this checkout's packages (no dependencies: they are pinned above)
    local where
    where=$(cd / && "$VENV/bin/python" -c 'import anita_core; print(anita_core.__file__)' 2>/dev/null)
    [ "$where" = "$REPO/anita_core/__init__.py" ] && return 0
    echo "[$PROG] pip install --no-deps -e $REPO"
    "$VENV/bin/pip" install -q --no-deps -e "$REPO" || die "pip install -e $REPO failed" 1
}

build_venv
install_anita
V=$VENV/bin/python
echo "[$PROG] $("$V" -c 'import sys, torch, triton, transformers; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}")')"
echo "[$PROG] results in $OUT"

SUMMARY=()
FAILED=0
run_step() {        # name, command...: output to OUT/<name>.log, its last lines echoed
    local name=$1 start=$SECONDS code; shift
    echo "[$PROG] $name: $*"
    (cd "$REPO" && env -u PYTHONPATH -u VIRTUAL_ENV "$@") >"$OUT/$name.log" 2>&1
    code=$?
    tail -n 4 "$OUT/$name.log" | sed 's/^/    | /'
    SUMMARY+=("$(printf '%-14s exit %-3s %5d s  %s' "$name" "$code" $((SECONDS - start)) "$OUT/$name.log")")
    [ "$code" -eq 0 ] || FAILED=$((FAILED + 1))
}
INTERP_NUMPY=$VENV/interpreter-numpy
if [ ! -d "$INTERP_NUMPY/numpy" ]; then
    echo "[$PROG] numpy 2.3.5 for the CPU interpreter into $INTERP_NUMPY"
    "$VENV/bin/pip" install -q --no-deps --target "$INTERP_NUMPY" numpy==2.3.5 \
        || die "pip install --target $INTERP_NUMPY numpy==2.3.5 failed" 1
fi
echo "[$PROG] the peers' wheels into $OUT/wheels (bench/fetch_wheels.sh)"
PYTHON="$V" "$REPO/bench/fetch_wheels.sh" "$OUT/wheels" >"$OUT/wheels.log" 2>&1 \
    || echo "[$PROG] fetch_wheels.sh failed (see $OUT/wheels.log): the session's peer rows will say so"
run_step session_smoke env PYTHONPATH="$INTERP_NUMPY" WHEELS="$OUT/wheels" PYTHON="$V" \
    "$REPO/bench/gpu_session.sh" "$OUT/session" --smoke
run_step sm90_compile "$V" -m tests.sm90_compile
run_step main_job "$V" train_sft.py --output-dir "$OUT/main_job"

echo "== $PROG summary ($(echo "$PINNED" | cut -d' ' -f1-3), python $("$V" -c 'import platform; print(platform.python_version())')) =="
printf '%s\n' "${SUMMARY[@]}"
echo "== $((3 - FAILED)) of 3 steps passed =="
[ "$FAILED" -eq 0 ]
