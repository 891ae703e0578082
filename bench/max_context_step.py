"""One batch-1 training step at the longest sequence the memory planner predicts fits,
with the GPU's memory capped (80 GB by default), and its measured peak.

    python -m bench.max_context_step                      # LLaMA-3-8B random NF4, 80 GB cap
    python -m bench.max_context_step --time-budget-s 40   # as bench/gpu_session.sh runs it
    python -m bench.max_context_step --smoke              # CPU rehearsal, tiny model

1. The cap: torch.cuda.set_per_process_memory_fraction(cap / card memory), so the
   allocator refuses what an 80 GB card could not hold, whatever the card has.
2. The prediction: bench.max_context's search with the CLI's budget for the cap
   (minus max(1 GiB, 5%)) and this machine's pinned-host budget (available host
   memory minus max(4 GiB, 10%), or $ANITA_HOST_MEMORY_BUDGET, or --host-memory-gib),
   at most the kernels' token-row bound (2^31 - 1 rows per micro-batch).
3. The try: one step (forward, backward, AdamW) with the plan's per-layer strategies,
   torch.cuda.max_memory_allocated reset right before it.

A step's attention grows with the square of the sequence: at the predicted maximum of
an 80 GB card (about half a million tokens) one step takes minutes. With
--time-budget-s the step is tried at the longest length whose FLOP count (bench/flops.py,
plus the recomputed forward: x 4/3) at half the matmul rate measured in this run fits
the budget, when that is shorter than the prediction. That estimate only chooses what
to try; the row says so (``limited_by``), and the predicted maximum is reported beside
the tried length, never in its place.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `import bench` work like python -m
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from anita_core.hf import load_model  # noqa: E402
from anita_core.lora import LoRAAdapters, LoRAConfig  # noqa: E402
from anita_core.model import QLoRALlama  # noqa: E402
from anita_core.memory.offload import HostOffload  # noqa: E402
from anita_core.memory.planner import GiB, plan_memory, shape_for_model  # noqa: E402
from anita_core.model.weights import PROJECTIONS  # noqa: E402
from anita_core.memory.budget import default_host_budget  # noqa: E402
from bench import common, flops, max_context  # noqa: E402
from bench.shapes import LLAMA3_8B, SMOKE  # noqa: E402
from bench.train_models import random_base_weights  # noqa: E402

MIB = common.MIB
COLUMNS = ["measurement", "model", "layers", "status", "tried_seq", "predicted_max_seq",
           "limited_by", "cap_bytes", "budget_bytes", "host_budget_bytes", "strategies",
           "host_pinned_bytes", "predicted_peak_mib", "peak_mib", "peak_vs_predicted",
           "step_s", "lora_r", "ceiling_matmul_tflops"]
RECOMPUTE_FACTOR = 4 / 3       # the recomputed forward of every recomputed/offloaded layer
ESTIMATE_EFFICIENCY = 0.5      # of the measured matmul rate, for choosing a length only


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.max_context_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, kernel_timing=False)
    parser.add_argument("--cap-gb", type=float, default=80.0,
                        help="GPU memory cap in GB of 1e9 bytes (default: 80, an 80 GB card)")
    parser.add_argument("--host-memory-gib", type=float, default=None,
                        help="pinned host memory the plan may use (default: this machine's "
                             "available memory minus max(4 GiB, 10%%), or "
                             "$ANITA_HOST_MEMORY_BUDGET)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="try a shorter length when the estimated step time at the "
                             "predicted maximum exceeds this (default: none, always the "
                             "prediction)")
    parser.add_argument("--seq", type=int, default=None,
                        help="try this length instead of the prediction (default: the prediction)")
    parser.add_argument("--max-seq", type=int, default=None,
                        help="never try longer than this (default: the kernels' token-row bound, "
                             "2^31 - 1; smoke: 64)")
    parser.add_argument("--granularity", type=int, default=None,
                        help="lengths are multiples of this (default: 4096; smoke: 8)")
    common.add_model_arguments(parser, smoke_layers=2)
    parser.add_argument("--lora-r", type=int, default=32, help="LoRA rank (default: 32)")
    parser.add_argument("--smoke-budget-mib", type=float, default=2.2,
                        help="smoke run: the device budget the prediction uses on a CPU, which "
                             "has no device memory to cap; small enough that the plan recomputes "
                             "(default: 2.2)")
    return parser


def estimated_step_s(config, seq: int, rank: int, matmul_tflops: float) -> float:
    """A rough step time used only to choose a length (see the module docstring)."""
    step = flops.training_step_flops(config, 1, seq, rank, PROJECTIONS) * RECOMPUTE_FACTOR
    return step / (ESTIMATE_EFFICIENCY * matmul_tflops * 1e12)


def choose_length(config, args, predicted: int, ceilings, granularity: int):
    """(length to try, what limited it)."""
    if args.seq is not None:
        return args.seq, "--seq"
    seq, why = predicted, "memory (the planner's predicted maximum)"
    if seq >= args.max_seq:
        seq, why = args.max_seq, (f"--max-seq {args.max_seq} (the kernels' token-row bound "
                                  "unless given; the planner predicts at least this fits)")
    if args.time_budget_s is not None and seq and \
            estimated_step_s(config, seq, args.lora_r, ceilings.matmul_tflops) > args.time_budget_s:
        seq = max(granularity, seq // granularity * granularity)
        while seq > granularity and estimated_step_s(config, seq, args.lora_r,
                                                     ceilings.matmul_tflops) > args.time_budget_s:
            seq -= granularity
        why = (f"time budget {args.time_budget_s:g} s (estimate: FLOPs x {RECOMPUTE_FACTOR:.3g} at "
               f"{ESTIMATE_EFFICIENCY:g} x {ceilings.matmul_tflops:.0f} TFLOP/s measured; not a "
               "measurement)")
    return seq, why


def build_model(config, args, ctx, dims):
    stash = HostOffload(ctx.device)        # where the plan's offloaded layer inputs wait
    if args.checkpoint is not None:
        model = load_model(args.checkpoint, compute_dtype=ctx.dtype, device=ctx.device,
                           progress=False, activation_stash=stash)
    else:
        base = random_base_weights(config, ctx.dtype, ctx.device, dims.blocksize, True, args.seed)
        model = QLoRALlama(config, base, None, activation_stash=stash)
    model.adapters = LoRAAdapters.init(LoRAConfig(r=args.lora_r, alpha=16.0, dropout=0.0,
                                                  target_modules=PROJECTIONS),
                                       model.config, device=ctx.device)
    model.train()
    return model


def one_step(model, seq: int, ctx, seed: int) -> float:
    optimizer = torch.optim.AdamW(model.adapters.parameters(), lr=1e-4,
                                  fused=ctx.device.type == "cuda")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=generator).to(ctx.device)
    targets = torch.roll(ids, -1, dims=1)
    targets[0, -1] = -100
    common.synchronize(ctx.device)
    if ctx.on_gpu:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    start = time.perf_counter()
    model.train_step(ids, targets, grad_scale=1.0 / max(1, seq - 1))
    optimizer.step()
    common.synchronize(ctx.device)
    return time.perf_counter() - start


def run(args) -> int:
    ctx = common.make_context("max_context_step", args)
    dims = SMOKE if ctx.smoke else LLAMA3_8B
    if args.checkpoint is not None:
        import json
        from anita_core.model.config import ModelConfig
        raw = json.loads((args.checkpoint / "config.json").read_text())
        config = ModelConfig.from_dict(raw, source=str(args.checkpoint / "config.json"))
        layers = config.num_hidden_layers
    else:
        layers = args.layers or (2 if ctx.smoke else dims.layers)
        config = dims.model_config(layers=layers)
    granularity = args.granularity or (8 if ctx.smoke else 4096)
    if args.max_seq is None:
        args.max_seq = 64 if ctx.smoke else max_context.MAX_TOKENS
    ceilings = common.measure_ceilings(ctx)
    if ctx.on_gpu:
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        cap = min(int(args.cap_gb * 1e9), total)
        torch.cuda.set_per_process_memory_fraction(cap / total, ctx.device)
        budget = max_context.device_budget(cap)
    else:
        cap, budget = None, int(args.smoke_budget_mib * MIB)
    host = (int(args.host_memory_gib * GiB) if args.host_memory_gib is not None
            else default_host_budget(torch.device("cuda") if ctx.on_gpu else None))
    out = args.out or common.default_out_path(ctx)
    sink = common.CsvSink(out, COLUMNS, ctx)
    row = {"measurement": "longest_seq_batch1_capped", "layers": layers, "lora_r": args.lora_r,
           "model": str(args.checkpoint) if args.checkpoint else f"{dims.name} random NF4",
           "cap_bytes": cap, "budget_bytes": budget, "host_budget_bytes": host,
           "ceiling_matmul_tflops": ceilings.matmul_tflops}
    try:
        model = build_model(config, args, ctx, dims)
        predicted = max_context.planned_longest(model, budget, host, granularity, cap=args.max_seq)
        seq, why = choose_length(config, args, predicted, ceilings, granularity)
        row.update(predicted_max_seq=predicted, tried_seq=seq, limited_by=why)
        print(f"[{ctx.label}] planner's predicted maximum {predicted:,} tokens (budget "
              f"{budget / GiB:.3g} GiB, host "
              f"{'unlimited' if host is None else f'{host / GiB:.1f} GiB'}); trying {seq:,} ({why})",
              flush=True)
        plan = plan_memory(model.config, shape_for_model(model, 1, seq), budget,
                           host_budget_bytes=host)
        model.set_layer_strategies(plan.strategies)
        row.update(strategies=", ".join(f"{plan.strategies.count(s)} {s}" for s in
                                        ("keep", "recompute", "offload") if s in plan.strategies),
                   host_pinned_bytes=plan.host_bytes, predicted_peak_mib=plan.predicted_bytes / MIB)
        row["step_s"] = one_step(model, seq, ctx, args.seed)
        row["status"] = "ok"
        if ctx.on_gpu:
            row["peak_mib"] = torch.cuda.max_memory_allocated(ctx.device) / MIB
            row["peak_vs_predicted"] = row["peak_mib"] / row["predicted_peak_mib"]
    except Exception as err:  # noqa: BLE001 - an OOM or a refusal is the result
        row["status"] = "oom" if common.is_out_of_memory(err) else common.describe_error(err)
    sink.write(row)
    sink.close()
    common.print_table("longest batch-1 step under the memory cap", [
        {k: row.get(k, "") for k in ("status", "tried_seq", "predicted_max_seq", "strategies",
                                     "predicted_peak_mib", "peak_mib", "step_s")}],
        ["status", "tried_seq", "predicted_max_seq", "strategies", "predicted_peak_mib",
         "peak_mib", "step_s"], ctx,
        [f"limited by: {row.get('limited_by', 'not reached (the step failed first)')}",
         f"CSV: {out}"])
    return 0 if row["status"] in ("ok", "oom") else 1


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
