"""Longest sequence at batch 1 that the memory planner PREDICTS fits, per strategy.

    python -m bench.max_context [--memory-gib 80] [--lora-r 32] [--margin-gib ...]

A prediction, not a measurement: anita_core.memory.planner replays one
train_step's allocations (see its docstring) for LLaMA-3-8B in NF4, bf16
activations, LoRA r on all seven projections, AdamW, the projections on the
dequantize path (M > 192, as at any long sequence). The budget is the card's
memory minus the margin the CLI leaves by default (max(1 GiB, 5%)), for the CUDA
context and the allocator. tests/test_memory_plan.py checks the replay against a
live-tensor tracker on the tiny model (within 10%); on a GPU the measured
torch.cuda.max_memory_allocated is what a run prints at its end.

Indexing is no bound here: the kernels switch to 64-bit offsets when an activation
passes 2^31 - 1 elements (csrc_triton.checks.wide_index). What the kernels still
count in 32 bits is token rows, 2^31 - 1 per micro-batch (attention.MAX_TOKENS,
refused by the CLI before training), far past any memory.
"""
from __future__ import annotations

import argparse
from typing import Callable, Optional

import torch

from anita_core.model.config import ModelConfig
from csrc_triton.attention import MAX_TOKENS
from anita_core.memory.planner import (GiB, PROJECTIONS, STRATEGIES, StepShape, activation_peak,
                                       gib, plan_memory, static_bytes)

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,   # bench.shapes
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072)


def step_shape(seq: int, rank: int) -> StepShape:
    return StepShape(1, seq, torch.bfloat16, rank, PROJECTIONS, 0.0, torch.bfloat16, True,
                     torch.bfloat16)


def longest(config: ModelConfig, rank: int, budget: int, strategy: str, step: int,
            host_budget: Optional[int] = None, cap: Optional[int] = None,
            shape_of: Optional[Callable[[int], StepShape]] = None) -> int:
    """The longest multiple of ``step`` whose predicted peak fits (0 if none); "auto" and
    "offload" plans also keep their offloaded inputs within ``host_budget`` (None: any).
    ``cap``: never longer than this (checked first: one plan when the cap fits).
    ``shape_of``: seq -> StepShape (default: step_shape, LLaMA-3-8B on a GPU in bf16;
    a built model's shape_for_model for anything else)."""
    L = config.num_hidden_layers
    shape_of = shape_of or (lambda seq: step_shape(seq, rank))

    def fits(seq: int) -> bool:
        shape = shape_of(seq)
        if strategy in ("auto", "offload"):
            try:
                plan_memory(config, shape, budget, strategy, host_budget_bytes=host_budget)
                return True
            except ValueError:
                return False
        return static_bytes(config, shape) + activation_peak(config, shape, [strategy] * L) <= budget

    if cap is not None and fits(cap):
        return cap
    lo, hi = 0, step
    while (cap is None or hi < cap) and fits(hi):
        lo, hi = hi, 2 * hi
    if cap is not None:
        hi = min(hi, cap)
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def device_budget(total: int, margin: Optional[int] = None) -> int:
    """The budget the CLI would give a card of ``total`` bytes: minus max(1 GiB, 5%)."""
    return total - (margin if margin is not None else max(GiB, total // 20))


def planned_longest(model, budget: int, host_budget: Optional[int], step: int,
                    cap: Optional[int] = None) -> int:
    """The longest batch-1 seq the planner predicts a built QLoRALlama trains within
    ``budget`` and ``host_budget`` (at most ``cap``)."""
    from anita_core.memory.planner import shape_for_model
    return longest(model.config, 0, budget, "auto", step, host_budget, cap,
                   shape_of=lambda seq: shape_for_model(model, 1, seq))


def main(argv=None) -> int:
    from anita_core.memory.budget import HOST_BUDGET_ENV, default_host_budget
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--memory-gib", type=float, default=80.0 * 1e9 / GiB,
                        help="device memory in GiB (default: an 80 GB card, 80e9 bytes)")
    parser.add_argument("--margin-gib", type=float, default=None,
                        help="left free (default: max(1 GiB, 5%% of the memory), as the CLI)")
    parser.add_argument("--host-memory-gib", type=float, default=None,
                        help="pinned host memory offloaded layer inputs may take (default: "
                             f"${HOST_BUDGET_ENV}, else this machine's available memory minus "
                             "max(4 GiB, 10%%), as the CLI on a GPU)")
    parser.add_argument("--unlimited-host", action="store_true",
                        help="plan as if host memory had no limit (the planner before it counted it)")
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument("--step", type=int, default=1024, help="sequence granularity")
    args = parser.parse_args(argv)
    config = ModelConfig(**LLAMA3_8B)
    total = int(args.memory_gib * GiB)
    budget = device_budget(total, int(args.margin_gib * GiB) if args.margin_gib is not None else None)
    host = (None if args.unlimited_host else int(args.host_memory_gib * GiB)
            if args.host_memory_gib is not None else default_host_budget())
    print(f"PREDICTED (memory planner, not measured): LLaMA-3-8B NF4, bf16, LoRA r {args.lora_r} on "
          f"all 7 projections, batch 1; budget {gib(budget)} = {gib(total)} - margin "
          f"{gib(total - budget)}; pinned host budget "
          f"{'unlimited' if host is None else gib(host)}")
    print(f"static (weights, LoRA + grads + AdamW): {gib(static_bytes(config, step_shape(1, args.lora_r)))}")
    print("| strategy | longest seq (predicted) | predicted peak there | pinned host memory |")
    print("|---|---|---|---|")
    for strategy in ("auto",) + STRATEGIES:
        seq = longest(config, args.lora_r, budget, strategy, args.step, host)
        shape = step_shape(seq, args.lora_r)
        host_bytes = 0
        if strategy in ("auto", "offload"):
            plan = plan_memory(config, shape, budget, strategy, host_budget_bytes=host)
            counts = ", ".join(f"{plan.strategies.count(s)} {s}" for s in STRATEGIES
                               if s in plan.strategies)
            label = f"planner ({counts})" if strategy == "auto" else f"offload ({counts})"
            peak, host_bytes = plan.predicted_bytes, plan.host_bytes
        else:
            label = f"every layer {strategy}"
            peak = static_bytes(config, shape) + activation_peak(config, shape, [strategy] * 32)
        print(f"| {label} | {seq:,} | {gib(peak)} | {gib(host_bytes) if host_bytes else '0'} |")
    print(f"kernel indexing: 64-bit offsets where needed; at most {MAX_TOKENS:,} tokens per "
          "micro-batch (token rows counted in 32 bits)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
