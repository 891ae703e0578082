"""Every csrc_triton op against its peers, forward / backward / both, over
LLaMA-3-8B shapes.

    python -m bench.kernels                              # full sweep on a GPU
    python -m bench.kernels --ops rms_norm,swiglu --tokens 2048,8192
    python -m bench.kernels --smoke                      # CPU check that the harness runs

Providers: ours (csrc_triton), torch (eager PyTorch / transformers-style code,
bench/eager.py), torch.compile of that, and where they import: liger
(Liger-Kernel), unsloth, bitsandbytes (NF4 ops); for flash_attention, SDPA with a
dense document mask (torch), SDPA causal on unpacked rows, FlexAttention and
flash-attn's varlen function, SDPA held to its flash or cuDNN backend
(bench/ops_attention.py). Each provider is first
checked against torch eager (outputs and input gradients, smallest shape);
a provider that disagrees is reported as an error and not timed.

One CSV row per op / provider / mode / shape (see bench/README.md for every
column), then a printed table and PNG plots (bench/plot.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):  # run as a file: make `import bench` work like python -m
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common, plot  # noqa: E402
from bench.cases import (MODES, OpSpec, Problem, SweepSettings, Unavailable,  # noqa: E402
                         check_tolerance, check_values, mode_callable, relative_error)
from bench.shapes import (GPU_TOKENS, LLAMA3_8B, SMOKE, SMOKE_PROJECTIONS, SMOKE_TOKENS,  # noqa: E402
                          parse_int_list)

PROVIDERS = ("ours", "torch", "torch.compile", "liger", "unsloth", "bitsandbytes",
             "sdpa_causal", "sdpa_flash", "sdpa_cudnn", "flex_attention", "flash_attn")
REFERENCE = "torch"

COLUMNS = ["op", "provider", "mode", "group", "shape", "tokens", "status", "median_ms",
           "first_call_ms", "bytes", "flops", "gbps", "tflops", "frac_copy_bw", "frac_matmul",
           "peak_mib", "extra_mib", "check_rel_err", "check_shape", "ceiling_copy_gbps",
           "ceiling_matmul_tflops", "bound"]


def all_op_specs(settings: SweepSettings) -> List[OpSpec]:
    """The bench of every op record that names one (csrc_triton/records.py)."""
    from csrc_triton.records import all_records, resolve
    return [spec for record in all_records() if record.bench
            for spec in resolve(record.bench)(settings)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kernels", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    names = [s.name for s in all_op_specs(SweepSettings(LLAMA3_8B, (), None))]
    parser.add_argument("--ops", default=",".join(names),
                        help=f"comma-separated ops to run (default: all: {','.join(names)})")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help=f"comma-separated providers (default: {','.join(PROVIDERS)})")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated modes (default: {','.join(MODES)})")
    parser.add_argument("--tokens", type=parse_int_list, default=None,
                        help="comma-separated token counts T (default: "
                             f"{','.join(map(str, GPU_TOKENS))}; smoke: "
                             f"{','.join(map(str, SMOKE_TOKENS))})")
    parser.add_argument("--projections", default=None,
                        help="';'-separated projection groups for the NF4 ops, each named by "
                             "its projections, e.g. 'q_proj,o_proj;down_proj' (default: all four "
                             "distinct shapes q_proj,o_proj;k_proj,v_proj;gate_proj,up_proj;"
                             "down_proj; smoke: " + ";".join(SMOKE_PROJECTIONS) + ")")
    parser.add_argument("--no-double-quant", action="store_true",
                        help="single-level NF4 for dequantize / matmul / lora_linear "
                             "(default: double-quantized absmax, the QLoRA default)")
    parser.add_argument("--lora-r", type=int, default=32, help="LoRA rank (default: 32)")
    parser.add_argument("--lora-alpha", type=float, default=16.0,
                        help="LoRA alpha; scale = alpha / r (default: 16)")
    parser.add_argument("--no-plot", action="store_true",
                        help="do not write PNG plots next to the CSV (default: plots are "
                             "written when matplotlib is installed)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _choose(text: str, allowed, what: str) -> List[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [c for c in chosen if c not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {list(allowed)}")
    return chosen


class ProviderCheck:
    """Runs each provider once against torch eager (cached per op and provider)."""

    def __init__(self, ctx, seed: int):
        self.ctx, self.seed = ctx, seed
        self.reference: Dict[tuple, list] = {}
        self.results: Dict[tuple, tuple] = {}

    def __call__(self, spec: OpSpec, provider: str, problem: Problem):
        """(status or None when fine, relative error or None) for ``problem``,
        the smallest problem of its op and group."""
        key = (spec.name, problem.group, provider)
        if key not in self.results:
            self.results[key] = self._run(spec, provider, problem)
        return self.results[key]

    def _values(self, spec: OpSpec, provider: str, problem: Problem):
        case = spec.providers[provider](problem.make_inputs(), self.ctx)
        return check_values(case, self.seed)

    def _run(self, spec: OpSpec, provider: str, problem: Problem):
        failure = None
        try:
            key = (spec.name, problem.group)
            if key not in self.reference:
                self.reference[key] = self._values(spec, REFERENCE, problem)
            if provider == REFERENCE:
                return None, 0.0
            error = relative_error(self._values(spec, provider, problem), self.reference[key])
        except Unavailable as why:
            return f"skipped: {why}", None
        except Exception as err:  # noqa: BLE001 - a peer's failure is a result, not a crash
            failure = "oom" if common.is_out_of_memory(err) else common.describe_error(err)
        if failure is not None:
            common.release_memory(self.ctx.device, collect=True)
            return f"check failed: {failure}", None
        common.release_memory(self.ctx.device)
        tolerance = check_tolerance(self.ctx.dtype)
        if not error <= tolerance:
            return (f"error: output differs from torch eager (relative error {error:.3g} > "
                    f"{tolerance:g}); not timed"), error
        return None, error


def measure(case, mode: str, problem: Problem, ctx, ceilings: common.Ceilings, seed: int) -> dict:
    """Time one mode of one case: first call (compile / autotune), peak memory,
    then the median. Out-of-memory becomes status 'oom'."""
    row = {"status": "ok"}
    try:
        fn = mode_callable(case, mode, seed)
        start = time.perf_counter()
        fn()
        common.synchronize(ctx.device)
        row["first_call_ms"] = (time.perf_counter() - start) * 1e3
        row["peak_mib"], row["extra_mib"] = common.peak_memory_mib(fn, ctx.device)
        row["median_ms"] = common.median_ms(fn, ctx)
    except Unavailable as why:
        return {"status": f"skipped: {why}"}
    except Exception as err:  # noqa: BLE001
        return {"status": "oom" if common.is_out_of_memory(err) else common.describe_error(err)}
    work = problem.work(mode)
    row["gbps"] = common.rate(work.bytes, row["median_ms"], 1e9)
    row["tflops"] = common.rate(work.flops, row["median_ms"], 1e12)
    row["frac_copy_bw"] = row["gbps"] / ceilings.copy_gbps
    row["frac_matmul"] = row["tflops"] / ceilings.matmul_tflops
    return row


def run(args: argparse.Namespace) -> int:
    ctx = common.make_context("kernels", args)
    tokens = sorted(set(args.tokens or (SMOKE_TOKENS if ctx.smoke else GPU_TOKENS)))
    projections = args.projections.split(";") if args.projections else (
        SMOKE_PROJECTIONS if ctx.smoke else None)
    settings = SweepSettings(dims=SMOKE if ctx.smoke else LLAMA3_8B, tokens=tokens, ctx=ctx,
                             double_quant=not args.no_double_quant, lora_r=args.lora_r,
                             lora_alpha=args.lora_alpha, projections=projections, seed=args.seed)
    specs = {s.name: s for s in all_op_specs(settings)}
    ops = _choose(args.ops, specs, "ops")
    providers = _choose(args.providers, PROVIDERS, "providers")
    modes = _choose(args.modes, MODES, "modes")

    ceilings = common.measure_ceilings(ctx)
    print(f"[{ctx.label}] device: {ctx.meta['device']}; dims: {settings.dims.name}; "
          f"ceilings: {ceilings.copy_gbps:.1f} GB/s ({ceilings.copy_desc}), "
          f"{ceilings.matmul_tflops:.2f} TFLOP/s ({ceilings.matmul_desc})")

    jobs, check_problem = [], {}
    for name in ops:
        spec = specs[name]
        problems = spec.problems()
        for problem in reversed(problems):  # the smallest T of each group (sweeps ascend)
            check_problem[(name, problem.group)] = problem
        for provider in (p for p in providers if p in spec.providers):
            jobs += [(spec, provider, problem) for problem in problems]
    # Importing Unsloth patches transformers and torch settings process-wide:
    # its cases run after every other provider's (the sort is stable).
    jobs.sort(key=lambda job: job[1] == "unsloth")
    out = args.out or common.default_out_path(ctx)
    sink = common.CsvSink(out, COLUMNS, ctx)
    check = ProviderCheck(ctx, args.seed)
    skipped = defaultdict(set)
    bar = common.progress(None, total=len(jobs) * len(modes), desc=f"kernels [{ctx.label}]", ctx=ctx)
    for spec, provider, problem in jobs:
        checked = check_problem[(spec.name, problem.group)]
        check_status, check_error = check(spec, provider, checked)
        base = {"op": spec.name, "provider": provider, "group": problem.group,
                "shape": problem.shape, "tokens": problem.tokens, "bound": spec.bound,
                "check_rel_err": check_error, "check_shape": checked.shape,
                "ceiling_copy_gbps": ceilings.copy_gbps,
                "ceiling_matmul_tflops": ceilings.matmul_tflops}
        case = None
        if check_status is None:
            try:
                case = spec.providers[provider](problem.make_inputs(), ctx)
            except Unavailable as why:
                check_status = f"skipped: {why}"
            except Exception as err:  # noqa: BLE001
                check_status = "oom" if common.is_out_of_memory(err) else common.describe_error(err)
        for mode in modes:
            work = problem.work(mode)
            row = dict(base, mode=mode, bytes=work and work.bytes, flops=work and work.flops)
            if work is None:
                row["status"] = "skipped: the op has no backward (not differentiable)"
            elif check_status is not None:
                row["status"] = check_status
            else:
                row.update(measure(case, mode, problem, ctx, ceilings, args.seed))
            if str(row["status"]).startswith("skipped"):
                skipped[row["status"]].add(f"{spec.name}/{provider}")
            sink.write(row)
            bar.update(1)
        del case
        failed = any(str(r["status"]).startswith(("oom", "error", "check failed"))
                     for r in sink.rows[-len(modes):])
        common.release_memory(ctx.device, collect=failed)
    bar.close()
    sink.close()
    _report(sink.rows, specs, ops, skipped, ctx, out)
    if not args.no_plot:
        plot.plot_or_note(out)
    failures = [r for r in sink.rows if r["provider"] in ("ours", REFERENCE)
                and str(r["status"]).startswith(("error", "check failed"))]
    return 1 if failures else 0


def _fmt(value, digits: int = 3) -> str:
    if value in (None, ""):
        return ""
    try:
        return f"{float(value):.{digits}g}"
    except ValueError:
        return str(value)


def _report(rows, specs, ops, skipped, ctx, out: Path) -> None:
    table = [{"op": r["op"], "provider": r["provider"], "mode": r["mode"], "shape": r["shape"],
              "status": str(r["status"])[:70], "ms": _fmt(r["median_ms"]),
              "GB/s": _fmt(r["gbps"]), "TFLOP/s": _fmt(r["tflops"]),
              "%copy": _fmt(100 * float(r["frac_copy_bw"]), 2) if r["frac_copy_bw"] else "",
              "%matmul": _fmt(100 * float(r["frac_matmul"]), 2) if r["frac_matmul"] else "",
              "peak MiB": _fmt(r["peak_mib"], 5), "check": _fmt(r["check_rel_err"], 2)}
             for r in rows]
    notes = [n for name in ops for n in specs[name].notes]
    notes += [f"{reason} -> {', '.join(sorted(who))}" for reason, who in sorted(skipped.items())]
    notes.append(f"CSV: {out}")
    common.print_table("csrc_triton kernels", table, list(table[0]) if table else ["op"], ctx, notes)


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
