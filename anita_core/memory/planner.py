"""The memory planner: how many bytes a training step holds, per strategy and
layer, and which layers can keep their activations under a budget.

Pure arithmetic from the model config, the micro-batch shape, the LoRA settings
and the dtypes: nothing is allocated. Each layer runs one of three strategies:

  keep       the forward keeps every intermediate its backward needs
             (block.Saved of a KEEP policy, without the dense dequantized weights);
             the backward recomputes nothing.
  recompute  the forward keeps only the block input; the backward recomputes the
             block from it (activation checkpointing, 1.5x the block's FLOPs): the
             attention half up to x2, then each MLP chunk just before its backward.
  offload    like recompute, but the block input waits in pinned host memory;
             during the backward at most two offloaded inputs are on the device
             (the one in use and the next one, arriving on a side stream).

The prediction replays, tensor by tensor, what block.py and llama.py allocate and
free in one train_step (``replay.StepReplay``): every kernel output, the locals Python
keeps alive until they are deleted, the LoRA contexts (the rank-r product, the
dropout mask, a fused group's stacked A and B), the MLP chunk by chunk
(block_buffers.mlp_chunk_rows: a kept layer holds every chunk's g, u, m, a recomputed
one builds one chunk's at a time) and, on the dequantize path (M above the fused
threshold: T rows for the attention's projections, one chunk's for the MLP's),
the dense weights a recompute holds from their first use to their backward, the
LoRA backward's dA and dB, the fused loss's per-chunk rows (hidden rows, labels, fp32
dh_c, the [chunk] vectors), and the batch on the device (ids, targets, positions,
segment ids, the document bounds; counted whether or not the batch is packed).
``predicted`` = static bytes (NF4 weights, LoRA weights, their grads and AdamW
states, the RoPE tables) + the activation peak: tests/test_memory_plan.py checks, for
every strategy on the tiny model, that the activation peak is at least what a
live-tensor tracker measures and over it by no more than the batch tensors the
tracker cannot see. Not counted: a kernel's own scratch (registers, shared memory,
cuBLAS' workspace, made once per process), and the CUDA caching allocator's
rounding, which the replay bounds separately (``allocator_peak``: each block
rounded to 512 bytes, up to 1 MiB more for a block above 1 MiB) and the default
budget's margin covers (memory.budget.default_memory_budget).

The plan keeps as many layers as fit, the last layers first: the backward
reaches them first, so their activations are gone before any recompute's working
set is built (kept early layers would sit under every later layer's recompute).
The rest recompute; when even full recompute does not fit, the fewest first
layers whose inputs must leave the device are offloaded.

Offloading is bounded by the host too: each offloaded layer input stays in pinned
host memory, T x hidden x e bytes, through the step, in one pool of exactly the
offloaded layers' bytes (offload.HostPool: page-locked with cudaHostRegister, which
does not round it up to a power of two as torch's pinned allocator would), so
``MemoryPlan.host_bytes`` is what the run pins. With ``host_budget_bytes`` the
plan offloads no more layers than that holds: a forced "offload" offloads as many
as fit there and recomputes the rest; when the device needs more offloaded layers
than the host can hold, the plan is refused (MemoryBudgetError naming both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from anita_core.memory.replay import StepReplay, row_bytes
from anita_core.model.block import Activations, LayerPolicy
from anita_core.model.block_buffers import element_size
from anita_core.model.config import projection_shapes
from anita_core.model.weights import PROJECTIONS

STRATEGIES = tuple(a.value for a in Activations)     # "keep", "recompute", "offload"
GiB = 2**30
NF4_BLOCKSIZE = 64


def gib(n_bytes: int, round_up: bool = False) -> str:
    """Bytes as GiB with 4 significant digits (a value --memory-budget accepts back);
    ``round_up`` for a budget that must not come out below n_bytes."""
    value = n_bytes / GiB
    digits = max(2, 3 - int(math.floor(math.log10(value)))) if value > 0 else 2
    if round_up:
        value = math.ceil(value * 10**digits) / 10**digits
    return f"{value:.{digits}f} GiB"


class MemoryBudgetError(ValueError):
    """The budget is below what even full recompute with offload needs, or the host
    budget below what an offloading plan pins; ``flag`` names the command-line flag
    that sets the budget in question (the CLI reports the error against it)."""

    def __init__(self, message: str, flag: str = "--memory-budget"):
        super().__init__(message)
        self.flag = flag


@dataclass(frozen=True)
class StepShape:
    """What the prediction needs besides the model config."""
    batch: int
    seq: int
    dtype: torch.dtype = torch.bfloat16          # activations
    lora_rank: int = 0                           # 0: no adapters
    lora_targets: Tuple[str, ...] = PROJECTIONS
    lora_dropout: float = 0.0
    # the rank-r product's dtype: fp32 where the dot runs in fp32 (interpreter),
    # else the activation dtype (csrc_triton.nf4_dense.compute_dtype)
    lora_compute_dtype: Optional[torch.dtype] = None
    # the projections take the dequantize path (choose_path says "dequant"): a
    # recomputed layer holds its seven dense weights through its backward
    dense_weights: bool = False
    dense_dtype: Optional[torch.dtype] = None    # dtype of a dense W (default: dtype)
    # rows of one MLP chunk (default: block.mlp_chunk_rows), and whether the MLP's
    # projections take the dequantize path at that M (default: dense_weights)
    mlp_chunk_rows: Optional[int] = None
    mlp_dense_weights: Optional[bool] = None
    # the lm-head's fp32-output matmuls upcast their operands (csrc_triton.linear_loss_matmul
    # .upcasts: half dtypes on a CPU, or a torch without mm's out_dtype)
    loss_upcast: bool = False
    optimizer_state_bytes_per_param: int = 8     # AdamW: two fp32 moments

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass
class MemoryPlan:
    strategies: List[str]
    predicted_bytes: int                 # static + activation peak of the chosen plan
    static_bytes: int
    by_strategy: Dict[str, int] = field(default_factory=dict)   # every layer the same
    budget_bytes: Optional[int] = None
    host_bytes: int = 0                  # pinned host memory of the offloaded block inputs
    host_budget_bytes: Optional[int] = None

    def policies(self) -> List[LayerPolicy]:
        """The per-layer values the model takes (QLoRALlama.set_layer_strategies)."""
        return [LayerPolicy.of(s) for s in self.strategies]

    def describe(self) -> str:
        counts = {s: self.strategies.count(s) for s in STRATEGIES if s in self.strategies}
        layers = ", ".join(f"{n} {s}" for s, n in counts.items())
        alternatives = "; ".join(f"all {s} {gib(self.by_strategy[s])}" for s in STRATEGIES
                                 if s in self.by_strategy)
        budget = "unlimited" if self.budget_bytes is None else gib(self.budget_bytes)
        host = f", {gib(self.host_bytes)} pinned host memory" if self.host_bytes else ""
        if self.host_bytes and self.host_budget_bytes is not None:
            host += f" of a {gib(self.host_budget_bytes)} host budget"
        return (f"memory plan: layers {layers}; predicted peak {gib(self.predicted_bytes)}{host} "
                f"(budget {budget}; {alternatives})")


def _replay(config, shape: StepShape, strategies: Sequence[str]) -> StepReplay:
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"strategy {s!r} is not one of {', '.join(STRATEGIES)}")
    if len(strategies) != config.num_hidden_layers:
        raise ValueError(f"strategies: got {len(strategies)} for {config.num_hidden_layers} layers")
    replay = StepReplay(config, shape)
    replay.step(strategies)
    return replay


def activation_peak(config, shape: StepShape, strategies: Sequence[str]) -> int:
    """Peak bytes of the tensors one train_step allocates (not the weights)."""
    return _replay(config, shape, strategies).live.peak


def allocator_peak(config, shape: StepShape, strategies: Sequence[str]) -> int:
    """The most the CUDA caching allocator may count for the same tensors (each
    rounded as replay.block_bytes says): an upper bound of the measured
    activation bytes on a GPU, where activation_peak is the tensors' own bytes."""
    return _replay(config, shape, strategies).live.blocks_peak


def static_bytes(config, shape: StepShape) -> int:
    """NF4 projections (packed nibbles + fp32 absmax, the upper bound of double quant),
    the norms and embeddings in the activation dtype, LoRA weights + grads + optimizer
    state in fp32, and the RoPE tables (fp32 cos and sin of head_dim / 2 columns) for
    max(seq, 256) positions: what memory.budget.apply_memory_plan grows them to
    before the first step (llama.rope_tables, which doubles past what it is asked for,
    could hold up to twice that if it grew step by step)."""
    e, H = element_size(shape.dtype), config.hidden_size
    shapes = projection_shapes(config)
    n_weights = sum(a * b for a, b in shapes.values())
    nf4 = n_weights // 2 + (n_weights // NF4_BLOCKSIZE) * 4
    norms = 2 * H * e
    lora = 0
    if shape.lora_rank:
        lora = sum(shape.lora_rank * (a + b) for name, (a, b) in shapes.items()
                   if name in shape.lora_targets)
    per_layer = nf4 + norms + lora * (4 + 4 + shape.optimizer_state_bytes_per_param)
    embeddings = config.vocab_size * H * e * (1 if config.tie_word_embeddings else 2)
    rope = 2 * max(shape.seq, 256) * (config.head_dim // 2) * 4
    return config.num_hidden_layers * per_layer + embeddings + H * e + rope


def host_bytes_per_offloaded_layer(config, shape: StepShape) -> int:
    """Pinned host memory one offloaded layer input holds: [T, hidden] in the dtype."""
    return shape.tokens * row_bytes(config, shape)["h"]


def plan_memory(config, shape: StepShape, budget_bytes: Optional[int] = None,
                strategy: str = "auto", host_budget_bytes: Optional[int] = None) -> MemoryPlan:
    """Per-layer strategies under ``budget_bytes`` (None: unlimited, every layer keeps).
    ``strategy`` other than "auto" forces one strategy on every layer (still checked
    against the budget; "offload" offloads only as many layers as ``host_budget_bytes``
    holds and recomputes the rest). Raises MemoryBudgetError naming the smallest budget
    that works when even full offload does not fit, or the host memory an offloading
    plan needs when ``host_budget_bytes`` (None: unlimited) is below it."""
    if strategy != "auto" and strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of auto, {', '.join(STRATEGIES)}")
    L = config.num_hidden_layers
    static = static_bytes(config, shape)
    by = {s: static + activation_peak(config, shape, [s] * L) for s in STRATEGIES}
    per_host = host_bytes_per_offloaded_layer(config, shape)
    host_holds = L if host_budget_bytes is None else min(L, max(0, host_budget_bytes) // per_host)

    def fits(strategies):
        total = static + activation_peak(config, shape, strategies)
        return (budget_bytes is None or total <= budget_bytes), total

    if strategy == "offload":
        chosen = ["offload"] * host_holds + ["recompute"] * (L - host_holds)
    elif strategy != "auto":
        chosen = [strategy] * L
    elif budget_bytes is None or by["keep"] <= budget_bytes:
        chosen = ["keep"] * L
    elif by["recompute"] <= budget_bytes:
        # the most kept layers that fit (the prediction grows with each kept layer)
        lo, hi = 0, L
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(["recompute"] * (L - mid) + ["keep"] * mid)[0]:
                lo = mid
            else:
                hi = mid - 1
        chosen = ["recompute"] * (L - lo) + ["keep"] * lo
    else:
        lo, hi = 1, L            # the fewest offloaded layers (first layers first) that fit
        if host_holds < L:       # the host bounds the search: below it, or above (refused below)
            if host_holds and fits(["offload"] * host_holds + ["recompute"] * (L - host_holds))[0]:
                hi = host_holds
            else:
                lo = host_holds + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(["offload"] * mid + ["recompute"] * (L - mid))[0]:
                hi = mid
            else:
                lo = mid + 1
        chosen = ["offload"] * lo + ["recompute"] * (L - lo)
    offloaded = chosen.count("offload")
    ok, total = fits(chosen)
    if ok and offloaded > host_holds:
        raise MemoryBudgetError(
            f"a micro-batch of {shape.batch} x {shape.seq} tokens fits {gib(budget_bytes)} only "
            f"with {offloaded} of {L} layer inputs offloaded, {gib(offloaded * per_host, True)} "
            f"of pinned host memory; the host budget {gib(host_budget_bytes)} holds "
            f"{host_holds} (--host-memory-budget / ANITA_HOST_MEMORY_BUDGET)",
            flag="--host-memory-budget")
    if not ok:
        smallest = min(by.values())
        how = ("every layer offloaded" if strategy == "auto" else
               f"{offloaded} layers offloaded (all the host budget holds), the rest recomputed"
               if strategy == "offload" and offloaded < L else f"every layer {strategy}")
        raise MemoryBudgetError(
            f"{gib(budget_bytes)} is too small for a micro-batch of {shape.batch} x {shape.seq} "
            f"tokens: {how} needs {gib(total, round_up=True)} (predicted); the smallest budget "
            f"that works is {gib(smallest, round_up=True)} (every layer offloaded)")
    return MemoryPlan(chosen, total, static, by, budget_bytes, offloaded * per_host,
                      host_budget_bytes)


def shape_for_model(model, batch: int, seq: int) -> StepShape:
    """The StepShape of a QLoRALlama's train_step on a [batch, seq] micro-batch, with
    the dtypes and the matmul path its kernels will use."""
    from anita_core.model.ops import active_backend, choose_path
    ad = model.adapters
    rank = ad.config.r if ad is not None and ad.enabled else 0
    targets = tuple(ad.config.target_modules) if rank else ()
    dropout = float(ad.config.dropout) if rank else 0.0
    # the dot runs in fp32 in the torch backend and under the Triton interpreter
    fp32_dot = active_backend() == "torch" or model.device.type != "cuda"
    compute = torch.float32 if fp32_dot else model.dtype
    from anita_core.model.block_buffers import mlp_chunk_rows
    dense = choose_path("block", batch * seq, dtype=model.dtype) == "dequant"
    rows = mlp_chunk_rows(batch * seq, model.config.intermediate_size, model.dtype)
    mlp_dense = choose_path("block", rows, dtype=model.dtype) == "dequant"
    from csrc_triton.linear_loss_matmul import upcasts
    upcast = active_backend() == "triton" and upcasts(model.device, model.dtype)
    return StepShape(batch, seq, model.dtype, rank, targets, dropout, compute, dense, compute,
                     mlp_chunk_rows=rows, mlp_dense_weights=mlp_dense, loss_upcast=upcast)
