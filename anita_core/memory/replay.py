"""The memory planner's replay of one train_step: which tensors block.py and
llama.py hold, tensor by tensor, and the peak of their bytes (see planner's
docstring for what it covers and what it leaves out). Pure arithmetic: nothing
is allocated.

Besides the exact bytes, ``_Live`` keeps the peak of what the CUDA caching allocator
may hold for the same tensors (``block_bytes``): each request rounded up to 512
bytes, and a block from the large pool (requests above 1 MiB) left unsplit when less
than 1 MiB would remain, so up to 1 MiB more than asked."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

from anita_core.model.block_buffers import (BlockDims, buffer_row_bytes, chunk_sizes, element_size,
                                            mlp_chunk_rows)
from anita_core.model.config import projection_shapes
from anita_core.model.weights import FUSED_GROUPS, PROJECTIONS
from csrc_triton.linear_loss import DEFAULT_CHUNK_BYTES as LOSS_CHUNK_BYTES
from csrc_triton.linear_loss_matmul import upcast_bytes

LORA_PARAM_BYTES = 4                # LoRA A/B and their gradients: fp32 (planner.static_bytes)
INDEX_BYTES = 8                     # int64 token ids, targets, positions, segment ids, row indices
ALLOCATOR_ROUND = 512               # the CUDA caching allocator's size granularity (kMinBlockSize)
ALLOCATOR_SMALL = 2**20             # kSmallSize: above it a block may keep < 1 MiB unsplit


def block_bytes(n: int) -> int:
    """The most the CUDA caching allocator may count for a request of n bytes."""
    if n == 0:
        return 0
    rounded = -(-n // ALLOCATOR_ROUND) * ALLOCATOR_ROUND
    return rounded + (ALLOCATOR_SMALL if rounded > ALLOCATOR_SMALL else 0)


def row_bytes(config, shape) -> Dict[str, int]:
    """Bytes per token row of every tensor one block allocates: block_buffers' declared
    buffers by their names, and each projection's output and LoRA contexts (a [T, N]
    tensor of key k is T * row[k] bytes)."""
    e = element_size(shape.dtype)
    s = buffer_row_bytes(BlockDims.of_config(config), shape.dtype)
    ce = element_size(shape.lora_compute_dtype or shape.dtype)
    for name, (n_out, width) in projection_shapes(config).items():
        adapted = shape.lora_rank > 0 and name in shape.lora_targets
        s[f"out:{name}"] = n_out * e
        s[f"xa:{name}"] = shape.lora_rank * ce if adapted else 0
        s[f"mask:{name}"] = width if adapted and shape.lora_dropout > 0 else 0
        # the dropped LoRA input x * mask / (1 - p), a transient in the compute dtype
        s[f"drop:{name}"] = width * ce if s[f"mask:{name}"] else 0
    return s


class _Live:
    """Named allocations and the running peak, in bytes and in allocator blocks."""

    def __init__(self):
        self.held: Dict[str, int] = {}
        self.now = self.peak = 0
        self.blocks_now = self.blocks_peak = 0

    def alloc(self, name: str, n: int) -> None:
        assert name not in self.held, name
        self.held[name] = n
        self.now += n
        self.blocks_now += block_bytes(n)
        self.peak = max(self.peak, self.now)
        self.blocks_peak = max(self.blocks_peak, self.blocks_now)

    def free(self, *names: str) -> None:
        for name in names:
            n = self.held.pop(name)
            self.now -= n
            self.blocks_now -= block_bytes(n)

    def rename(self, old: str, new: str) -> None:
        """The same tensor under another name (a value handed on, or updated in place)."""
        assert new not in self.held, new
        self.held[new] = self.held.pop(old)

    def free_prefix(self, prefix: str, keep: Sequence[str] = ()) -> None:
        self.free(*[n for n in self.held if n.startswith(prefix) and n not in keep])


def _layer(prefix: str) -> str:
    """f"{i}." of a block's or one of its chunks' prefix."""
    return prefix.split(".", 1)[0] + "."


class StepReplay:
    """One train_step's allocations, in block.py's and llama.py's order.

    Names: f"{layer}.{tensor}" for a block's tensors, f"{layer}.c{chunk}.{tensor}"
    for one MLP chunk's; every [T, N] tensor is rows * row_bytes[key]."""

    def __init__(self, config, shape):
        self.c, self.shape, self.r = config, shape, row_bytes(config, shape)
        self.weights = projection_shapes(config)
        self.dense_elt = element_size(shape.dense_dtype or shape.dtype)
        self.live = _Live()
        T = shape.tokens
        rows = shape.mlp_chunk_rows or mlp_chunk_rows(T, config.intermediate_size, shape.dtype)
        self.chunks = chunk_sizes(T, rows)
        dropout = shape.lora_rank > 0 and shape.lora_dropout > 0
        # a group runs as one matmul unless a member draws a dropout mask (block._Projector)
        self.fused = {g: not (dropout and any(m in shape.lora_targets for m in members))
                      for g, members in FUSED_GROUPS.items()}
        mlp_dense = shape.dense_weights if shape.mlp_dense_weights is None else shape.mlp_dense_weights
        self.dense_path = {n: (mlp_dense if n in FUSED_GROUPS["gate_up_proj"] + ("down_proj",)
                               else shape.dense_weights) for n in PROJECTIONS}

    def _alloc(self, name: str, key: str, rows: int) -> None:
        self.live.alloc(name, rows * self.r[key])

    def _transient(self, name: str, n: int) -> None:
        self.live.alloc(name, n)
        self.live.free(name)

    def _weight(self, p: str, members: Sequence[str], reuse: bool) -> None:
        """The dense W of a (group of) projection(s) on the dequantize path: held from
        its first use to its backward when ``reuse`` (a recompute), else a transient
        the launcher makes for itself."""
        if not self.dense_path[members[0]]:
            return
        n = sum(math.prod(self.weights[m]) for m in members) * self.dense_elt
        if reuse:                   # one per layer, whatever the chunk
            name = _layer(p) + "dense:" + members[0]
            if name not in self.live.held:
                self.live.alloc(name, n)
        else:
            self._transient(f"{p}W:{members[0]}", n)

    def _contexts(self, p: str, members: Sequence[str], rows: int, fused: bool) -> None:
        """The LoRA contexts a forward keeps: masks, drop transients, xa."""
        r = self.r
        if fused:
            xa = sum(r[f"xa:{m}"] for m in members)
            if xa:      # + the stacked A [R, K] and block-diagonal B [N, R] it keeps
                n_out = sum(self.weights[m][0] for m in members)
                width = self.weights[members[0]][1]
                self.live.alloc(f"{p}xa:{members[0]}", rows * xa + (n_out + width) * xa)
            return
        for m in members:
            if r[f"mask:{m}"]:
                self._alloc(f"{p}mask:{m}", f"mask:{m}", rows)
                self._transient(f"{p}drop:{m}", rows * r[f"drop:{m}"])
            if r[f"xa:{m}"]:
                self._alloc(f"{p}xa:{m}", f"xa:{m}", rows)

    def _outputs(self, group: str, outs: Sequence[str]) -> Sequence[str]:
        """The names a group's outputs are held under: one (the fused [rows, sum N]
        output, whose column views they are), or one each."""
        return ("".join(outs),) if self.fused[group] else tuple(outs)

    def _forward(self, p: str, members: Sequence[str], outs: Sequence[str], rows: int,
                 reuse: bool, group: Optional[str] = None) -> None:
        """A projection (or a fused group's) forward: contexts, W, the outputs (a fused
        group's [rows, sum N] output, held whole: its members are views of it)."""
        fused = group is not None and self.fused[group]
        if fused:
            self._contexts(p, members, rows, True)
            self._weight(p, members, reuse)
            self.live.alloc(p + "".join(outs), rows * sum(self.r[f"out:{m}"] for m in members))
            return
        for m, out in zip(members, outs):
            self._contexts(p, (m,), rows, False)
            self._weight(p, (m,), reuse)
            self._alloc(p + out, f"out:{m}", rows)

    def _drop_contexts(self, p: str, members: Sequence[str]) -> None:
        for m in members:
            for kind in ("xa", "mask"):
                if f"{p}{kind}:{m}" in self.live.held:
                    self.live.free(f"{p}{kind}:{m}")

    def _backward(self, p: str, members: Sequence[str], dx: str, dx_bytes: int, rows: int,
                  reuse: bool, release: bool, group: Optional[str] = None,
                  split_dy: bool = False) -> None:
        """dX of a projection or fused group from dY (present): the rank-r dY B, the
        drop transients, dX, then its contexts (and, at ``release``, its W) go.
        ``split_dy``: an unfused group's dY comes as one tensor, each member's columns
        copied out contiguous (the gate/up backward under dropout)."""
        r, live = self.r, self.live
        fused = group is None or self.fused[group]
        parts = [members] if fused else [(m,) for m in members]
        for j, part in enumerate(parts):
            gb = rows * sum(r[f"xa:{m}"] for m in part)
            if split_dy and not fused:          # dys.split(...)[j].contiguous(): a copy
                self._alloc(f"{p}dy:{part[0]}", f"out:{part[0]}", rows)
            if gb:
                live.alloc(f"{p}gB:{part[0]}", gb)
                live.alloc(f"{p}dAB:{part[0]}", self._lora_grad_bytes(part))
            for m in part:
                if r[f"drop:{m}"]:
                    self._transient(f"{p}drop:{m}", rows * r[f"drop:{m}"])
            self._weight(p, part, reuse)
            # (with the SwiGLU epilogue on the dequantize path, dm and then dgate, dup are
            # written into dX's own [rows, 2I]: nothing beside it)
            live.alloc(f"{p}{dx}{j}", dx_bytes)
            for m in part:                      # the dequantize path's masked g A [rows, K]
                if r[f"mask:{m}"] and self.dense_path[m]:
                    self._transient(f"{p}gA:{m}", rows * self.weights[m][1] * self.dense_elt)
            if gb:
                live.free(f"{p}gB:{part[0]}", f"{p}dAB:{part[0]}")
            if split_dy and not fused:
                live.free(f"{p}dy:{part[0]}")
            self._drop_contexts(p, part)
            if release and _layer(p) + "dense:" + part[0] in live.held:
                live.free(_layer(p) + "dense:" + part[0])
            if j:                               # dx = dx + dx_j
                live.alloc(f"{p}{dx}sum{j}", dx_bytes)
                live.free(f"{p}{dx}0", f"{p}{dx}{j}")
                live.rename(f"{p}{dx}sum{j}", f"{p}{dx}0")
        live.rename(f"{p}{dx}0", p + dx)

    def _lora_grad_bytes(self, part: Sequence[str]) -> int:
        """dA and dB of a projection (lora_linear_backward: [r, K] and [N, r]) or of a fused
        group (lora_linear_fused_backward: fp32 [R, K] and [sum N, R] for the stacked rank R,
        and each member's dB copied out of the block-diagonal when there are several),
        alive from before the dX matmul until it returns."""
        adapted = [m for m in part if self.r[f"xa:{m}"]]
        rank = self.shape.lora_rank
        R, K = rank * len(adapted), self.weights[part[0]][1]
        n = sum(self.weights[m][0] for m in part)
        copies = sum(self.weights[m][0] * rank for m in adapted) if len(adapted) > 1 else 0
        return (R * K + n * R + copies) * LORA_PARAM_BYTES

    def block_forward(self, i: int, keep: bool, reuse: bool, mlp: bool = True) -> None:
        """Layer i's forward from its input f"{i}.h0" (present). ``keep``: what
        a KEEP policy's Saved holds stays (else only h0, h2); ``mlp=False``:
        block_backward's recompute, which stops at x2."""
        live, p, T = self.live, f"{i}.", self.shape.tokens
        self._alloc(p + "x1", "x", T); self._alloc(p + "rstd1", "rstd", T)
        # q, k rotated in place (rope_forward in_place): no tensor beside the outputs
        self._forward(p, FUSED_GROUPS["qkv_proj"], ("q", "k", "v"), T, reuse, "qkv_proj")
        if self.c.qk_norm:      # Qwen3: q, k copied into rows, normed, written back in place
            for name, kind in (("q_pre", "q"), ("q_rstd", "q_rstd"), ("qn", "q"),
                               ("k_pre", "kv"), ("k_rstd", "kv_rstd"), ("kn", "kv")):
                self._alloc(p + name, kind, T)
                if name in ("qn", "kn"):
                    live.free(p + name)
        self._alloc(p + "attn", "attn", T)
        if keep or not mlp:
            self._alloc(p + "lse", "lse", T)
        else:                       # attention_forward drops it at once
            self._transient(p + "lse", T * self.r["lse"])
        self._forward(p, ("o_proj",), ("o",), T, reuse)
        self._alloc(p + "h1", "h", T); live.free(p + "o")
        self._alloc(p + "x2", "x", T); self._alloc(p + "rstd2", "rstd", T)
        if not mlp:
            return
        if not keep:        # the MLP chunks need none of the attention's tensors or contexts
            live.free(p + "x1", p + "attn", *(p + n for n in self._qkv()))
            self._drop_contexts(p, FUSED_GROUPS["qkv_proj"] + ("o_proj",))
        self._alloc(p + "h2", "h", T)
        for j, rows in enumerate(self.chunks):
            c = f"{p}c{j}."
            self._mlp_chunk_forward(c, rows, reuse)
            live.free(c + "down")
            if not keep:
                live.free_prefix(c)
        if not keep:        # block_forward returns: h0 (the caller's) and h2 remain
            live.free_prefix(p, keep=(p + "h0", p + "h2"))

    def _qkv(self) -> Sequence[str]:
        return self._outputs("qkv_proj", ("q", "k", "v"))

    def _mlp_chunk_forward(self, c: str, rows: int, reuse: bool) -> None:
        self._forward(c, FUSED_GROUPS["gate_up_proj"], ("g", "u"), rows, reuse, "gate_up_proj")
        self._alloc(c + "m", "inter", rows)
        self._forward(c, ("down_proj",), ("down",), rows, reuse)

    def block_backward(self, i: int, dh2: str, kept: bool) -> str:
        """block_backward of layer i (its Saved complete; ``kept``: each MLP
        chunk's too, else each chunk's forward reruns first); returns the name of
        dL/dh0 and leaves only it (and dh2, still the caller's)."""
        live, p, T, r = self.live, f"{i}.", self.shape.tokens, self.r
        reuse = not kept
        self._alloc(p + "dh1", "h", T)
        for j, rows in enumerate(self.chunks):
            c, last = f"{p}c{j}.", j == len(self.chunks) - 1
            # the dense W of a recompute lives in the layer's _Projector, not the chunk's
            if not kept:
                self._mlp_chunk_forward(c, rows, reuse)
                live.free(c + "down")
            self._backward_mlp(c, rows, reuse, last)
        live.free(p + "x2", p + "h1", p + "rstd2")
        # attention
        self._backward(p, ("o_proj",), "da", T * r["attn"], T, reuse, True)
        # dq, dk, dv: into one [T, q+k+v] buffer (fused q/k/v) or one each; RoPE's
        # backward rotates dq, dk in place
        grads = {"dqkv": r["qkv"]} if self.fused["qkv_proj"] else \
            {"dq": r["q"], "dk": r["kv"], "dv": r["kv"]}
        for name, per_row in grads.items():
            live.alloc(p + name, T * per_row)
        self._transient(p + "delta", T * r["lse"])
        live.free(p + "da", p + "attn", p + "lse", *(p + n for n in self._qkv()))
        if self.c.qk_norm:      # the norms' dX, copied into dq, dk's place
            self._transient(p + "dq_pre", T * r["q"])
            self._transient(p + "dk_pre", T * r["kv"])
            live.free(*(p + n for n in ("q_pre", "q_rstd", "k_pre", "k_rstd")))
        self._backward(p, FUSED_GROUPS["qkv_proj"], "dx1", T * r["x"], T, reuse, True, "qkv_proj")
        live.free(p + "x1", *(p + name for name in grads))
        self._alloc(p + "dx1_h0", "h", T)
        live.free(p + "dx1", p + "dx1_h0")
        live.rename(p + "dh1", p + "dh0")                    # dh1 += dx1_h0, in place
        self.live.free_prefix(p, keep=(p + "dh0",))     # block_backward returns
        return p + "dh0"

    def _backward_mlp(self, c: str, rows: int, reuse: bool, last: bool) -> None:
        """One MLP chunk's backward, its forward's g, u, m and contexts present."""
        live, r = self.live, self.r
        # the down projection's dX with the SwiGLU epilogue: d[gate, up] [rows, 2I]
        self._backward(c, ("down_proj",), "dgu", rows * r["gate_up"], rows, reuse, last)
        live.free(c + "m", *(c + n for n in self._outputs("gate_up_proj", ("g", "u"))))
        self._backward(c, FUSED_GROUPS["gate_up_proj"], "dx2", rows * r["x"], rows, reuse, last,
                       "gate_up_proj", split_dy=True)
        live.free(c + "dgu")
        self._alloc(c + "dx2_h1", "h", rows)
        live.free(c + "dx2", c + "dx2_h1")
        live.free_prefix(c)

    def loss(self, T: int) -> None:
        """linear_cross_entropy_forward_backward: dhidden [T, H], the per-row vectors
        (int64 row indices, fp32 lse, target, row scale), and for one chunk of rows its
        hidden rows, labels, lse and target, its fp32 logits (+ the gradient rows in half
        precision), the row scales of its gradient rows (a transient), and dh_c =
        dlogits W in fp32 (+ its cast to the dtype);
        then the loss sum and token count that train_step returns. ``loss_upcast``: the
        two matmuls' operands are upcast to fp32 a block at a time (a CPU, or a torch
        without out_dtype), beside their results."""
        c, e, live = self.c, element_size(self.shape.dtype), self.live
        V, H = c.vocab_size, c.hidden_size
        rows = max(1, LOSS_CHUNK_BYTES // (4 * V))
        rows = min(T, rows - rows % 16 if rows >= 16 else rows)
        live.alloc("loss.dhidden", T * H * e)
        live.alloc("loss.rows", T * (INDEX_BYTES + 4 + 4 + 4))  # rows, lse, target, row_scale
        if e != 4:
            live.alloc("loss.half", rows * V * e)
        live.alloc("loss.chunk", rows * (H * e + INDEX_BYTES))  # h_c, labels_c
        live.alloc("loss.logits", rows * V * 4)
        if self.shape.loss_upcast:      # linear_loss_matmul: fp32 copies of operand blocks
            self._transient("loss.upcast", upcast_bytes(rows, H, V))
        live.alloc("loss.chunk_rows", rows * (4 + 4))         # lse_c, target_c
        # the gradient rows' row_scale[rows_c] (and its scaled copy in half precision)
        self._transient("loss.row_scale_c", rows * (4 if e == 4 else 8))
        live.alloc("loss.dh_c", rows * H * 4)
        if self.shape.loss_upcast:
            self._transient("loss.upcast", upcast_bytes(rows, V, H))
        if e != 4:
            self._transient("loss.dh_c_cast", rows * H * e)
        live.free_prefix("loss.", keep=("loss.dhidden",))
        live.alloc("loss.result", 4 + INDEX_BYTES)            # loss_sum, n_tokens

    def step(self, strategies: Sequence[str]) -> int:
        """Peak activation bytes of one train_step under these per-layer strategies."""
        live, L, T = self.live, len(strategies), self.shape.tokens
        h = T * self.r["h"]
        # the batch on the device: input ids, targets, position ids and segment ids (or
        # the positions llama.geometry makes), and the int32 document bounds [B, S] x 2
        live.alloc("batch", T * (4 * INDEX_BYTES + 2 * 4))
        live.alloc("0.h0", h)                                  # the embedding rows
        for i, strategy in enumerate(strategies):
            if strategy == "offload":
                live.alloc(f"{i}.host", 0)                     # not on the device
            self.block_forward(i, keep=strategy == "keep", reuse=False)
            if strategy == "offload":
                live.free(f"{i}.h0")
            live.rename(f"{i}.h2", f"{i + 1}.h0")                # the next block's input
        live.alloc("final.x", h); self._alloc("final.rstd", "rstd", T)
        self.loss(T)
        live.free("final.x")                                   # train_step drops it
        offloaded = [i for i in range(L) if strategies[i] == "offload"]
        if offloaded:                                          # prefetched before it
            live.alloc(f"{offloaded[-1]}.h0", h)
        live.alloc("final.dh", h)                              # the final norm's backward
        live.free("loss.dhidden", f"{L}.h0", "final.rstd")     # ... their last use
        dh = "final.dh"
        for i in reversed(range(L)):
            strategy = strategies[i]
            if strategy == "offload":
                if f"{i}.h0" not in live.held:
                    live.alloc(f"{i}.h0", h)
                below = [j for j in offloaded if j < i]
                if below:
                    live.alloc(f"{below[-1]}.h0", h)           # prefetched
            if strategy != "keep":                             # block_backward's recompute
                self.block_forward(i, keep=True, reuse=True, mlp=False)
            new_dh = self.block_backward(i, dh, kept=strategy == "keep")
            live.free(dh)
            dh = new_dh
        return live.peak
