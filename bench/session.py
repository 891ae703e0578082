"""The GPU session: every headline measurement in one command under one time budget.

    bench/gpu_session.sh OUT              # on a lent H100/H200, from the repository root
    bench/gpu_session.sh OUT --smoke      # the same steps at smoke sizes (CPU rehearsal)
    bench/gpu_session.sh --plan           # the steps and their budgets, nothing run
    bench/gpu_session.sh OUT --only kernels,headline     # rerun steps into an existing OUT

Each step is one process through a bench entry point, killed at its budget (SIGTERM,
then SIGKILL 5 s later, both inside the budget), so the session's wall time is at most
the sum of the budgets (printed first; 470 s on a GPU) plus the runner's own start.
Every CSV row is appended and flushed as it is measured, so a step stopped at its
limit keeps what it finished. OUT/summary.txt (and summary.csv) get one line per step
as it ends: exit status, seconds, budget, rows written. The last step writes
OUT/headline.csv and prints it (bench/headline.py).

Correctness first: gpu_tests (the parity tests first) runs right after device and
wheels, so a broken kernel shows before minutes go to timing it.

Unless set already, for every step: ANITA_AUTOTUNE=pruned (one config per launch shape,
no timing runs: csrc_triton/autotune_policy.py), which bounds compile time from a cold
Triton cache; TRITON_CACHE_DIR=OUT/triton_cache, one cache for every step; and
TRITON_CACHE_AUTOTUNING=1 (triton >= 3.2) keeps autotuning results in it: a kernel
compiled or tuned in one step is loaded, not rebuilt, in the next.

Peers: bitsandbytes (and on a GPU liger-kernel) are installed offline from --wheels
(default $WHEELS, else bench/wheels; bench/fetch_wheels.sh fills it on a machine with
the package registry) into a temporary folder put on PYTHONPATH, when missing. No
wheels folder while a peer is missing: one line says so, the peer's rows say "not
installed" with the reason, every other step runs, and the session exits 2.
This module imports only the standard library: bad input and --plan answer at once.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
PROG = "gpu_session.sh"
# what every step imports (the peers are optional: their rows say "not installed")
REQUIRED_MODULES = ("torch", "triton", "transformers", "safetensors")
KILL_GRACE_S = 5
# distribution -> (module, needed on a CPU too): liger's kernels run only on a GPU
PEERS = {"bitsandbytes": ("bitsandbytes", True), "liger-kernel": ("liger_kernel", False)}
GPU_TEST_FILES = ("tests/test_gpu_training.py", "tests/test_fused_projections.py",
                  "tests/test_lora_linear.py")   # the parity tests first, then the rest


@dataclass(frozen=True)
class Step:
    name: str
    gpu_budget_s: int
    smoke_budget_s: int
    what: str
    outputs: Tuple[str, ...] = ()


STEPS = (
    Step("device", 15, 60, "GPU, versions, host memory -> device.txt, device.json",
         ("device.json",)),
    Step("wheels", 25, 60, "install missing peers offline from the wheels folder",
         ("wheels.log",)),
    Step("gpu_tests", 60, 240, "pytest -m gpu, the parity tests first, a row per test as it "
         "ends", ("gpu_tests.csv",)),
    Step("train_anita", 70, 240, "anita SFT + DPO steps, LLaMA-3-8B (32 layers), seq 2048, "
         "batch 4; planner's predicted peak", ("train_anita.csv",)),
    Step("train_peers", 90, 300, "transformers+PEFT+bitsandbytes, then + Liger: the same rows",
         ("train_peers.csv",)),
    Step("kernels", 60, 240, "nf4_dequantize vs copy and bitsandbytes; attention vs SDPA "
         "flash / cuDNN / FlexAttention, T 8192", ("kernels.csv",)),
    Step("nf4_matmul", 55, 240, "NF4 matmul paths vs dense cuBLAS and bitsandbytes, "
         "M = 1 ... 16384, crossover", ("nf4_matmul.csv",)),
    Step("max_context", 55, 180, "one batch-1 step at the planner's maximum under an 80 GB cap "
         "(time-limited)", ("max_context.csv",)),
    Step("dpo_packing", 20, 180, "DPO pairs padded vs packed (prompt once): positions per pair "
         "and tokens/s of a policy step, bundled and synthetic pairs (tiny model)",
         ("dpo_packing.csv",)),
    Step("step_anatomy", 15, 120, "launches / matmuls / copies per layer (tiny model)",
         ("step_anatomy.json",)),
    Step("headline", 5, 60, "OUT/headline.csv from the CSVs above, printed",
         ("headline.csv",)),
)
STEP_NAMES = tuple(s.name for s in STEPS)


def step_command(name: str, out: Path, smoke: bool, py: str, family: str = "llama") -> List[str]:
    """The command of a step (the wheels step runs inside the runner: none); ``family``
    (--family): the model family the training steps run (bench/shapes.GPU_DIMS)."""
    s = ["--smoke"] if smoke else []
    quiet = ["--no-progress", "--no-plot"]
    if name == "device":
        return [py, "-m", "bench.device_info", str(out)]
    if name == "train_anita" or name == "train_peers":
        # the peers' first-step losses are compared with anita's rows
        frameworks = ["anita"] if name == "train_anita" else [
            "hf_peft_bnb,hf_peft_bnb_liger", "--loss-reference", str(out / "train_anita.csv")]
        sizes = ["--batch", "2"] if smoke else ["--layers", "32", "--seq-lens", "2048",
                                                "--batch", "4", "--steps", "3",
                                                "--warmup-steps", "1"]
        if not smoke and family != "llama":      # each family's own depth (Qwen3-8B: 36)
            sizes = sizes[2:]
        return [py, "-m", "bench.train", *s, *quiet, "--family", family, "--frameworks", *frameworks,
                "--objectives", "sft,dpo", "--no-max-seq", *sizes, "--out", str(out / f"{name}.csv")]
    if name == "kernels":
        tokens = [] if smoke else ["--tokens", "8192", "--warmup-ms", "10", "--rep-ms", "50"]
        return [py, "-m", "bench.kernels", *s, *quiet, "--ops", "nf4_dequantize,flash_attention",
                "--modes", "forward,both", "--providers",
                "ours,torch,bitsandbytes,sdpa_causal,sdpa_flash,sdpa_cudnn,flex_attention",
                *tokens, "--out", str(out / "kernels.csv")]
    if name == "nf4_matmul":
        ms = (["--m", "1,13", "--projections", "down_proj"] if smoke else
              ["--m", "1,16,64,192,256,1024,4096,16384", "--warmup-ms", "10", "--rep-ms", "40"])
        return [py, "-m", "bench.nf4_matmul", *s, *quiet, "--providers",
                "ours,ours_fused,ours_dequant+matmul,bnb_dequant+matmul,bnb_matmul_4bit,"
                "dense_matmul", *ms, "--out", str(out / "nf4_matmul.csv")]
    if name == "max_context":
        timing = [] if smoke else ["--time-budget-s", "25"]
        return [py, "-m", "bench.max_context_step", *s, "--no-progress", *timing,
                "--out", str(out / "max_context.csv")]
    if name == "gpu_tests":
        return [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.pytest_rows",
                "--rows-csv", str(out / "gpu_tests.csv"), "-m", "gpu", *gpu_test_files()]
    if name == "dpo_packing":
        return [py, "-m", "bench.dpo_packing", *s, "--timed-batches", "8",
                "--out", str(out / "dpo_packing.csv")]
    if name == "step_anatomy":
        size = ["--batch", "1", "--seq", "16"] if smoke else []
        return [py, "-m", "bench.step_anatomy", *size, "--json", str(out / "step_anatomy.json")]
    if name == "headline":
        return [py, "-m", "bench.headline", str(out)]    # labels come from the rows
    return []


def gpu_test_files() -> List[str]:
    """Every test file with a gpu-marked test, the issue's parity tests first (a text
    scan: collecting only these keeps the CPU rehearsal from importing the whole suite)."""
    found = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "pytest.mark.gpu" in p.read_text(encoding="utf-8"))
    return [f for f in GPU_TEST_FILES if f in found] + [f for f in found if f not in GPU_TEST_FILES]


# ------------------------------------------------------------------ command line
class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (bad input)
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.exit(2)


def parse_args(argv) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="steps: " + ", ".join(STEP_NAMES))
    p.add_argument("out", nargs="?", metavar="OUT", help="folder the session writes (new or empty)")
    p.add_argument("--family", default="llama", choices=("llama", "mistral", "qwen2", "qwen3"),
                   help="the model family of the training steps: llama (LLaMA-3-8B, default), "
                        "mistral (Mistral-7B), qwen2 (Qwen2.5-7B), qwen3 (Qwen3-8B)")
    p.add_argument("--smoke", action="store_true",
                   help="smoke sizes: the same steps on a CPU, labelled as a smoke run (default: off)")
    p.add_argument("--plan", action="store_true",
                   help="print the steps and their budgets, run nothing (default: off)")
    p.add_argument("--only", default=None, metavar="STEPS",
                   help="comma-separated steps to (re)run into OUT, which may hold an earlier "
                        "session (default: every step)")
    p.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS",
                   help="override one step's budget, repeatable (default: the table --plan prints)")
    p.add_argument("--wheels", default=None, metavar="DIR",
                   help="folder of wheels for the missing peers (default: $WHEELS, else bench/wheels)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run up to N measuring steps at once, after device and wheels and before "
                        "headline; only for --smoke on a CPU, where the steps share no device "
                        "(default: 1, one after the other, as a GPU run must)")
    args = p.parse_args(argv)
    args.steps = list(STEP_NAMES)
    if args.only is not None:
        chosen = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in STEP_NAMES]
        if not chosen or unknown:
            p.error(f"argument --only: unknown step(s) {', '.join(unknown) or '(none given)'}; "
                    f"choose from {', '.join(STEP_NAMES)}")
        args.steps = [s for s in STEP_NAMES if s in chosen]
    args.budgets = {s.name: (s.smoke_budget_s if args.smoke else s.gpu_budget_s) for s in STEPS}
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in STEP_NAMES or not seconds.isdigit() or int(seconds) < 1:
            p.error(f"argument --budget: {item!r}: expected STEP=SECONDS with a step of "
                    f"{', '.join(STEP_NAMES)} and whole seconds >= 1")
        args.budgets[name] = int(seconds)
    if args.jobs < 1 or (args.jobs > 1 and not args.smoke):
        p.error(f"argument --jobs: {args.jobs}: must be 1, or more only with --smoke (GPU steps "
                "share the device and their timings)")
    if args.plan:
        return args
    if args.out is None:
        p.error("the following arguments are required: OUT (the folder the session writes; "
                "--plan prints the steps without running them)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"argument OUT: {out} is a file, not a folder")
    if args.only is None and out.is_dir() and any(out.iterdir()):
        p.error(f"argument OUT: {out} exists and is not empty; give a new folder, or --only "
                "STEPS to rerun steps into it")
    # the steps run this interpreter: without the project's packages every step would
    # fail in its own log, so say it once, before OUT is made
    lacking = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if lacking:
        p.error(f"{os.environ.get('PYTHON') or sys.executable} cannot import {', '.join(lacking)}; "
                "run it with the project's interpreter (PYTHON=.venv/bin/python "
                "bench/gpu_session.sh OUT, or activate the venv)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"argument OUT: cannot create {out}: {e.strerror}")
    args.wheels = Path(args.wheels or os.environ.get("WHEELS") or REPO / "bench" / "wheels")
    return args


def plan_text(args) -> str:
    mode = "smoke run on this machine" if args.smoke else "GPU run (H100 / H200, cold Triton cache)"
    lines = [f"{PROG} plan, {mode}:", f"  {'step':13s} {'budget':>7s}  what"]
    for s in STEPS:
        if s.name in args.steps:
            lines.append(f"  {s.name:13s} {args.budgets[s.name]:>5d} s  {s.what}")
    total = sum(args.budgets[n] for n in args.steps)
    lines.append(f"  {'total':13s} {total:>5d} s  (a step is killed at its budget; the runner's "
                 "own start adds about a second)")
    return "\n".join(lines)


# ------------------------------------------------------------------ running
RUNNING: set = set()          # processes of the steps under way (killed on Ctrl-C)


def run_step(argv: Sequence[str], log: Path, budget_s: int, env: Dict[str, str]) -> int:
    """Run ``argv`` in its own process group with output to ``log``; SIGTERM at
    budget - KILL_GRACE_S, SIGKILL at the budget; 124 when it was stopped."""
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(list(argv), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        RUNNING.add(proc)
        try:
            return proc.wait(timeout=max(1, budget_s - KILL_GRACE_S))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            f.write(f"\n{PROG}: stopped at its budget of {budget_s} s\n")
            return 124
        except BaseException:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            RUNNING.discard(proc)


def _signal_group(proc, signum) -> None:
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def rows_written(out: Path, outputs: Sequence[str]) -> str:
    parts = []
    for name in outputs:
        path = out / name
        if not path.exists():
            parts.append(f"{name} missing")
        elif name.endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as f:
                parts.append(f"{max(0, sum(1 for _ in csv.reader(f)) - 1)} rows in {name}")
        else:
            parts.append(f"{name} written")
    return "; ".join(parts) or "-"


class Summary:
    """OUT/summary.txt and summary.csv, a line per finished step, flushed to disk at once;
    a rerun (--only) replaces the lines of the steps it reruns."""

    def __init__(self, out: Path):
        self.txt, self.csv = out / "summary.txt", out / "summary.csv"
        self.rows: Dict[str, dict] = {}
        if self.csv.exists():
            with open(self.csv, newline="", encoding="utf-8") as f:
                self.rows = {r["step"]: r for r in csv.DictReader(f)}

    def record(self, step: str, status: str, seconds: float, budget: int, rows: str) -> str:
        self.rows[step] = {"step": step, "status": status, "seconds": f"{seconds:.1f}",
                           "budget_s": str(budget), "rows": rows,
                           "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        ordered = [self.rows[n] for n in STEP_NAMES if n in self.rows]
        lines = [f"{r['step']}: {r['status']}, {r['seconds']} s of {r['budget_s']} s; {r['rows']}"
                 for r in ordered]
        _atomic_write(self.txt, "\n".join(lines) + "\n")
        with open(self.csv.with_suffix(".tmp"), "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(ordered[0]))
            writer.writeheader()
            writer.writerows(ordered)
            f.flush()
            os.fsync(f.fileno())
        self.csv.with_suffix(".tmp").replace(self.csv)
        return lines[[r["step"] for r in ordered].index(step)]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def peer_missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def install_peers(out: Path, wheels: Path, py: str, env: Dict[str, str]) -> Tuple[str, List[str], str]:
    """(status, peers still missing, the reason) after installing the missing peers this
    machine needs from ``wheels``; the log goes to OUT/wheels.log."""
    on_gpu = _device_is_cuda(out)
    needed = [d for d, (module, on_cpu) in PEERS.items() if (on_gpu or on_cpu) and peer_missing(module)]
    log = out / "wheels.log"
    if not needed:
        log.write_text("every peer this machine needs is importable\n")
        return "exit 0", [], ""
    if not wheels.is_dir():
        why = f"no wheels folder {wheels} (bench/fetch_wheels.sh downloads them)"
        log.write_text(why + "\n")
        return "exit 2", needed, why
    files = [str(w) for d in needed for w in sorted(wheels.glob(d.replace("-", "_") + "-*.whl"))]
    site = Path(env["ANITA_SESSION_SITE"])
    code = run_step([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                     "--no-cache-dir", "--upgrade", "--target", str(site), *files], log, 120, env) \
        if files else 1
    still = [d for d in needed if not (site / PEERS[d][0]).is_dir()]
    why = "" if not still else (f"no wheel of it in {wheels}" if not files else
                                f"pip install from {wheels} failed (OUT/wheels.log)")
    return f"exit {code}", still, why


def _device_is_cuda(out: Path) -> bool:
    try:
        return bool(json.loads((out / "device.json").read_text())["cuda_device"])
    except (OSError, ValueError, KeyError):
        return False


class Session:
    def __init__(self, args, out: Path, py: str, env: Dict[str, str]):
        self.args, self.out, self.py, self.env = args, out, py, env
        self.summary = Summary(out)
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.failed = self.missing_wheels = False

    def say(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)

    def run(self, name: str) -> None:
        step = next(s for s in STEPS if s.name == name)
        budget = self.args.budgets[name]
        self.say(f"[{time.monotonic() - self.started:5.0f} s] {name} (budget {budget} s) ...")
        t0, status = time.monotonic(), "interrupted"
        try:
            if name == "wheels":
                status = self._wheels()
            else:
                code = run_step(step_command(name, self.out, self.args.smoke, self.py,
                                             self.args.family),
                                self.out / f"{name}.log", budget, self.env)
                status = f"exit {code}" + (" (stopped at its budget)" if code == 124 else "")
        except OSError as e:          # the step could not start: the others still run
            status = f"error: {e}"
        finally:
            with self.lock:
                self.failed = self.failed or not status.startswith("exit 0")
                line = self.summary.record(name, status, time.monotonic() - t0, budget,
                                           rows_written(self.out, step.outputs))
            self.say("  " + line)

    def _wheels(self) -> str:
        status, still, why = install_peers(self.out, self.args.wheels, self.py, self.env)
        if still:
            self.env["ANITA_PEERS_NOT_INSTALLED"] = f"{','.join(still)}: {why}"
            self.missing_wheels = self.missing_wheels or not self.args.wheels.is_dir()
            print(f"{PROG}: error: {', '.join(still)} not installed: {why}; their rows say "
                  "\"not installed\", the rest runs", file=sys.stderr, flush=True)
        return status


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print(plan_text(args), flush=True)
    if args.plan:
        return 0
    out = Path(args.out).resolve()
    py = os.environ.get("PYTHON") or sys.executable
    site = Path(tempfile.mkdtemp(prefix="anita-session-site-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", ANITA_SESSION_SITE=str(site))
    for key, value in (("ANITA_AUTOTUNE", "pruned"), ("TRITON_CACHE_AUTOTUNING", "1"),
                       ("TRITON_CACHE_DIR", str(out / "triton_cache"))):
        env[key] = env.get(key) or value          # unless set already (see above)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(REPO), env.get("PYTHONPATH"))
                                        if p)
    session = Session(args, out, py, env)
    before = [n for n in args.steps if n in ("device", "wheels")]
    after = [n for n in args.steps if n == "headline"]
    middle = [n for n in args.steps if n not in before + after]
    try:
        for name in before:
            session.run(name)
        if args.jobs > 1:
            pool = ThreadPoolExecutor(max_workers=args.jobs)
            try:
                for future in [pool.submit(session.run, n) for n in middle]:
                    future.result()
            except KeyboardInterrupt:
                for proc in list(RUNNING):
                    _signal_group(proc, signal.SIGKILL)
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            for name in middle:
                session.run(name)
        for name in after:
            session.run(name)
    except KeyboardInterrupt:
        for proc in list(RUNNING):
            _signal_group(proc, signal.SIGKILL)
        print(f"{PROG}: interrupted; OUT keeps every finished step and row", file=sys.stderr)
        return 130
    print(f"{PROG}: {time.monotonic() - session.started:.0f} s; results in {out}", flush=True)
    if after and (out / "headline.txt").exists():
        print((out / "headline.txt").read_text(), end="")
    return 2 if session.missing_wheels else (1 if session.failed else 0)


if __name__ == "__main__":
    sys.exit(main())
