"""The NF4 matmul on its own, for M (tokens) from 1 to 16K:

    ours                    csrc_triton.nf4_matmul as shipped: dispatch by M between the two
                            paths below (threshold: ANITA_NF4_FUSED_MAX_M, default from the
                            static cost model in csrc_triton/nf4_dense.py)
    ours_fused              the fused kernel at every M: W dequantized tile by tile inside
                            the matmul
    ours_dequant+matmul     the large-M path at every M: nf4_dequantize (ours) to the compute
                            dtype, then torch.mm (cuBLAS)
    bnb_dequant+matmul      bitsandbytes dequantize_4bit, then torch.matmul (what
                            bitsandbytes' matmul_4bit does for M > 1)
    bnb_matmul_4bit         bitsandbytes.matmul_4bit as called by Linear4bit (its gemv
                            kernel at M = 1); forward only
    unsloth_dequant+matmul  Unsloth's fast_dequantize, then torch.matmul
    dense_matmul            torch.matmul with an unquantized weight of the same shape:
                            the bound a 4-bit weight is measured against

    python -m bench.nf4_matmul                      # every projection shape, M = 1 .. 16384
    python -m bench.nf4_matmul --m 1,16,4096 --projections 'gate_proj,up_proj'
    python -m bench.nf4_matmul --smoke

Modes: forward (y = x W^T, x [M, K]) and backward_input (dx = dy W, dy [M, N];
the weight is frozen, so that is the whole backward). Every provider is checked
against dense_matmul on the dequantized weight (smallest M) before it is timed.
The report ends with the crossover: per shape and mode, the largest M at which
ours_fused is still faster than ours_dequant+matmul (what ANITA_NF4_FUSED_MAX_M
should be on this GPU).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Dict

if __package__ in (None, ""):  # run as a file: make `import bench` work like python -m
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import common, eager, peers, plot  # noqa: E402
from bench.cases import (SweepSettings, Unavailable, check_tolerance,  # noqa: E402
                         relative_error)
from bench.crossover import crossover_rows  # noqa: E402,F401  (re-exported)
from bench.ops_nf4 import storage_bytes  # noqa: E402
from bench.shapes import LLAMA3_8B, SMOKE, SMOKE_PROJECTIONS, parse_int_list  # noqa: E402
from csrc_triton import nf4_matmul_op, nf4_quantize  # noqa: E402
from csrc_triton.nf4_matmul import nf4_matmul_backward_input, nf4_matmul_forward  # noqa: E402

MODES = ("forward", "backward_input")
GPU_M = tuple(2 ** i for i in range(15))      # 1 .. 16384
SMOKE_M = (1, 5, 13)
PROVIDERS = ("ours", "ours_fused", "ours_dequant+matmul", "bnb_dequant+matmul",
             "bnb_matmul_4bit", "unsloth_dequant+matmul", "dense_matmul")
REFERENCE = "dense_matmul"

COLUMNS = ["op", "provider", "mode", "group", "shape", "m", "status", "median_ms",
           "first_call_ms", "speedup_vs_dense", "bytes", "flops", "gbps", "tflops",
           "frac_copy_bw", "frac_matmul", "peak_mib", "extra_mib", "check_rel_err",
           "ceiling_copy_gbps", "ceiling_matmul_tflops"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.nf4_matmul", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--m", type=parse_int_list, default=None,
                        help="comma-separated M (token) values (default: powers of two 1..16384; "
                             f"smoke: {','.join(map(str, SMOKE_M))})")
    parser.add_argument("--projections", default=None,
                        help="';'-separated projection groups (default: all four distinct "
                             "LLaMA-3-8B shapes; smoke: " + ";".join(SMOKE_PROJECTIONS) + ")")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help=f"comma-separated providers (default: {','.join(PROVIDERS)})")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated modes (default: {','.join(MODES)})")
    parser.add_argument("--no-double-quant", action="store_true",
                        help="single-level NF4 (default: double-quantized absmax)")
    parser.add_argument("--no-plot", action="store_true",
                        help="do not write the PNG plot (default: written when matplotlib is "
                             "installed)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _builders(ctx) -> Dict[str, Callable]:
    """provider -> (mode, x_or_dy, q, dense) -> zero-argument callable."""
    def dequant_then(dequantize):
        def build(mode, a, q, dense):
            if mode == "forward":
                return lambda: a @ dequantize(q).t()
            return lambda: a @ dequantize(q)
        return build

    def ours(mode, a, q, dense):
        if mode == "forward":
            return lambda: nf4_matmul_op(a, q)
        return lambda: nf4_matmul_backward_input(a, q)

    def ours_path(path):
        def build(mode, a, q, dense):
            if mode == "forward":
                return lambda: nf4_matmul_forward(a, q, path=path)
            return lambda: nf4_matmul_backward_input(a, q, path=path)
        return build

    def bnb_dequant():
        functional = peers.bitsandbytes().functional
        return lambda q: functional.dequantize_4bit(*_bnb_parts(q, ctx))

    def bnb_matmul(mode, a, q, dense):
        if mode != "forward":
            raise Unavailable("matmul_4bit's backward is dequantize_4bit + matmul "
                              "(see bnb_dequant+matmul)")
        bnb = peers.bitsandbytes()
        packed, state = _bnb_parts(q, ctx)
        return lambda: bnb.matmul_4bit(a, packed.t(), quant_state=state)

    def unsloth_dequant():
        kernels = peers.unsloth_kernels(ctx)
        return lambda q: kernels.fast_dequantize(*_bnb_parts(q, ctx))

    def dense_matmul(mode, a, q, dense):
        if mode == "forward":
            return lambda: a @ dense.t()
        return lambda: a @ dense

    return {
        "ours": ours,
        "ours_fused": ours_path("fused"),
        "ours_dequant+matmul": ours_path("dequant"),
        "bnb_dequant+matmul": lambda *a: dequant_then(bnb_dequant())(*a),
        "bnb_matmul_4bit": bnb_matmul,
        "unsloth_dequant+matmul": lambda *a: dequant_then(unsloth_dequant())(*a),
        "dense_matmul": dense_matmul,
    }


def _bnb_parts(q, ctx):
    packed, state = q.to_bnb()
    state.dtype = ctx.dtype
    return packed, state


def _work(provider: str, mode: str, m: int, n: int, k: int, e: int, bs: int, dq: bool):
    """(bytes, flops). flops = 2 M N K. bytes = the op's minimum traffic:
    activation in + weight + activation out, the weight as NF4 storage S(N, K)
    for every NF4 provider (dequantize-then-matmul providers move more than
    that; the difference is what they cost) and as N K e for dense_matmul."""
    weight = n * k * e if provider == "dense_matmul" else storage_bytes(n, k, bs, dq)
    a_in, a_out = (k, n) if mode == "forward" else (n, k)
    return m * a_in * e + weight + m * a_out * e, 2 * m * n * k


def run(args: argparse.Namespace) -> int:
    ctx = common.make_context("nf4_matmul", args)
    dims = SMOKE if ctx.smoke else LLAMA3_8B
    ms = sorted(set(args.m or (SMOKE_M if ctx.smoke else GPU_M)))
    groups = dims.projection_groups()
    chosen = args.projections.split(";") if args.projections else (
        list(SMOKE_PROJECTIONS) if ctx.smoke else list(groups))
    unknown = [g for g in chosen if g not in groups]
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [p for p in providers if p not in PROVIDERS] + [m for m in modes if m not in MODES]
    if unknown or bad:
        raise SystemExit(f"unknown projection group / provider / mode: {unknown + bad}")
    dq = not args.no_double_quant
    e = torch.finfo(ctx.dtype).bits // 8
    settings = SweepSettings(dims, ms, ctx, seed=args.seed)
    builders = _builders(ctx)
    ceilings = common.measure_ceilings(ctx)
    print(f"[{ctx.label}] device: {ctx.meta['device']}; ceilings: {ceilings.copy_gbps:.1f} GB/s, "
          f"{ceilings.matmul_tflops:.2f} TFLOP/s ({ceilings.matmul_desc})")

    out = args.out or common.default_out_path(ctx)
    sink = common.CsvSink(out, COLUMNS, ctx)
    total = len(chosen) * len(modes) * len(ms) * len(providers)
    bar = common.progress(None, total=total, desc=f"nf4_matmul [{ctx.label}]", ctx=ctx)
    for group in chosen:
        n, k = groups[group]
        gen = settings.generator(f"nf4_matmul/{group}")
        w = settings.randn((n, k), gen, scale=k ** -0.5)
        q = nf4_quantize(w, dims.blocksize, double_quant=dq)
        dense = eager.nf4_dequantize(q, ctx.dtype)   # the same weight, unquantized storage
        del w
        for mode in modes:
            checks: Dict[str, tuple] = {}
            dense_ms: Dict[int, float] = {}
            for m in ms:
                a = settings.randn((m, k if mode == "forward" else n), gen)
                # dense_matmul first, so every other provider's speed-up has its baseline
                for provider in sorted(providers, key=lambda p: p != REFERENCE):
                    if provider not in checks:
                        checks[provider] = _check(builders, provider, mode, a, q, dense, ctx)
                    status, error = checks[provider]
                    bytes_, flops = _work(provider, mode, m, n, k, e, dims.blocksize, dq)
                    row = {"op": "nf4_matmul", "provider": provider, "mode": mode, "group": group,
                           "shape": f"N={n} K={k}", "m": m, "bytes": bytes_, "flops": flops,
                           "check_rel_err": error, "ceiling_copy_gbps": ceilings.copy_gbps,
                           "ceiling_matmul_tflops": ceilings.matmul_tflops}
                    row.update({"status": status} if status else
                               _measure(builders[provider], mode, a, q, dense, ctx))
                    if row.get("median_ms") is not None:
                        row["gbps"] = common.rate(bytes_, row["median_ms"], 1e9)
                        row["tflops"] = common.rate(flops, row["median_ms"], 1e12)
                        row["frac_copy_bw"] = row["gbps"] / ceilings.copy_gbps
                        row["frac_matmul"] = row["tflops"] / ceilings.matmul_tflops
                        if provider == REFERENCE:
                            dense_ms[m] = row["median_ms"]
                        if m in dense_ms:
                            row["speedup_vs_dense"] = dense_ms[m] / row["median_ms"]
                    sink.write(row)
                    bar.update(1)
                del a
                common.release_memory(ctx.device)
    bar.close()
    sink.close()
    _report(sink.rows, ctx, out)
    if not args.no_plot:
        plot.plot_or_note(out)
    failures = [r for r in sink.rows if r["provider"] in ("ours", "ours_fused",
                                                          "ours_dequant+matmul", REFERENCE)
                and str(r["status"]).startswith(("error", "check failed"))]
    return 1 if failures else 0


def _check(builders, provider, mode, a, q, dense, ctx):
    """(status or None, relative error vs dense_matmul) on the first M."""
    try:
        expected = builders[REFERENCE](mode, a, q, dense)()
        actual = builders[provider](mode, a, q, dense)()
        error = relative_error([actual.float()], [expected.float()])
    except Unavailable as why:
        return f"skipped: {why}", None
    except Exception as err:  # noqa: BLE001 - a peer's failure is a result
        return f"check failed: {common.describe_error(err)}", None
    tolerance = check_tolerance(ctx.dtype)
    if not error <= tolerance:
        return f"error: output differs from dense_matmul ({error:.3g} > {tolerance:g})", error
    return None, error


def _measure(build, mode, a, q, dense, ctx) -> dict:
    try:
        fn = build(mode, a, q, dense)
        start = time.perf_counter()
        fn()
        common.synchronize(ctx.device)
        first = (time.perf_counter() - start) * 1e3
        peak, extra = common.peak_memory_mib(fn, ctx.device)
        return {"status": "ok", "first_call_ms": first, "peak_mib": peak, "extra_mib": extra,
                "median_ms": common.median_ms(fn, ctx)}
    except Unavailable as why:
        return {"status": f"skipped: {why}"}
    except Exception as err:  # noqa: BLE001
        failure = "oom" if common.is_out_of_memory(err) else common.describe_error(err)
    common.release_memory(ctx.device, collect=True)
    return {"status": failure}


def _report(rows, ctx, out) -> None:
    def fmt(v, d=3):
        return "" if v in ("", None) else f"{float(v):.{d}g}"
    table = [{"mode": r["mode"], "shape": r["shape"], "M": r["m"], "provider": r["provider"],
              "status": str(r["status"])[:60], "ms": fmt(r["median_ms"]),
              "TFLOP/s": fmt(r["tflops"]), "GB/s": fmt(r["gbps"]),
              "x dense": fmt(r["speedup_vs_dense"]), "peak MiB": fmt(r["peak_mib"], 5)}
             for r in rows]
    notes = ["x dense = dense_matmul time / this provider's time at the same M (> 1: faster)",
             f"CSV: {out}"]
    common.print_table("nf4_matmul vs dequantize+matmul vs dense matmul", table,
                       list(table[0]) if table else ["mode"], ctx, notes)
    crossover = crossover_rows(rows)
    if crossover:
        common.print_table("crossover: largest M at which the fused kernel still wins", crossover,
                           list(crossover[0]), ctx,
                           ["suggested ANITA_NF4_FUSED_MAX_M = the smallest 'fused wins up to' "
                            "over the shapes and modes used in training"])


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
