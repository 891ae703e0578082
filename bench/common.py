"""What every benchmark script shares: the run label, the environment record,
timing, peak memory, out-of-memory handling, the device ceilings, CSV output
and the printed tables.

Two kinds of run, and nothing in between:
  * a GPU run: compiled Triton kernels on a CUDA device, timed with
    triton.testing.do_bench (median); rows are labelled GPU_LABEL.
  * a smoke run (--smoke): tiny shapes, and on a machine without CUDA the
    kernels go through the Triton interpreter, timed with time.perf_counter;
    every row and every printed table carries SMOKE_LABEL. Its numbers say
    that the harness runs, nothing about speed.
Without CUDA and without --smoke the scripts refuse to run, so a CPU number can
never be mistaken for a performance number.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

import csrc_triton

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"

SMOKE_LABEL = "SMOKE RUN — not performance"
GPU_LABEL = "GPU measurement"

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Columns every CSV row starts with, in this order.
META_COLUMNS = ["bench", "label", "timing_method", "device", "dtype", "timestamp", "torch",
                "triton", "cuda", "libraries", "git_commit", "command"]

MIB = 1024 * 1024


# ------------------------------------------------------------------ environment
def _version(distribution: str) -> Optional[str]:
    """Installed version of a package, read from its metadata (never imported,
    so an import with side effects, e.g. Unsloth's patching, cannot happen here)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


PEER_DISTRIBUTIONS = ("liger-kernel", "unsloth", "bitsandbytes", "transformers", "peft")


def library_versions() -> str:
    """'liger-kernel=0.5.2;unsloth=absent;...' for the peers a row may involve."""
    return ";".join(f"{d}={_version(d) or 'absent'}" for d in PEER_DISTRIBUTIONS)


def git_commit() -> str:
    """HEAD's short hash plus '+dirty' when the tree has changes ('unknown' outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               check=True, capture_output=True, text=True, timeout=10).stdout
        return head + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, Triton interpreter)"


# ------------------------------------------------------------------ run context
@dataclass
class RunContext:
    """Everything a script decides once: smoke or not, device, dtype, timing."""
    bench: str
    smoke: bool
    device: torch.device
    dtype: torch.dtype
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    smoke_reps: int = 2
    progress: bool = True
    meta: Dict[str, str] = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def label(self) -> str:
        return SMOKE_LABEL if self.smoke else GPU_LABEL

    @property
    def timing_method(self) -> str:
        if self.on_gpu:
            return "triton.testing.do_bench median (ms)"
        return "time.perf_counter median (ms), Triton interpreter on CPU"


def add_common_arguments(parser: argparse.ArgumentParser, *, default_dtype: str = "bf16",
                         kernel_timing: bool = True) -> None:
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes; runs on the CPU through the Triton interpreter when "
                             "there is no GPU; output is labelled as a smoke run, never as "
                             "performance (default: off)")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV file to write (default: bench/results/<script>-<UTC time>.csv, "
                             "or bench/results/smoke/<script>.csv with --smoke)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help=f"activation dtype (default: {default_dtype} on a GPU; fp32 in a smoke "
                             "run, since the interpreter cannot do bf16 arithmetic)")
    if kernel_timing:
        parser.add_argument("--warmup-ms", type=float, default=25.0,
                            help="do_bench warm-up time per measurement, ms (default: 25)")
        parser.add_argument("--rep-ms", type=float, default=100.0,
                            help="do_bench measuring time per measurement, ms (default: 100)")
        parser.add_argument("--smoke-reps", type=int, default=2,
                            help="timed repetitions per measurement in a CPU smoke run "
                                 "(default: 2)")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide the tqdm progress bar (default: shown)")
    parser.add_argument("--seed", type=int, default=0, help="random inputs' seed (default: 0)")


CPU = torch.device("cpu")


def bench_device(cpu_only: bool = False) -> torch.device:
    """The one place a bench entry point's device is decided, then handed to load_model
    and every tensor: a CUDA GPU when torch sees one and the kernels are compiled (the
    triton backend refuses CPU tensors there), else the CPU (the Triton interpreter).
    ``cpu_only``: a benchmark that measures the CPU path by design (cpu_real_model,
    distributed overlap on gloo) gets the CPU on any machine."""
    if cpu_only:
        return CPU
    return torch.device("cuda") if torch.cuda.is_available() and not csrc_triton.INTERPRETING else CPU


def make_context(bench: str, args: argparse.Namespace, default_dtype: str = "bf16") -> RunContext:
    """Decide device, dtype and label from the parsed arguments; refuse a
    non-smoke run without a GPU (SystemExit with the reason)."""
    device = bench_device()
    has_gpu = device.type == "cuda"
    if not has_gpu and not args.smoke:
        raise SystemExit(f"bench/{bench}: no CUDA GPU with compiled Triton kernels here "
                         f"({csrc_triton.runtime_description()}). Performance runs need one; "
                         "pass --smoke to check that the harness runs.")
    dtype_name = args.dtype or ("fp32" if not has_gpu else default_dtype)
    if not has_gpu and dtype_name != "fp32":
        raise SystemExit(f"bench/{bench}: --dtype {dtype_name} needs a GPU; the Triton "
                         "interpreter computes bf16/fp16 wrongly (see /work/shared/NOTES.md)")
    torch.manual_seed(args.seed)
    ctx = RunContext(bench=bench, smoke=bool(args.smoke), device=device, dtype=DTYPES[dtype_name],
                     warmup_ms=getattr(args, "warmup_ms", 25.0), rep_ms=getattr(args, "rep_ms", 100.0),
                     smoke_reps=getattr(args, "smoke_reps", 2), progress=not args.no_progress)
    ctx.meta = {
        "bench": bench, "label": ctx.label, "timing_method": ctx.timing_method,
        "device": device_name(device), "dtype": dtype_name,
        "torch": torch.__version__, "triton": _version("triton") or "absent",
        "cuda": str(torch.version.cuda), "libraries": library_versions(),
        "git_commit": git_commit(),
        "command": shlex.join(["python", "-m", f"bench.{bench}"] + sys.argv[1:]),
    }
    return ctx


def default_out_path(ctx: RunContext) -> Path:
    if ctx.smoke:
        return RESULTS_DIR / "smoke" / f"{ctx.bench}.csv"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return RESULTS_DIR / f"{ctx.bench}-{stamp}.csv"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------ timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], ctx: RunContext) -> float:
    """Median wall time of fn() in ms: do_bench on a GPU (it flushes L2 between
    calls and synchronizes), perf_counter around each call on the CPU."""
    if ctx.on_gpu:
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=ctx.warmup_ms, rep=ctx.rep_ms,
                                             return_mode="median"))
    # No warm-up here: callers have already made the first call (which pays
    # for parsing the kernel in the interpreter, compiling on a GPU).
    times = []
    for _ in range(max(1, ctx.smoke_reps)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_mib(fn: Callable[[], object], device: torch.device):
    """(peak, extra) MiB of one call on a GPU: peak = torch.cuda.max_memory_allocated
    during the call (everything alive at that moment, inputs included); extra =
    peak minus what was allocated just before it (what the call itself needed).
    (None, None) on the CPU, where torch keeps no such counter."""
    if device.type != "cuda":
        return None, None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / MIB, (peak - before) / MIB


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def release_memory(device: torch.device, *, collect: bool = False) -> None:
    """Between cases: hand cached blocks back (tensors die by reference count).
    After a failure (collect=True) also run the garbage collector first: the
    exception's traceback frames can hold the failed case's tensors in cycles.
    (gc.collect costs ~0.4 s with torch and triton loaded, so not every time.)"""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def describe_error(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"error: {type(err).__name__}: {text[:240]}"


# ------------------------------------------------------------------ ceilings
@dataclass
class Ceilings:
    copy_gbps: float      # device-to-device copy, (read + write bytes) / time
    matmul_tflops: float  # dense matmul in the run's dtype, 2 M N K / time
    copy_desc: str
    matmul_desc: str


def measure_ceilings(ctx: RunContext) -> Ceilings:
    """The device's achievable memory bandwidth and matmul throughput, measured
    in this run with the same timer as the cases: a large copy_ between two
    device buffers and a large square torch.matmul in the run's dtype."""
    if ctx.smoke:
        n_copy, n_mm = 1 << 20, 128
    else:
        n_copy, n_mm = 1 << 29, 8192   # 1 GiB of bf16 per buffer (>> L2); 8192^3 matmul
    copy_gbps = _copy_gbps(ctx, n_copy)
    matmul_tflops = _matmul_tflops(ctx, n_mm)
    release_memory(ctx.device)
    dtype = str(ctx.dtype).replace("torch.", "")
    return Ceilings(copy_gbps=copy_gbps, matmul_tflops=matmul_tflops,
                    copy_desc=f"copy_ of {n_copy} {dtype} elements",
                    matmul_desc=f"matmul {n_mm}x{n_mm}x{n_mm} {dtype}")


def _copy_gbps(ctx: RunContext, n: int) -> float:
    """(bytes read + bytes written) / median time of dst.copy_(src)."""
    src = torch.randn(n, device=ctx.device, dtype=ctx.dtype)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first call outside the timing, as for every case
    ms = median_ms(lambda: dst.copy_(src), ctx)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def _matmul_tflops(ctx: RunContext, n: int) -> float:
    """2 n^3 / median time of an [n, n] @ [n, n] torch.matmul."""
    a = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    torch.matmul(a, b)
    ms = median_ms(lambda: torch.matmul(a, b), ctx)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def rate(amount: Optional[float], ms: Optional[float], unit: float) -> Optional[float]:
    """amount / time in units of ``unit`` per second (None when either is missing)."""
    if amount is None or ms is None or ms <= 0:
        return None
    return amount / (ms * 1e-3) / unit


# ------------------------------------------------------------------ output
class CsvSink:
    """Writes one CSV row per measurement as soon as it is taken (a crash or an
    interrupted sweep keeps everything measured so far). Every row starts with
    the run's META_COLUMNS; ``timestamp`` is when that row was measured."""

    def __init__(self, path: Path, columns: Sequence[str], ctx: RunContext):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns = list(META_COLUMNS) + [c for c in columns if c not in META_COLUMNS]
        self.ctx = ctx
        self.rows: List[Dict[str, object]] = []
        self._file = open(self.path, "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="raise")
        self._writer.writeheader()

    def write(self, row: Dict[str, object]) -> Dict[str, object]:
        full = {c: "" for c in self.columns}
        full.update(self.ctx.meta, timestamp=utc_now())
        full.update({k: _cell(v) for k, v in row.items()})
        self._writer.writerow(full)
        self._file.flush()
        self.rows.append(full)
        return full

    def close(self) -> None:
        self._file.close()


def _cell(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def print_table(title: str, rows: Iterable[Dict[str, object]], columns: Sequence[str],
                ctx: RunContext, notes: Sequence[str] = ()) -> None:
    """A fixed-width table, headed by the run label (SMOKE RUN ... in a smoke run)."""
    rows = list(rows)
    banner = f"== {ctx.label} == {title} == {ctx.meta.get('device', '')} =="
    print()
    print(banner)
    if ctx.smoke:
        print(f"   {SMOKE_LABEL}: these timings only show that the harness runs.")
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))
    for note in notes:
        print(f"note: {note}")
    print(f"== {ctx.label} == end of {title} ==")


def progress(iterable, *, total: Optional[int], desc: str, ctx: RunContext):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, disable=not ctx.progress, file=sys.stderr,
                dynamic_ncols=True)



def report_main(parse_args, measure, format_report, argv=None) -> int:
    """The main of a bench that measures once and reports (step_anatomy, host_syncs):
    parse ``argv``, measure, print the report, write the result to --json when given."""
    args = parse_args(argv)
    result = measure(args)
    print(format_report(result))
    if args.json:
        write_json(args.json, result)
    return 0


def add_model_arguments(parser: argparse.ArgumentParser, smoke_layers: int) -> None:
    """--checkpoint and --layers: a local checkpoint, or a random LLaMA-3-8B-shaped model
    of that many decoder layers."""
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="local HF LLaMA checkpoint directory (default: none; a random "
                             "LLaMA-3-8B-shaped model with NF4 weights is built)")
    parser.add_argument("--layers", type=int, default=None,
                        help=f"decoder layers of the random model (default: 32; smoke: {smoke_layers})")


def write_json(path, result: dict) -> None:
    """``result`` as JSON at ``path``, written whole or not at all (temp file, rename)."""
    import json
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(path)
