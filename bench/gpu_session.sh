#!/usr/bin/env bash
# One-shot GPU session: everything a lent H100/H200 should tell us, in one command, < 8 minutes.
#
#   bench/gpu_session.sh OUT_DIR            # on the GPU machine, from the repository root
#   bench/gpu_session.sh OUT_DIR --smoke    # the same steps at smoke size (CPU: checks the wiring)
#
# Steps (each under its own time limit, so one slow step cannot eat the others):
#   device       OUT_DIR/device.txt: GPU name, capability, memory, torch/triton/CUDA versions
#   wheels       installs bitsandbytes / liger-kernel offline from $WHEELS (default bench/wheels)
#                when they are missing (see bench/README.md, "Bringing the peers along")
#   gpu_tests    python -m pytest -m gpu                    -> OUT_DIR/gpu_tests.xml (JUnit)
#   nf4_matmul   fused vs dequantize+cuBLAS vs bnb vs dense, M = 1 … 16384, four 8B shapes
#                                                           -> OUT_DIR/nf4_matmul.csv (+ crossover)
#   kernels      every op at T = 2048, 8192 against torch / liger / bnb
#                                                           -> OUT_DIR/kernels.csv
#   train        QLoRA steps of a LLaMA-3-8B-shaped model (8 layers, seq 2048), anita against
#                transformers + PEFT + bitsandbytes         -> OUT_DIR/train.csv
#   step_anatomy launches, matmuls and copies per layer of one step (tiny model)
#                                                           -> OUT_DIR/step_anatomy.json
# OUT_DIR/summary.txt lists each step's exit status and seconds; *.log hold their output.
set -uo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: bench/gpu_session.sh OUT_DIR [--smoke]" >&2
    exit 2
fi
OUT=$1
shift
SMOKE=""
if [[ "${1:-}" == "--smoke" ]]; then
    SMOKE="--smoke"
    shift
fi
if [[ $# -gt 0 ]]; then
    echo "gpu_session.sh: unknown argument '$1' (expected --smoke)" >&2
    exit 2
fi
PY=${PYTHON:-python}
WHEELS=${WHEELS:-bench/wheels}
mkdir -p "$OUT" || exit 2
: > "$OUT/summary.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, record status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    local note=""
    [[ $status -eq 124 || $status -eq 137 ]] && note=" (time limit ${limit}s)"
    echo "$name: exit $status$note, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

step device 60 "$PY" -c '
import platform, torch, triton
print("host:", platform.node())
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.1f} GiB",
          p.multi_processor_count, "SMs")
else:
    print("device: none (CPU only; kernels run through the Triton interpreter)")
'
cp "$OUT/device.log" "$OUT/device.txt"

# bitsandbytes and liger-kernel are peers and oracles; a GPU machine without network
# gets them from wheels brought along (pip install --no-index: never the network).
step wheels 90 "$PY" - "$WHEELS" <<'EOF'
import importlib.util, pathlib, subprocess, sys
wheels = pathlib.Path(sys.argv[1])
missing = [name for name, module in (("bitsandbytes", "bitsandbytes"), ("liger-kernel", "liger_kernel"))
           if importlib.util.find_spec(module) is None]
if not missing:
    print("bitsandbytes and liger-kernel already installed")
elif not wheels.is_dir():
    print(f"missing {missing} and no wheel folder {wheels}: their comparisons will be skipped")
else:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                    "--find-links", str(wheels), *missing], check=True)
EOF

if [[ -n "$SMOKE" ]]; then
    # CPU: only check that the gpu-marked tests are collected (they skip without CUDA)
    step gpu_tests 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu --collect-only
    step nf4_matmul 300 "$PY" -m bench.nf4_matmul --smoke --no-progress --no-plot \
        --out "$OUT/nf4_matmul.csv"
    step kernels 300 "$PY" -m bench.kernels --smoke --no-progress --no-plot \
        --ops nf4_dequantize,nf4_matmul --out "$OUT/kernels.csv"
    step train 300 "$PY" -m bench.train --smoke --no-progress --no-plot --out "$OUT/train.csv"
else
    step gpu_tests 110 "$PY" -m pytest -q -p no:cacheprovider -m gpu --junitxml "$OUT/gpu_tests.xml"
    step nf4_matmul 120 "$PY" -m bench.nf4_matmul --no-progress --no-plot \
        --m 1,16,64,192,256,1024,4096,16384 \
        --providers ours,ours_fused,ours_dequant+matmul,bnb_dequant+matmul,dense_matmul \
        --out "$OUT/nf4_matmul.csv"
    step kernels 80 "$PY" -m bench.kernels --no-progress --no-plot --tokens 2048,8192 \
        --providers ours,torch,liger,bitsandbytes --modes both --out "$OUT/kernels.csv"
    step train 110 "$PY" -m bench.train --no-progress --no-plot --layers 8 --seq-lens 2048 \
        --no-max-seq --steps 3 --warmup-steps 1 --out "$OUT/train.csv"
    # launches per layer as compiled kernels count them (the CPU table is the interpreter's)
    step step_anatomy 40 "$PY" -m bench.step_anatomy --json "$OUT/step_anatomy.json"
fi

echo "results in $OUT:"
ls -1 "$OUT"
! grep -q "exit [^0]" "$OUT/summary.txt"
