"""The memory planner: how many bytes a training step holds, per strategy and
layer, and which layers can keep their activations under a budget.

Pure arithmetic from the model config, the micro-batch shape, the LoRA settings
and the dtypes: nothing is allocated. Each layer runs one of three strategies:

  keep       the forward keeps every intermediate its backward needs
             (block_forward_saving, without the dense dequantized weights); the
             backward runs block_backward_saved: no recompute.
  recompute  the forward keeps only the block input; the backward recomputes the
             block from it (activation checkpointing, 1.5x the block's FLOPs).
  offload    like recompute, but the block input waits in pinned host memory;
             during the backward at most two offloaded inputs are on the device
             (the one in use and the next one, arriving on a side stream).

The prediction replays, tensor by tensor, what block.py and llama.py allocate and
free in one train_step (``_StepReplay``): every kernel output, the locals Python
keeps alive until a function returns, the LoRA contexts (the rank-r product and
the dropout mask) and, on the dequantize path (M above the fused threshold), the
seven dense weights a recompute holds while its layer is differentiated. What it
leaves out is below the noise: RoPE tables, bounds, a few [T] vectors of ints.
``predicted`` = static bytes (NF4 weights, LoRA weights, their grads and AdamW
states) + the activation peak; tests/test_memory_plan.py compares the activation
peak with a live-tensor tracker on the tiny model for every strategy.

The plan keeps as many layers as fit, the last layers first: the backward
reaches them first, so their activations are gone before any recompute's working
set is built (kept early layers would sit under every later layer's recompute).
The rest recompute; when even full recompute does not fit, the fewest first
layers whose inputs must leave the device are offloaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

STRATEGIES = ("keep", "recompute", "offload")
GiB = 2**30
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOSS_CHUNK_BYTES = 256 * 2**20      # csrc_triton.linear_loss.DEFAULT_CHUNK_BYTES
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
    """The budget is below what even full recompute with offload needs."""


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
    optimizer_state_bytes_per_param: int = 8     # AdamW: two fp32 moments

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _sizes(config, shape: StepShape) -> Dict[str, int]:
    """Bytes of every tensor one block allocates, by the name block.py gives it."""
    T, e = shape.tokens, _elt(shape.dtype)
    H, I = config.hidden_size, config.intermediate_size
    Q = config.num_attention_heads * config.head_dim
    KV = config.num_key_value_heads * config.head_dim
    f32 = 4
    s = dict(h=T * H * e, x=T * H * e, rstd=T * f32, q=T * Q * e, kv=T * KV * e, attn=T * Q * e,
             lse=shape.batch * config.num_attention_heads * shape.seq * f32, inter=T * I * e)
    width = {"q_proj": H, "k_proj": H, "v_proj": H, "o_proj": Q, "gate_proj": H, "up_proj": H,
             "down_proj": I}
    out = {"q_proj": Q, "k_proj": KV, "v_proj": KV, "o_proj": H, "gate_proj": I, "up_proj": I,
           "down_proj": H}
    ce = _elt(shape.lora_compute_dtype or shape.dtype)
    de = _elt(shape.dense_dtype or shape.dtype)
    for name in PROJECTIONS:
        adapted = shape.lora_rank > 0 and name in shape.lora_targets
        s[f"xa:{name}"] = T * shape.lora_rank * ce if adapted else 0
        s[f"mask:{name}"] = T * width[name] if adapted and shape.lora_dropout > 0 else 0
        s[f"dense:{name}"] = out[name] * width[name] * de if shape.dense_weights else 0
        # the dropped LoRA input x * mask / (1 - p), a transient in the compute dtype
        s[f"drop:{name}"] = T * width[name] * ce if s[f"mask:{name}"] else 0
    return s


class _Live:
    """Named allocations and the running peak."""

    def __init__(self):
        self.held: Dict[str, int] = {}
        self.now = self.peak = 0

    def alloc(self, name: str, n: int) -> None:
        assert name not in self.held, name
        self.held[name] = n
        self.now += n
        self.peak = max(self.peak, self.now)

    def free(self, *names: str) -> None:
        for name in names:
            self.now -= self.held.pop(name)

    def free_prefix(self, prefix: str, keep: Sequence[str] = ()) -> None:
        self.free(*[n for n in self.held if n.startswith(prefix) and n not in keep])


# what a kept layer holds from its forward to its backward (block_forward's _keep):
# h1 of the block and everything after, the rope outputs, v, the attention output
# and lse, the LoRA contexts; not q/k (replaced by their rope) nor the o/down outputs
KEPT = ("x1", "rstd1", "qr", "kr", "v", "attn", "lse", "h1", "x2", "rstd2", "g", "u", "m")


class _StepReplay:
    """One train_step's allocations, in block.py's and llama.py's order."""

    def __init__(self, config, shape: StepShape):
        self.c, self.shape, self.s = config, shape, _sizes(config, shape)
        self.live = _Live()

    def _project(self, p: str, name: str, out_key: str, out_name: str) -> None:
        """A projection's forward: its output, its LoRA context (xa, mask)."""
        s, live = self.s, self.live
        if s[f"mask:{name}"]:
            live.alloc(f"{p}mask:{name}", s[f"mask:{name}"])
            self._transient(f"{p}drop:{name}", s[f"drop:{name}"])
        if s[f"xa:{name}"]:
            live.alloc(f"{p}xa:{name}", s[f"xa:{name}"])
        self._dense_transient(p, name)
        live.alloc(p + out_name, s[out_key])

    def _transient(self, name: str, n: int) -> None:
        self.live.alloc(name, n)
        self.live.free(name)

    def _dense_transient(self, p: str, name: str) -> None:
        """On the dequantize path a launcher given no dense W dequantizes its own."""
        if self.s[f"dense:{name}"] and f"{p}dense:{name}" not in self.live.held:
            self._transient(f"{p}W:{name}", self.s[f"dense:{name}"])

    def block_forward(self, i: int, dense: bool) -> None:
        """Layer i's forward from its input f"{i}.h0" (present); leaves f"{i}.h2" and,
        for the backward, everything block_forward(_keep) keeps."""
        s, live, p = self.s, self.live, f"{i}."
        if dense:
            for name in PROJECTIONS:
                live.alloc(f"{p}dense:{name}", s[f"dense:{name}"])
        live.alloc(p + "x1", s["x"]); live.alloc(p + "rstd1", s["rstd"])
        self._project(p, "q_proj", "q", "q")
        self._project(p, "k_proj", "kv", "k")
        self._project(p, "v_proj", "kv", "v")
        live.alloc(p + "qr", s["q"]); live.alloc(p + "kr", s["kv"])
        live.alloc(p + "attn", s["attn"]); live.alloc(p + "lse", s["lse"])
        self._project(p, "o_proj", "h", "o")
        live.alloc(p + "h1", s["h"]); live.free(p + "o")
        live.alloc(p + "x2", s["x"]); live.alloc(p + "rstd2", s["rstd"])
        self._project(p, "gate_proj", "inter", "g")
        self._project(p, "up_proj", "inter", "u")
        live.alloc(p + "m", s["inter"])
        self._project(p, "down_proj", "h", "down")
        live.alloc(p + "h2", s["h"]); live.free(p + "down")
        live.free(p + "q", p + "k")                     # block_forward returns

    def drop_intermediates(self, i: int) -> None:
        """block_forward returned without _keep: only h0 (if held) and h2 remain."""
        self.live.free_prefix(f"{i}.", keep=(f"{i}.h0", f"{i}.h2"))

    def _project_backward(self, p: str, name: str, dy: str, dx: Optional[str], dx_key: str) -> None:
        s, live = self.s, self.live
        if s[f"xa:{name}"]:
            # dy B [T, r], then dX's kernel; the LoRA grads accumulate in place
            live.alloc(f"{p}gB:{name}", s[f"xa:{name}"])
            if s[f"drop:{name}"]:
                self._transient(f"{p}drop:{name}", s[f"drop:{name}"])
        self._dense_transient(p, name)
        if dx is not None:
            live.alloc(p + dx, s[dx_key])
        if s[f"xa:{name}"]:
            live.free(f"{p}gB:{name}")
        if s[f"dense:{name}"] and f"{p}dense:{name}" in live.held:
            live.free(f"{p}dense:{name}")

    def block_backward(self, i: int, dh2: str) -> str:
        """block_backward_saved of layer i (its saved tensors present); returns the
        name of dL/dh0 and leaves only it (and dh2, still the caller's)."""
        s, live, p = self.s, self.live, f"{i}."
        self._project_backward(p, "down_proj", dh2, "dm", "inter")
        live.alloc(p + "dg", s["inter"]); live.alloc(p + "du", s["inter"])
        self._project_backward(p, "gate_proj", p + "dg", "dx2a", "x")
        self._project_backward(p, "up_proj", p + "du", "dx2b", "x")
        live.alloc(p + "dx2", s["x"]); live.free(p + "dx2a", p + "dx2b")
        live.alloc(p + "dx2_h1", s["h"])
        live.alloc(p + "dh1", s["h"])
        self._project_backward(p, "o_proj", p + "dh1", "da", "attn")
        live.alloc(p + "dqr", s["q"]); live.alloc(p + "dkr", s["kv"]); live.alloc(p + "dvh", s["kv"])
        live.alloc(p + "dq", s["q"]); live.alloc(p + "dk", s["kv"])
        self._project_backward(p, "q_proj", p + "dq", "dx1a", "x")
        self._project_backward(p, "k_proj", p + "dk", "dx1b", "x")
        live.alloc(p + "dx1", s["x"]); live.free(p + "dx1a", p + "dx1b")
        self._project_backward(p, "v_proj", p + "dvh", "dx1c", "x")
        live.alloc(p + "dx1'", s["x"]); live.free(p + "dx1", p + "dx1c")
        live.alloc(p + "dx1_h0", s["h"])
        live.alloc(p + "dh0", s["h"])
        self.live.free_prefix(p, keep=(p + "dh0",))     # block_backward_saved returns
        return p + "dh0"

    def loss(self, T: int) -> None:
        """linear_cross_entropy_forward_backward: dhidden [T, H], per-row fp32 [T]
        vectors, and one chunk of fp32 logits (+ its half copy in half precision)."""
        c, e, live = self.c, _elt(self.shape.dtype), self.live
        V = c.vocab_size
        rows = max(1, LOSS_CHUNK_BYTES // (4 * V))
        rows = min(T, rows - rows % 16 if rows >= 16 else rows)
        live.alloc("loss.dhidden", T * c.hidden_size * e)
        live.alloc("loss.rows", T * (8 + 4 + 4 + 4))            # rows, lse, target, row_scale
        if e != 4:
            live.alloc("loss.half", rows * V * e)
        live.alloc("loss.logits", rows * V * 4)
        live.free_prefix("loss.", keep=("loss.dhidden",))

    def step(self, strategies: Sequence[str]) -> int:
        """Peak activation bytes of one train_step under these per-layer strategies."""
        s, live, L = self.s, self.live, len(strategies)
        dense = self.shape.dense_weights
        live.alloc("0.h0", s["h"])                             # the embedding rows
        for i, strategy in enumerate(strategies):
            if strategy == "offload":
                live.alloc(f"{i}.host", 0)                     # not on the device
            self.block_forward(i, dense=False)
            if strategy != "keep":
                self.drop_intermediates(i)
            if strategy == "offload":
                live.free(f"{i}.h0")
            live.held[f"{i + 1}.h0"] = live.held.pop(f"{i}.h2")  # the next block's input
        live.alloc("final.x", s["x"]); live.alloc("final.rstd", s["rstd"])
        self.loss(self.shape.tokens)
        offloaded = [i for i in range(L) if strategies[i] == "offload"]
        if offloaded:                                          # prefetched before it
            live.alloc(f"{offloaded[-1]}.h0", s["h"])
        live.alloc("final.dh", s["h"])                         # the final norm's backward
        dh = "final.dh"
        for i in reversed(range(L)):
            strategy = strategies[i]
            if strategy == "offload":
                if f"{i}.h0" not in live.held:
                    live.alloc(f"{i}.h0", s["h"])
                below = [j for j in offloaded if j < i]
                if below:
                    live.alloc(f"{below[-1]}.h0", s["h"])      # prefetched
            if strategy != "keep":
                self.block_forward(i, dense=dense)             # block_forward_saving
                # (its h2 stays: block_backward's local ``_`` holds it to the end)
            new_dh = self.block_backward(i, dh)
            live.free(dh)
            dh = new_dh
        return live.peak


@dataclass
class MemoryPlan:
    strategies: List[str]
    predicted_bytes: int                 # static + activation peak of the chosen plan
    static_bytes: int
    by_strategy: Dict[str, int] = field(default_factory=dict)   # every layer the same
    budget_bytes: Optional[int] = None
    host_bytes: int = 0                  # pinned host memory of the offloaded block inputs

    def describe(self) -> str:
        counts = {s: self.strategies.count(s) for s in STRATEGIES if s in self.strategies}
        layers = ", ".join(f"{n} {s}" for s, n in counts.items())
        alternatives = "; ".join(f"all {s} {gib(self.by_strategy[s])}" for s in STRATEGIES
                                 if s in self.by_strategy)
        budget = "unlimited" if self.budget_bytes is None else gib(self.budget_bytes)
        host = f", {gib(self.host_bytes)} pinned host memory" if self.host_bytes else ""
        return (f"memory plan: layers {layers}; predicted peak {gib(self.predicted_bytes)}{host} "
                f"(budget {budget}; {alternatives})")


def activation_peak(config, shape: StepShape, strategies: Sequence[str]) -> int:
    """Peak bytes of the tensors one train_step allocates (not the weights)."""
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"strategy {s!r} is not one of {', '.join(STRATEGIES)}")
    if len(strategies) != config.num_hidden_layers:
        raise ValueError(f"strategies: got {len(strategies)} for {config.num_hidden_layers} layers")
    return _StepReplay(config, shape).step(strategies)


def static_bytes(config, shape: StepShape) -> int:
    """NF4 projections (packed nibbles + fp32 absmax, the upper bound of double quant),
    the norms and embeddings in the activation dtype, LoRA weights + grads + optimizer
    state in fp32."""
    e = _elt(shape.dtype)
    H, I = config.hidden_size, config.intermediate_size
    Q = config.num_attention_heads * config.head_dim
    KV = config.num_key_value_heads * config.head_dim
    shapes = {"q_proj": (Q, H), "k_proj": (KV, H), "v_proj": (KV, H), "o_proj": (H, Q),
              "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    n_weights = sum(a * b for a, b in shapes.values())
    nf4 = n_weights // 2 + (n_weights // NF4_BLOCKSIZE) * 4
    norms = 2 * H * e
    lora = 0
    if shape.lora_rank:
        lora = sum(shape.lora_rank * (a + b) for name, (a, b) in shapes.items()
                   if name in shape.lora_targets)
    per_layer = nf4 + norms + lora * (4 + 4 + shape.optimizer_state_bytes_per_param)
    embeddings = config.vocab_size * H * e * (1 if config.tie_word_embeddings else 2)
    return config.num_hidden_layers * per_layer + embeddings + H * e


def plan_memory(config, shape: StepShape, budget_bytes: Optional[int] = None,
                strategy: str = "auto") -> MemoryPlan:
    """Per-layer strategies under ``budget_bytes`` (None: unlimited, every layer keeps).
    ``strategy`` other than "auto" forces one strategy on every layer (still checked
    against the budget). Raises MemoryBudgetError naming the smallest budget that
    works when even full offload does not fit."""
    if strategy != "auto" and strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of auto, {', '.join(STRATEGIES)}")
    L = config.num_hidden_layers
    static = static_bytes(config, shape)
    by = {s: static + activation_peak(config, shape, [s] * L) for s in STRATEGIES}

    def fits(strategies):
        total = static + activation_peak(config, shape, strategies)
        return (budget_bytes is None or total <= budget_bytes), total

    if strategy != "auto":
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
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(["offload"] * mid + ["recompute"] * (L - mid))[0]:
                hi = mid
            else:
                lo = mid + 1
        chosen = ["offload"] * lo + ["recompute"] * (L - lo)
    ok, total = fits(chosen)
    if not ok:
        smallest = min(by.values())
        how = "every layer offloaded" if strategy == "auto" else f"every layer {strategy}"
        raise MemoryBudgetError(
            f"{gib(budget_bytes)} is too small for a micro-batch of {shape.batch} x {shape.seq} "
            f"tokens: {how} needs {gib(total, round_up=True)} (predicted); the smallest budget "
            f"that works is {gib(smallest, round_up=True)} (every layer offloaded)")
    host = chosen.count("offload") * _sizes(config, shape)["h"]
    return MemoryPlan(chosen, total, static, by, budget_bytes, host)


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
    dense = choose_path("block", batch * seq, dtype=model.dtype) == "dequant"
    return StepShape(batch, seq, model.dtype, rank, targets, dropout, compute, dense, compute)
