"""The run's memory plan: the budget a run may use and the per-layer strategy
(keep / recompute / offload) the planner chooses for its largest micro-batch."""
from __future__ import annotations

from typing import Optional

import torch


def _model_rows(batch) -> tuple:
    """(rows, seq) of the model batch one micro-batch becomes (DPO: chosen + rejected)."""
    if "input_ids" in batch:
        return tuple(batch["input_ids"].shape)
    rows, seq = batch["chosen"]["input_ids"].shape
    return 2 * rows, seq


def default_memory_budget(device: torch.device) -> Optional[int]:
    """Free device memory plus what this process already holds (the budget covers
    the weights too), minus a margin for the allocator and the CUDA context; None on
    a CPU (unlimited)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    margin = max(2**30, total // 20)
    return max(0, free + torch.cuda.memory_allocated(device) - margin)


def apply_memory_plan(args, model, batches, log, largest=None):
    """Choose each layer's strategy for the largest micro-batch and log the prediction:
    ``largest`` (rows, seq) when the caller knows a bound over every epoch, else the
    largest of ``batches``. Raises MemoryBudgetError (naming the smallest budget)
    when nothing fits."""
    from anita_core.model.memory_plan import plan_memory, shape_for_model
    strategy = args.recompute
    if strategy == "auto" and args.offload_activations:
        strategy = "offload"
    rows, seq = largest or max((_model_rows(b) for b in batches), key=lambda rs: rs[0] * rs[1])
    budget = (int(args.memory_budget * 2**30) if args.memory_budget is not None
              else default_memory_budget(model.device))
    plan = plan_memory(model.config, shape_for_model(model, rows, seq), budget, strategy)
    model.set_layer_strategies(plan.strategies)
    log(f"{plan.describe()} for micro-batches up to {rows} x {seq} tokens (a prediction)")
    return plan
