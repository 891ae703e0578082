"""The run's memory budgets and its plan: the device memory a run may use, the pinned
host memory offloaded layer inputs take, the per-layer policy (keep / recompute /
offload) the planner chooses for its largest micro-batch, and where the measured peak
that is compared with the plan starts. Takes a MemoryRequest (what the memory flags
asked for; train.memory_budget builds it from the command line), never the CLI's
namespace."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from anita_core.memory.offload import host_offload
from anita_core.memory.planner import STRATEGIES, MemoryBudgetError

HOST_BUDGET_ENV = "ANITA_HOST_MEMORY_BUDGET"     # GiB, as --host-memory-budget
GiB = 2**30


@dataclass(frozen=True)
class MemoryRequest:
    """What a run asks of the memory planner (the memory flags' values)."""
    strategy: str = "auto"                      # --recompute: auto or one of STRATEGIES
    offload_activations: bool = False           # --offload-activations (= strategy offload)
    memory_budget_gib: Optional[float] = None   # --memory-budget (None: the default)
    host_memory_budget_gib: Optional[float] = None  # --host-memory-budget (None: the default)

    def __post_init__(self):
        if self.strategy != "auto" and self.strategy not in STRATEGIES:
            raise MemoryBudgetError(f"--recompute {self.strategy!r} is not one of auto, "
                                    f"{', '.join(STRATEGIES)}", flag="--recompute")

    def layer_strategy(self) -> str:
        """The strategy the planner is asked for: --offload-activations means offload."""
        if self.strategy == "auto" and self.offload_activations:
            return "offload"
        return self.strategy


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


def available_host_bytes() -> Optional[int]:
    """The host memory the kernel says can be allocated without swapping (MemAvailable),
    or the free physical pages where /proc/meminfo is missing; None if neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def host_budget_from_env() -> Optional[int]:
    """ANITA_HOST_MEMORY_BUDGET in bytes (None when unset); ValueError naming it when bad."""
    text = os.environ.get(HOST_BUDGET_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{HOST_BUDGET_ENV}={text!r}: expected a positive number of GiB")
    return int(value * GiB)


def default_host_budget(device: Optional[torch.device] = None) -> Optional[int]:
    """Pinned host memory the planner may plan for: ANITA_HOST_MEMORY_BUDGET if set, else
    (on a GPU, or with no device named) the available host memory minus max(4 GiB, 10%):
    pinned pages cannot be swapped, and the process, the data and the page cache need
    the rest. None (unlimited) on a CPU device or where the host memory is unknown."""
    from_env = host_budget_from_env()
    if from_env is not None:
        return from_env
    if device is not None and device.type != "cuda":
        return None
    available = available_host_bytes()
    if available is None:
        return None
    return max(0, available - max(4 * GiB, available // 10))


def host_budget(request: MemoryRequest, device: torch.device) -> Optional[int]:
    """--host-memory-budget if given, else default_host_budget(device)."""
    flag = request.host_memory_budget_gib
    return int(flag * GiB) if flag is not None else default_host_budget(device)


def apply_memory_plan(request: MemoryRequest, model, batches, log, largest=None):
    """Choose each layer's strategy for the largest micro-batch and log the prediction:
    ``largest`` (rows, seq) when the caller knows a bound over every epoch, else the
    largest of ``batches``. The model's RoPE tables are grown to that length; a plan
    that offloads hands the model its HostOffload (offload.host_offload), whose host
    pool is sized to the plan's host bytes, as the plan counts them: every
    micro-batch's offloaded inputs share one allocation of exactly the planned size.
    Raises MemoryBudgetError (naming the smallest budget, or the host memory an
    offloading plan needs) when nothing fits."""
    from anita_core.memory.planner import plan_memory, shape_for_model
    strategy = request.layer_strategy()
    rows, seq = largest or max((_model_rows(b) for b in batches), key=lambda rs: rs[0] * rs[1])
    budget = (int(request.memory_budget_gib * GiB) if request.memory_budget_gib is not None
              else default_memory_budget(model.device))
    plan = plan_memory(model.config, shape_for_model(model, rows, seq), budget, strategy,
                       host_budget_bytes=host_budget(request, model.device))
    model.set_layer_strategies(plan.policies())
    model.rope_tables(seq)      # the size the plan's static bytes count (no doubling later)
    if "offload" in plan.strategies:
        # the model's host pool: one allocation of these bytes, by the first offloading step
        host_offload(model).pool.reserve(plan.host_bytes)
    log(f"{plan.describe()} for micro-batches up to {rows} x {seq} tokens (a prediction)")
    return plan


def reset_peak_memory(device: torch.device) -> None:
    """Start the measured peak where the plan's prediction starts: after loading (and a
    DPO reference precompute), right before the first training step, so that
    torch.cuda.max_memory_allocated at the end compares with the predicted step peak
    (static bytes + one step's activations), not with a load-time high-water mark."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_memory_gib(device: torch.device) -> dict:
    """The memory figures a step's record carries on a GPU (none on a CPU): what tensors
    hold now, the peak since the first step (reset_peak_memory), and what the caching
    allocator has reserved, in GiB. Host-side counters of the allocator: reading them
    waits for nothing on the device."""
    if device.type != "cuda":
        return {}
    return {"memory_allocated_gib": round(torch.cuda.memory_allocated(device) / GiB, 4),
            "memory_peak_gib": round(torch.cuda.max_memory_allocated(device) / GiB, 4),
            "memory_reserved_gib": round(torch.cuda.memory_reserved(device) / GiB, 4)}
