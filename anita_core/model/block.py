"""One decoder block of every supported family: forward and hand-written backward, side by side.

    x1 = rmsnorm(h0) ;  q, k, v = x1 Wq^T, x1 Wk^T, x1 Wv^T   (+ LoRA each; + b_q, b_k, b_v: Qwen2)
    [q, k = rmsnorm_D(q) * q_norm, rmsnorm_D(k) * k_norm per head: Qwen3]
    q, k = rope(q, k) ;  a = attention(q, k, v) [within the layer's window: Mistral] ;  h1 = h0 + a Wo^T
    x2 = rmsnorm(h1) ;  m = silu(x2 Wg^T) * (x2 Wu^T) ;  h2 = h1 + m Wd^T

    h, saved = block_forward(h0, layer, geometry, lora, policy)
    dh0 = block_backward(dh, saved, layer, geometry, lora)

What the forward keeps for the backward is the ``policy``'s (LayerPolicy): "keep"
fills Saved with every intermediate; "recompute" and "offload" keep only the block
input (an offloaded one is moved to host memory by the caller, llama.py, and put back
in ``saved.h0`` before the backward) and the dropout generator's state, and the
backward recomputes the internals from h0 (activation checkpointing), replaying the
same LoRA dropout masks. What each buffer is, and what Saved holds per policy, is
declared in block_buffers.py, which the memory planner counts from.

The MLP is token-wise, so it runs in row chunks of at most block_buffers.mlp_chunk_rows(T)
rows: gate/up, SwiGLU and down of one chunk, its rows of h2 written in place,
before the next. Its [rows x intermediate] tensors (g, u, m and, in the
backward, d[gate, up]) then never exist for all T rows at once (at LLaMA-3-8B and
400K tokens one [T x 14336] bf16 tensor is 11.5 GB). A recomputed block's
backward reruns the MLP forward chunk by chunk, each chunk followed by its own
backward (so block_backward's recompute stops at x2); a kept block keeps each
chunk's g, u, m and LoRA contexts. Chunks run in row order both ways, so the
dropout masks are drawn, and the LoRA gradients summed, in the same order whatever
the policy. At small T there is one chunk: exactly the unchunked computation.
With several chunks the masks are drawn per chunk and the LoRA dA/dB are sums
over chunks: the same distribution and the same math, not the same bits as one chunk.

No activation is copied to be made contiguous. A fused group's [rows, sum N] output
stays one tensor and its members are column views of it: RoPE rotates the q and k
views in place, attention reads q, k, v through their token strides, SwiGLU and the
down projection's backward read gate and up through their row strides. Backwards,
attention writes dq, dk, dv into one [T, q+k+v] buffer (RoPE's backward rotates its
dq, dk views in place), which is the fused q/k/v dX's input as it stands, and the
down projection writes d[gate, up] into one [rows, 2I] buffer (on the dequantize
path its dm lands in the first half and SwiGLU's backward fills both, in place).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from anita_core.model.attention import attention_backward, attention_forward, attention_forward_for_backward
from anita_core.model.block_buffers import BlockDims, mlp_chunk_rows, new_buffer, row_chunks
from anita_core.model.ops import (rms_norm_backward, rms_norm_forward, rope_backward, rope_forward,
                                  swiglu_forward)
from anita_core.model.projector import BlockLoRA, Projector
from anita_core.model.weights import LayerWeights

# the LoRA contexts one MLP chunk leaves in Projector.contexts (fused or one by one)
MLP_CONTEXTS = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")


class Activations(str, enum.Enum):
    """What a layer's forward leaves for its backward."""
    KEEP = "keep"               # every intermediate: the backward recomputes nothing
    RECOMPUTE = "recompute"     # the block input: the backward recomputes the rest
    OFFLOAD = "offload"         # as recompute, the input waiting in pinned host memory


@dataclass(frozen=True)
class LayerPolicy:
    """How one layer trades memory for compute (a value the memory planner chooses).
    ``reuse_weights``: the forward that builds the backward's intermediates (KEEP's
    forward, or the backward's recompute) holds each dense dequantized W until its dX
    reuses it; a kept layer's backward comes much later, so the model keeps none there."""
    activations: Activations = Activations.RECOMPUTE
    reuse_weights: bool = True

    @classmethod
    def of(cls, name) -> "LayerPolicy":
        """The model's policy for a strategy name ("keep", "recompute", "offload")."""
        if isinstance(name, LayerPolicy):
            return name
        activations = Activations(name)
        return cls(activations, reuse_weights=activations is not Activations.KEEP)

    @property
    def name(self) -> str:
        return self.activations.value


@dataclass
class BlockGeometry:
    """What every block of one batch shares."""
    batch: int
    seq: int
    position_ids: torch.Tensor          # [B, S], validated against cos/sin once per batch
    # (first_key, key_end) int32 [B, S] from attention_bounds(segment_ids), or None for
    # one causal document per row: O(S), computed once per batch for every layer
    attention_bounds: Optional[Tuple[torch.Tensor, torch.Tensor]]
    cos: torch.Tensor                   # [P, D/2] fp32
    sin: torch.Tensor
    n_heads: int
    n_kv_heads: int
    eps: float                          # the RMS norms'
    # a sliding window W's bounds (attention.windowed_bounds), per distinct W among the
    # layers' attention_window (Mistral, Qwen2/3 with use_sliding_window); made once per batch
    window_bounds: Dict[int, Optional[tuple]] = field(default_factory=dict)

    def bounds_for(self, window: Optional[int]) -> Optional[tuple]:
        """The attention bounds of a layer with this window (None: full causal)."""
        return self.attention_bounds if window is None else self.window_bounds[window]


@dataclass
class MLPChunk:
    """One MLP row chunk's forward, kept for its backward: gate, up, m = silu(gate) * up
    and the LoRA contexts of gate/up/down."""
    g: torch.Tensor
    u: torch.Tensor
    m: torch.Tensor
    contexts: dict


@dataclass
class QKNormSaved:
    """Qwen3's per-head q/k RMSNorm, for its backward: the norms' inputs as rows of
    head_dim ([T*Hq, D], [T*Hkv, D]) and their fp32 rstd."""
    q_pre: torch.Tensor
    rstd_q: torch.Tensor
    k_pre: torch.Tensor
    rstd_k: torch.Tensor


@dataclass
class Saved:
    """What block_backward needs from block_forward (block_buffers.SAVED_BY_POLICY).
    A recompute/offload Saved holds h0 (None while offloaded) and the dropout
    generator's state; the rest is filled by a KEEP forward or by the backward's own
    recompute. The backward consumes it: each tensor is dropped after its last use."""
    policy: LayerPolicy
    h0: Optional[torch.Tensor]
    generator_state: Optional[torch.Tensor] = None   # replays the recompute's dropout masks
    proj: Optional[Projector] = None     # LoRA contexts (and reused dense weights)
    x1: Optional[torch.Tensor] = None
    rstd1: Optional[torch.Tensor] = None
    qr: Optional[torch.Tensor] = None   # q after RoPE [B, S, Hq, D]
    # attention_forward_for_backward's (q, k, v, out, lse, bounds): k after RoPE, v, the
    # attention output and its fp32 log-sum-exp
    attention: Optional[tuple] = None
    a: Optional[torch.Tensor] = None    # the attention output [T, Hq*D] (o_proj's input)
    h1: Optional[torch.Tensor] = None
    x2: Optional[torch.Tensor] = None
    rstd2: Optional[torch.Tensor] = None
    mlp_chunks: Optional[List[Optional[MLPChunk]]] = None   # KEEP only
    qk_norm: Optional[QKNormSaved] = None    # families with per-head q/k norms (Qwen3)
    dims: Optional[BlockDims] = field(default=None, repr=False)


def _heads(t: torch.Tensor, geo: BlockGeometry, n_heads: int) -> torch.Tensor:
    return t.view(geo.batch, geo.seq, n_heads, -1)


def block_dims(layer: LayerWeights, geo: BlockGeometry, hidden: int) -> BlockDims:
    head_dim = geo.cos.shape[1] * 2
    return BlockDims(hidden, layer_intermediate(layer), geo.n_heads, geo.n_kv_heads, head_dim)


def layer_intermediate(layer: LayerWeights) -> int:
    """The MLP's intermediate size (the down projection's input width)."""
    return layer.projections["down_proj"].shape[1]


def block_forward(h0: torch.Tensor, layer: LayerWeights, geo: BlockGeometry,
                  lora: Optional[BlockLoRA] = None, policy: Optional[LayerPolicy] = None, *,
                  attend: Optional[Callable] = None) -> Tuple[torch.Tensor, Optional[Saved]]:
    """h0 [T, H] (T = B*S) -> (h2 [T, H], Saved for block_backward). ``policy`` None:
    no backward will run (evaluation, generation), nothing is saved; ``attend(q, k, v)``
    replaces the masked attention (generation passes one that reads and writes a KV cache)."""
    if policy is None:
        return _forward(h0, layer, geo, lora, attend=attend), None
    if policy.activations is Activations.KEEP:
        saved = Saved(policy, h0, mlp_chunks=[])
        return _forward(h0, layer, geo, lora, keep=saved), saved
    replay = lora is not None and lora.draws_masks()
    saved = Saved(policy, h0, generator_state=lora.generator.get_state() if replay else None)
    return _forward(h0, layer, geo, lora), saved


def _forward(h0: torch.Tensor, layer: LayerWeights, geo: BlockGeometry, lora: Optional[BlockLoRA],
             keep: Optional[Saved] = None, attend: Optional[Callable] = None,
             mlp: bool = True) -> Optional[torch.Tensor]:
    """The block's forward; ``keep`` receives every intermediate the backward needs;
    ``mlp=False`` (the backward's recompute) stops at x2 and returns None: the
    backward reruns the MLP chunk by chunk."""
    proj = Projector(layer, lora, reuse_weights=keep is not None and keep.policy.reuse_weights)
    x1, rstd1 = rms_norm_forward(h0, layer.input_layernorm, geo.eps)
    q, k, v = proj.forward_group("qkv_proj", x1)
    qh, kh = _heads(q, geo, geo.n_heads), _heads(k, geo, geo.n_kv_heads)
    qk_saved = None
    if layer.q_norm is not None:        # Qwen3: RMSNorm over head_dim of each head, before RoPE
        qh, kh, qk_saved = _qk_norm_forward(qh, kh, layer, geo.eps)
    # q and k are rotated where they are (views of the fused output when q/k/v run fused)
    qr, kr = rope_forward(qh, kh, geo.position_ids, geo.cos, geo.sin, positions_checked=True,
                          in_place=True)
    del q, k, qh, kh
    vh = _heads(v, geo, geo.n_kv_heads)
    attention_saved = None
    bounds = geo.bounds_for(layer.attention_window)
    if attend is not None:
        attn = attend(qr, kr, vh)
    elif keep is not None:      # for the backward: keep out and lse once
        attn, attention_saved = attention_forward_for_backward(qr, kr, vh, bounds)
    else:
        attn = attention_forward(qr, kr, vh, bounds)
    a = attn.reshape(h0.shape[0], -1)
    h1 = h0 + proj.forward("o_proj", a)
    x2, rstd2 = rms_norm_forward(h1, layer.post_attention_layernorm, geo.eps)
    dims = block_dims(layer, geo, h0.shape[1])
    if keep is not None:
        keep.proj, keep.x1, keep.rstd1, keep.qr, keep.attention, keep.a = (
            proj, x1, rstd1, qr, attention_saved, a)
        keep.h1, keep.x2, keep.rstd2, keep.dims, keep.qk_norm = h1, x2, rstd2, dims, qk_saved
    if not mlp:
        return None
    del x1, qr, kr, v, vh, attn, a, attention_saved, qk_saved   # the MLP's chunks need none
    if keep is None:
        proj.contexts.clear()   # nor the attention's LoRA contexts (no backward will read them)
    kept_chunks = keep.mlp_chunks if keep is not None else None
    T = h1.shape[0]
    h2 = new_buffer("h", T, dims, h1)
    for rows in row_chunks(T, mlp_chunk_rows(T, dims.intermediate, h1.dtype)):
        g, u, m, down = _mlp_chunk_forward(proj, x2[rows])
        torch.add(h1[rows], down, out=h2[rows])
        del down
        contexts = proj.take_contexts(MLP_CONTEXTS)
        if kept_chunks is not None:
            kept_chunks.append(MLPChunk(g, u, m, contexts))
        del g, u, m, contexts
    return h2


def _qk_norm_forward(qh: torch.Tensor, kh: torch.Tensor, layer: LayerWeights, eps: float):
    """q = rmsnorm_D(q) * q_norm and k = rmsnorm_D(k) * k_norm per head, written back
    over the [B, S, H, D] views (so k and v keep one token stride for the attention,
    and RoPE rotates them in place as for LLaMA); the norms' inputs are kept as rows
    of head_dim for the backward (one copy each: the norm reads contiguous rows)."""
    d = qh.shape[-1]
    kept = []
    for heads, weight in ((qh, layer.q_norm), (kh, layer.k_norm)):
        rows = torch.empty((heads.numel() // d, d), dtype=heads.dtype, device=heads.device)
        rows.view(heads.shape).copy_(heads)
        normed, rstd = rms_norm_forward(rows, weight, eps)
        heads.copy_(normed.view(heads.shape))
        del normed
        kept += [rows, rstd]
    return qh, kh, QKNormSaved(*kept)


def _qk_norm_backward(dq: torch.Tensor, dk: torch.Tensor, saved: QKNormSaved,
                      layer: LayerWeights) -> None:
    """dL/d(q, k before the norms), written over dq, dk (views of the fused dq|dk|dv
    buffer or tensors of their own): dx = rstd (w dy - x^ mean(w dy x^)), the norm
    weights frozen (no dweight)."""
    d = dq.shape[-1]
    for dy, x, w, rstd in ((dq, saved.q_pre, layer.q_norm, saved.rstd_q),
                           (dk, saved.k_pre, layer.k_norm, saved.rstd_k)):
        dx, _ = rms_norm_backward(dy.reshape(-1, d), x, w, rstd, False)
        dy.copy_(dx.view(dy.shape))


def _mlp_chunk_forward(proj: Projector, x2: torch.Tensor):
    """(gate, up, m = silu(gate) * up, down(m)) of one chunk of rows of x2."""
    g, u = proj.forward_group("gate_up_proj", x2)
    m = swiglu_forward(g, u)
    return g, u, m, proj.forward("down_proj", m)


def block_backward(dh2: torch.Tensor, s: Saved, layer: LayerWeights, geo: BlockGeometry,
                   lora: Optional[BlockLoRA] = None) -> torch.Tensor:
    """Given dL/dh2 and the block's Saved, add dL/dA and dL/dB into the LoRA tensors'
    .grad and return dL/dh0 (norm and NF4 weights are frozen). A recompute/offload
    Saved is first completed from h0 (the recompute stops at x2; the MLP reruns per
    chunk just before each chunk's backward), the dropout generator set back to where
    the forward left it so the masks are the same. ``s`` is consumed: every
    intermediate, and each projection's dense weight, is freed after its last use."""
    h0 = s.h0
    if h0 is None:
        raise ValueError("block_backward: the Saved block input is missing (an offloaded "
                         "input must be fetched back into saved.h0 first)")
    kept_chunks = s.mlp_chunks
    if s.policy.activations is not Activations.KEEP:
        if s.generator_state is not None:
            lora.generator.set_state(s.generator_state)
        _forward(h0, layer, geo, lora, keep=s, mlp=False)
        kept_chunks = None
    proj, dims = s.proj, s.dims
    x2, h1, rstd2 = s.x2, s.h1, s.rstd2
    s.h0 = s.proj = s.x2 = s.h1 = s.rstd2 = s.mlp_chunks = None

    # MLP, chunk by chunk:  h2 = h1 + down(swiglu(gate(x2), up(x2))),  x2 = rmsnorm(h1)
    T = h0.shape[0]
    chunks = row_chunks(T, mlp_chunk_rows(T, dims.intermediate, h1.dtype))
    dh1 = new_buffer("h", T, dims, dh2)
    for i, rows in enumerate(chunks):
        last = i == len(chunks) - 1
        if kept_chunks is None:
            g, u, m, down = _mlp_chunk_forward(proj, x2[rows])
            del down            # only the backward's inputs are wanted
        else:
            chunk, kept_chunks[i] = kept_chunks[i], None
            g, u, m = chunk.g, chunk.u, chunk.m
            proj.contexts.update(chunk.contexts)
            del chunk
        d_gate_up = proj.backward("down_proj", dh2[rows], m, swiglu_input=(g, u), release=last)
        del g, u, m
        dx2 = proj.backward_group("gate_up_proj", d_gate_up, x2[rows], release=last)
        del d_gate_up
        dx2_h1, _ = rms_norm_backward(dx2, h1[rows], layer.post_attention_layernorm, rstd2[rows],
                                      False)
        del dx2
        torch.add(dh2[rows], dx2_h1, out=dh1[rows])
        del dx2_h1
    del x2, h1, rstd2, kept_chunks

    # attention:  h1 = h0 + o(attn(rope(q(x1)), rope(k(x1)), v(x1))),  x1 = rmsnorm(h0)
    a, s.a = s.a, None
    da = proj.backward("o_proj", dh1, a)
    del a
    qr, attention_saved = s.qr, s.attention
    s.qr = s.attention = None
    kr, vh = attention_saved[1], attention_saved[2]
    # dq, dk, dv side by side (fused q/k/v): the fused dX's input as it stands
    d_qkv = new_buffer("qkv", T, dims, dh1) if proj.fused("qkv_proj") else None
    into = None
    if d_qkv is not None:
        widths = (qr.shape[2] * qr.shape[3], kr.shape[2] * kr.shape[3], vh.shape[2] * vh.shape[3])
        into = tuple(part.view(like.shape) for part, like in
                     zip(d_qkv.split(widths, dim=1), (qr, kr, vh)))
    dqr, dkr, dvh = attention_backward(da.view_as(qr), attention_saved, into=into)
    del da, qr, kr, vh, attention_saved, into
    dq, dk = rope_backward(dqr, dkr, geo.position_ids, geo.cos, geo.sin, positions_checked=True,
                           in_place=True)
    del dqr, dkr
    if s.qk_norm is not None:           # through the per-head norms, in dq, dk's place
        _qk_norm_backward(dq, dk, s.qk_norm, layer)
        s.qk_norm = None
    dys = d_qkv if d_qkv is not None else (dq.reshape(T, -1), dk.reshape(T, -1),
                                           dvh.reshape(T, -1))
    x1, rstd1 = s.x1, s.rstd1
    s.x1 = s.rstd1 = None
    dx1 = proj.backward_group("qkv_proj", dys, x1)
    del dq, dk, dvh, dys, d_qkv, x1
    dx1_h0, _ = rms_norm_backward(dx1, h0, layer.input_layernorm, rstd1, False)
    del dx1
    dh1 += dx1_h0               # dh1 is ours: dL/dh0 = dh1 + dx1_h0 in place
    return dh1
