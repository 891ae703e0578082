"""One LLaMA decoder block: forward and hand-written backward, side by side.

    x1 = rmsnorm(h0) ;  q, k, v = x1 Wq^T, x1 Wk^T, x1 Wv^T   (+ LoRA each)
    q, k = rope(q, k) ;  a = attention(q, k, v) ;  h1 = h0 + a Wo^T
    x2 = rmsnorm(h1) ;  m = silu(x2 Wg^T) * (x2 Wu^T) ;  h2 = h1 + m Wd^T

block_backward recomputes the internals from the block input h0 (activation
checkpointing) and replays the LoRA dropout masks by restoring the dropout
generator's state; block_forward_saving + block_backward_saved are the two
halves, for a caller that keeps a block's activations instead of recomputing.

The MLP is token-wise, so it runs in row chunks of at most mlp_chunk_rows(T)
rows: gate/up, SwiGLU and down of one chunk, its rows of h2 written in place,
before the next. Its [rows x intermediate] tensors (g, u, m and, in the
backward, d[gate, up]) then never exist for all T rows at once (at LLaMA-3-8B and
400K tokens one [T x 14336] bf16 tensor is 11.5 GB). A recomputed block's
backward reruns the MLP forward chunk by chunk, each chunk followed by its own
backward (so block_backward's recompute stops at x2); a kept block keeps each
chunk's g, u, m and LoRA contexts. Chunks run in row order both ways, so the
dropout masks are drawn, and the LoRA gradients summed, in the same order whatever
the strategy. At small T there is one chunk: exactly the unchunked computation.
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

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from anita_core.model.attention import attention_backward, attention_forward, attention_forward_for_backward
from anita_core.model.ops import (choose_path, dequantize_for_matmul, lora_linear_backward,
                                  lora_linear_forward, lora_linear_fused_backward,
                                  lora_linear_fused_forward, nf4_matmul_backward_input,
                                  nf4_matmul_forward, rms_norm_backward, rms_norm_forward,
                                  rope_backward, rope_forward, swiglu_forward)
from anita_core.model.weights import FUSED_GROUPS, LayerWeights

# the largest [rows x intermediate] MLP tensor of one chunk, in bytes (like the fused
# loss's 256 MiB logits chunk): at LLaMA-3-8B in bf16, 9,344 rows; every chunk
# tensor of the backward together stays near 2 GiB whatever T is
MLP_CHUNK_BYTES = 256 * 2**20
MLP_CHUNK_ALIGN = 64        # rows: whole row tiles of the matmul kernels
# the LoRA contexts one MLP chunk leaves in _Projector.contexts (fused or one by one)
MLP_CONTEXTS = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")


def mlp_chunk_rows(tokens: int, intermediate: int, dtype: torch.dtype) -> int:
    """Rows of one MLP chunk for a T = ``tokens`` block: at most MLP_CHUNK_BYTES per
    [rows x intermediate] tensor, a multiple of MLP_CHUNK_ALIGN when that is at least
    one tile, the chunks of equal size up to the last (no tiny tail); T itself when
    that fits (one chunk)."""
    per_row = intermediate * torch.empty((), dtype=dtype).element_size()
    limit = max(1, MLP_CHUNK_BYTES // per_row)
    if limit >= MLP_CHUNK_ALIGN:
        limit -= limit % MLP_CHUNK_ALIGN
    if tokens <= limit:
        return max(tokens, 1)
    n_chunks = -(-tokens // limit)
    rows = -(-tokens // n_chunks)
    if limit >= MLP_CHUNK_ALIGN:
        rows = min(limit, -(-rows // MLP_CHUNK_ALIGN) * MLP_CHUNK_ALIGN)
    return rows


def _row_chunks(tokens: int, rows: int) -> List[slice]:
    return [slice(i, min(i + rows, tokens)) for i in range(0, tokens, rows)] or [slice(0, 0)]


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


@dataclass
class BlockLoRA:
    """The adapters of one block as the kernels need them (absent keys: no adapter)."""
    weights: Dict[str, tuple]           # projection -> (A, B)
    scale: float
    dropout: float
    training: bool
    generator: Optional[torch.Generator]


class _Projector:
    """Runs one block's projections through NF4 (+ LoRA) and keeps the LoRA contexts
    the backward needs.

    Projections that read the same input (weights.FUSED_GROUPS: q/k/v, gate/up)
    run as ONE NF4 matmul on the layer's row concatenation of their weights, with
    one product of the input and their stacked LoRA A (lora_linear_fused_*), when
    the layer holds that concatenation and no dropout mask is drawn; with dropout
    (PEFT draws an independent mask per projection, in q, k, v order) they run one
    by one, exactly as before.

    With ``reuse_weights`` (block_backward's recompute) a weight whose M takes the
    dequantize path is dequantized once: the recompute's forward keeps the dense W
    and the backward's dX reuses it, then drops it, so every dense W lives only
    while its layer is being differentiated (at LLaMA-3-8B, one layer's seven
    projections in bf16: 218M elements, 416 MiB at most)."""

    def __init__(self, layer: LayerWeights, lora: Optional[BlockLoRA], reuse_weights: bool = False):
        self.layer, self.lora, self.contexts = layer, lora, {}
        self.dense: Optional[Dict[str, torch.Tensor]] = {} if reuse_weights else None

    def _weight(self, name: str):
        return self.layer.fused[name] if name in self.layer.fused else self.layer.projections[name]

    def _dense_weight(self, name: str, m: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        if self.dense is None or choose_path("block", m, dtype=dtype) != "dequant":
            return None
        if name not in self.dense:
            self.dense[name] = dequantize_for_matmul(self._weight(name), dtype)
        return self.dense[name]

    def _adapter(self, name: str) -> Optional[tuple]:
        ab = self.lora.weights.get(name) if self.lora is not None else None
        return None if ab is None else (ab[0].detach(), ab[1].detach())

    def _fused(self, group: str, rows: int) -> bool:
        if group not in self.layer.fused:
            return False
        lora = self.lora
        drops = lora is not None and lora.training and lora.dropout > 0
        return not (drops and any(m in lora.weights for m in FUSED_GROUPS[group]))

    def forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w = self.layer.projections[name]
        dense_w = self._dense_weight(name, x.shape[0], x.dtype)
        ab = self._adapter(name)
        if ab is None:
            return nf4_matmul_forward(x, w, dense_w=dense_w)
        y, ctx = lora_linear_forward(x, w, *ab, self.lora.scale, self.lora.dropout,
                                     self.lora.training, self.lora.generator, dense_w=dense_w)
        self.contexts[name] = ctx
        return y

    def forward_group(self, group: str, x: torch.Tensor) -> List[torch.Tensor]:
        """The outputs of FUSED_GROUPS[group]'s projections of x, in order: column views
        of one [rows, sum N] tensor when the group runs fused, else each its own."""
        members = FUSED_GROUPS[group]
        if not self._fused(group, x.shape[0]):
            return [self.forward(m, x) for m in members]
        w = self.layer.fused[group]
        dense_w = self._dense_weight(group, x.shape[0], x.dtype)
        adapters = [self._adapter(m) for m in members]
        if not any(adapters):
            y = nf4_matmul_forward(x, w, dense_w=dense_w)
        else:
            y, self.contexts[group] = lora_linear_fused_forward(x, w, adapters, self.lora.scale,
                                                                dense_w=dense_w)
        return list(y.split(w.segment_rows, dim=1))

    def gradient_buffer(self, group: str, like: torch.Tensor) -> Optional[torch.Tensor]:
        """An uninitialized [rows of ``like``, sum N] tensor for dL/d(the group's outputs) side
        by side, when the group runs fused (its backward then takes it whole); else None."""
        if not self._fused(group, like.shape[0]):
            return None
        return torch.empty(like.shape[0], self.layer.fused[group].shape[0], dtype=like.dtype,
                           device=like.device)

    def take_contexts(self, names) -> dict:
        """Remove and return the LoRA contexts of ``names`` (one MLP chunk's)."""
        return {n: self.contexts.pop(n) for n in names if n in self.contexts}

    def _release(self, name: str, release: bool) -> None:
        if self.dense is not None and release:
            self.dense.pop(name, None)      # this projection is done: free its dense W

    def backward(self, name: str, dy: torch.Tensor, x: torch.Tensor,
                 swiglu_input: Optional[tuple] = None, release: bool = True) -> torch.Tensor:
        """dL/dx of projection ``name`` (with ``swiglu_input`` = (gate, up) and
        x = silu(gate) * up: dL/d[gate, up] instead, from the matmul's epilogue).
        Its LoRA context is consumed; ``release``: its dense W too (the last chunk)."""
        w = self.layer.projections[name]
        dense_w = self._dense_weight(name, dy.shape[0], dy.dtype)
        self._release(name, release)
        ab = self._adapter(name)
        if ab is None:
            return nf4_matmul_backward_input(dy, w, dense_w=dense_w, swiglu_input=swiglu_input)
        A, B = self.lora.weights[name]
        dx, dA, dB = lora_linear_backward(dy, x, w, *ab, self.lora.scale, self.contexts.pop(name),
                                          dense_w=dense_w, swiglu_input=swiglu_input)
        _accumulate_grad(A, dA)
        _accumulate_grad(B, dB)
        return dx

    def backward_group(self, group: str, dys, x: torch.Tensor, release: bool = True) -> torch.Tensor:
        """dL/dx of FUSED_GROUPS[group]'s projections given dL/d(each output) ``dys``
        (a sequence, or one tensor of them side by side); ``release`` as in backward."""
        members = FUSED_GROUPS[group]
        fused = self._fused(group, x.shape[0])
        if isinstance(dys, torch.Tensor) and not fused:
            dys = dys.split([self.layer.projections[m].shape[0] for m in members], dim=1)
        if not fused:
            dx = self.backward(members[0], dys[0].contiguous(), x, release=release)
            for m, dy in zip(members[1:], dys[1:]):
                dx = dx + self.backward(m, dy.contiguous(), x, release=release)
            return dx
        w = self.layer.fused[group]
        dy = dys if isinstance(dys, torch.Tensor) else torch.cat(dys, dim=1)
        dense_w = self._dense_weight(group, dy.shape[0], dy.dtype)
        self._release(group, release)
        adapters = [self._adapter(m) for m in members]
        if not any(adapters):
            return nf4_matmul_backward_input(dy, w, dense_w=dense_w)
        dx, grads = lora_linear_fused_backward(dy, x, w, adapters, self.lora.scale,
                                               self.contexts.pop(group), dense_w=dense_w)
        for m, grad in zip(members, grads):
            if grad is not None:
                A, B = self.lora.weights[m]
                _accumulate_grad(A, grad[0])
                _accumulate_grad(B, grad[1])
        return dx


def _accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad.clone()
    else:
        param.grad.add_(grad)


def _heads(t: torch.Tensor, geo: BlockGeometry, n_heads: int) -> torch.Tensor:
    return t.view(geo.batch, geo.seq, n_heads, -1)


def block_forward(h0: torch.Tensor, layer: LayerWeights, geo: BlockGeometry, n_heads: int,
                  n_kv_heads: int, eps: float, lora: Optional[BlockLoRA] = None,
                  attend: Optional[Callable] = None, _keep: Optional[dict] = None,
                  _reuse_weights: bool = True, _mlp: bool = True) -> Optional[torch.Tensor]:
    """h0 [T, H] (T = B*S) -> h2 [T, H]. ``attend(q, k, v)`` replaces the masked
    attention (generation passes one that reads and writes a KV cache); ``_keep``
    (used by block_backward) receives every intermediate the backward needs;
    ``_mlp=False`` (block_backward's recompute) stops at x2 and returns None: the
    backward reruns the MLP chunk by chunk."""
    proj = _Projector(layer, lora, reuse_weights=_keep is not None and _reuse_weights)
    x1, rstd1 = rms_norm_forward(h0, layer.input_layernorm, eps)
    q, k, v = proj.forward_group("qkv_proj", x1)
    # q and k are rotated where they are (views of the fused output when q/k/v run fused)
    qr, kr = rope_forward(_heads(q, geo, n_heads), _heads(k, geo, n_kv_heads), geo.position_ids,
                          geo.cos, geo.sin, positions_checked=True, in_place=True)
    del q, k
    vh = _heads(v, geo, n_kv_heads)
    attention_saved = None
    if attend is not None:
        attn = attend(qr, kr, vh)
    elif _keep is not None:     # recompute for the backward: keep out and lse once
        attn, attention_saved = attention_forward_for_backward(qr, kr, vh, geo.attention_bounds)
    else:
        attn = attention_forward(qr, kr, vh, geo.attention_bounds)
    a = attn.reshape(h0.shape[0], -1)
    h1 = h0 + proj.forward("o_proj", a)
    x2, rstd2 = rms_norm_forward(h1, layer.post_attention_layernorm, eps)
    if _keep is not None:
        _keep.update(proj=proj, x1=x1, rstd1=rstd1, qr=qr, attention_saved=attention_saved, a=a,
                     h1=h1, x2=x2, rstd2=rstd2)
    if not _mlp:
        return None
    del x1, qr, kr, v, vh, attn, a, attention_saved     # the MLP's chunks need none of them
    if _keep is None:
        proj.contexts.clear()   # nor the attention's LoRA contexts (no backward will read them)
    kept_chunks = _keep.setdefault("mlp_chunks", []) if _keep is not None else None
    h2 = torch.empty_like(h1)
    for rows in _row_chunks(h1.shape[0], mlp_chunk_rows(h1.shape[0], layer_intermediate(layer),
                                                        h1.dtype)):
        g, u, m, down = _mlp_chunk_forward(proj, x2[rows])
        torch.add(h1[rows], down, out=h2[rows])
        del down
        contexts = proj.take_contexts(MLP_CONTEXTS)
        if kept_chunks is not None:
            kept_chunks.append((g, u, m, contexts))
        del g, u, m, contexts
    return h2


def layer_intermediate(layer: LayerWeights) -> int:
    """The MLP's intermediate size (the down projection's input width)."""
    return layer.projections["down_proj"].shape[1]


def _mlp_chunk_forward(proj: _Projector, x2: torch.Tensor):
    """(gate, up, m = silu(gate) * up, down(m)) of one chunk of rows of x2."""
    g, u = proj.forward_group("gate_up_proj", x2)
    m = swiglu_forward(g, u)
    return g, u, m, proj.forward("down_proj", m)


def block_forward_saving(h0: torch.Tensor, layer: LayerWeights, geo: BlockGeometry, n_heads: int,
                         n_kv_heads: int, eps: float,
                         lora: Optional[BlockLoRA] = None,
                         reuse_weights: bool = True) -> Tuple[torch.Tensor, dict]:
    """block_forward that also returns every intermediate block_backward_saved needs
    (a forward whose activations are kept: each MLP chunk's g, u, m and LoRA
    contexts included). ``reuse_weights=False`` (a kept layer, whose backward comes
    much later) keeps no dense dequantized W between the forward and the backward."""
    saved: dict = {"h0": h0}
    h2 = block_forward(h0, layer, geo, n_heads, n_kv_heads, eps, lora, _keep=saved,
                       _reuse_weights=reuse_weights)
    return h2, saved


def block_backward(dh2: torch.Tensor, h0: torch.Tensor, layer: LayerWeights, geo: BlockGeometry,
                   n_heads: int, n_kv_heads: int, eps: float,
                   lora: Optional[BlockLoRA] = None) -> torch.Tensor:
    """Given dL/dh2, recompute the block from h0, add dL/dA and dL/dB into the LoRA
    tensors' .grad, and return dL/dh0. Norm weights and NF4 weights are frozen.
    The recompute stops at x2; block_backward_saved reruns the MLP per chunk."""
    saved = {"h0": h0}
    block_forward(h0, layer, geo, n_heads, n_kv_heads, eps, lora, _keep=saved, _mlp=False)
    return block_backward_saved(dh2, saved, layer, geo)


def block_backward_saved(dh2: torch.Tensor, s: dict, layer: LayerWeights,
                         geo: BlockGeometry) -> torch.Tensor:
    """The backward of one block from the intermediates block_forward_saving kept, or
    block_backward's recompute (no "mlp_chunks": each MLP chunk's forward reruns just
    before its backward). ``s`` is consumed: every intermediate, and each projection's
    dense weight, is freed after its last use."""
    h0 = s.pop("h0")
    proj: _Projector = s.pop("proj")
    x2, h1, rstd2 = s.pop("x2"), s.pop("h1"), s.pop("rstd2")
    kept_chunks = s.pop("mlp_chunks", None)

    # MLP, chunk by chunk:  h2 = h1 + down(swiglu(gate(x2), up(x2))),  x2 = rmsnorm(h1)
    T = h0.shape[0]
    chunks = _row_chunks(T, mlp_chunk_rows(T, layer_intermediate(layer), h1.dtype))
    dh1 = torch.empty_like(dh2)
    for i, rows in enumerate(chunks):
        last = i == len(chunks) - 1
        if kept_chunks is None:
            g, u, m, down = _mlp_chunk_forward(proj, x2[rows])
            del down            # only the backward's inputs are wanted
        else:
            g, u, m, contexts = kept_chunks[i]
            kept_chunks[i] = None
            proj.contexts.update(contexts)
            del contexts
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
    da = proj.backward("o_proj", dh1, s.pop("a"))
    qr, attention_saved = s.pop("qr"), s.pop("attention_saved")
    kr, vh = attention_saved[1], attention_saved[2]
    d_qkv = proj.gradient_buffer("qkv_proj", dh1)     # dq, dk, dv side by side (fused q/k/v)
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
    dys = d_qkv if d_qkv is not None else (dq.reshape(T, -1), dk.reshape(T, -1),
                                           dvh.reshape(T, -1))
    dx1 = proj.backward_group("qkv_proj", dys, s.pop("x1"))
    del dq, dk, dvh, dys, d_qkv
    dx1_h0, _ = rms_norm_backward(dx1, h0, layer.input_layernorm, s.pop("rstd1"), False)
    del dx1
    dh1 += dx1_h0               # dh1 is ours: dL/dh0 = dh1 + dx1_h0 in place
    return dh1
