"""One LLaMA decoder block: forward and hand-written backward, side by side.

    x1 = rmsnorm(h0) ;  q, k, v = x1 Wq^T, x1 Wk^T, x1 Wv^T   (+ LoRA each)
    q, k = rope(q, k) ;  a = attention(q, k, v) ;  h1 = h0 + a Wo^T
    x2 = rmsnorm(h1) ;  m = silu(x2 Wg^T) * (x2 Wu^T) ;  h2 = h1 + m Wd^T

block_backward recomputes the internals from the block input h0 (activation
checkpointing) and replays the LoRA dropout masks by restoring the dropout
generator's state; block_forward_saving + block_backward_saved are the two
halves, for a caller that keeps a block's activations instead of recomputing.
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

    def _fused(self, group: str) -> bool:
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
        """The outputs of FUSED_GROUPS[group]'s projections of x, in order (contiguous)."""
        members = FUSED_GROUPS[group]
        if not self._fused(group):
            return [self.forward(m, x) for m in members]
        w = self.layer.fused[group]
        dense_w = self._dense_weight(group, x.shape[0], x.dtype)
        adapters = [self._adapter(m) for m in members]
        if not any(adapters):
            y = nf4_matmul_forward(x, w, dense_w=dense_w)
        else:
            y, self.contexts[group] = lora_linear_fused_forward(x, w, adapters, self.lora.scale,
                                                                dense_w=dense_w)
        return [part.contiguous() for part in y.split(w.segment_rows, dim=1)]

    def backward(self, name: str, dy: torch.Tensor, x: torch.Tensor,
                 swiglu_input: Optional[tuple] = None) -> torch.Tensor:
        """dL/dx of projection ``name`` (with ``swiglu_input`` = (gate, up) and
        x = silu(gate) * up: dL/d[gate, up] instead, from the matmul's epilogue)."""
        w = self.layer.projections[name]
        dense_w = self._dense_weight(name, dy.shape[0], dy.dtype)
        if self.dense is not None:
            self.dense.pop(name, None)      # this projection is done: free its dense W
        ab = self._adapter(name)
        if ab is None:
            return nf4_matmul_backward_input(dy, w, dense_w=dense_w, swiglu_input=swiglu_input)
        A, B = self.lora.weights[name]
        dx, dA, dB = lora_linear_backward(dy, x, w, *ab, self.lora.scale, self.contexts[name],
                                          dense_w=dense_w, swiglu_input=swiglu_input)
        _accumulate_grad(A, dA)
        _accumulate_grad(B, dB)
        return dx

    def backward_group(self, group: str, dys, x: torch.Tensor) -> torch.Tensor:
        """dL/dx of FUSED_GROUPS[group]'s projections given dL/d(each output) ``dys``
        (a sequence, or one tensor of them side by side)."""
        members = FUSED_GROUPS[group]
        if isinstance(dys, torch.Tensor) and not self._fused(group):
            dys = dys.split([self.layer.projections[m].shape[0] for m in members], dim=1)
        if not self._fused(group):
            dx = self.backward(members[0], dys[0].contiguous(), x)
            for m, dy in zip(members[1:], dys[1:]):
                dx = dx + self.backward(m, dy.contiguous(), x)
            return dx
        w = self.layer.fused[group]
        dy = dys if isinstance(dys, torch.Tensor) else torch.cat(dys, dim=1)
        dense_w = self._dense_weight(group, dy.shape[0], dy.dtype)
        if self.dense is not None:
            self.dense.pop(group, None)
        adapters = [self._adapter(m) for m in members]
        if not any(adapters):
            return nf4_matmul_backward_input(dy, w, dense_w=dense_w)
        dx, grads = lora_linear_fused_backward(dy, x, w, adapters, self.lora.scale,
                                               self.contexts[group], dense_w=dense_w)
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
                  _reuse_weights: bool = True) -> torch.Tensor:
    """h0 [T, H] (T = B*S) -> h2 [T, H]. ``attend(q, k, v)`` replaces the masked
    attention (generation passes one that reads and writes a KV cache); ``_keep``
    (used by block_backward) receives every intermediate the backward needs."""
    proj = _Projector(layer, lora, reuse_weights=_keep is not None and _reuse_weights)
    x1, rstd1 = rms_norm_forward(h0, layer.input_layernorm, eps)
    q, k, v = proj.forward_group("qkv_proj", x1)
    qr, kr = rope_forward(_heads(q, geo, n_heads), _heads(k, geo, n_kv_heads), geo.position_ids,
                          geo.cos, geo.sin, positions_checked=True)
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
    g, u = proj.forward_group("gate_up_proj", x2)
    m = swiglu_forward(g, u)
    h2 = h1 + proj.forward("down_proj", m)
    if _keep is not None:
        _keep.update(proj=proj, x1=x1, rstd1=rstd1, qr=qr, attention_saved=attention_saved, a=a,
                     h1=h1, x2=x2, rstd2=rstd2, g=g, u=u, m=m)
    return h2


def block_forward_saving(h0: torch.Tensor, layer: LayerWeights, geo: BlockGeometry, n_heads: int,
                         n_kv_heads: int, eps: float,
                         lora: Optional[BlockLoRA] = None,
                         reuse_weights: bool = True) -> Tuple[torch.Tensor, dict]:
    """block_forward that also returns every intermediate block_backward_saved needs
    (the recompute of block_backward, or a forward whose activations are kept).
    ``reuse_weights=False`` (a kept layer, whose backward comes much later) keeps no
    dense dequantized W between the forward and the backward."""
    saved: dict = {"h0": h0}
    h2 = block_forward(h0, layer, geo, n_heads, n_kv_heads, eps, lora, _keep=saved,
                       _reuse_weights=reuse_weights)
    return h2, saved


def block_backward(dh2: torch.Tensor, h0: torch.Tensor, layer: LayerWeights, geo: BlockGeometry,
                   n_heads: int, n_kv_heads: int, eps: float,
                   lora: Optional[BlockLoRA] = None) -> torch.Tensor:
    """Given dL/dh2, recompute the block from h0, add dL/dA and dL/dB into the LoRA
    tensors' .grad, and return dL/dh0. Norm weights and NF4 weights are frozen."""
    _, saved = block_forward_saving(h0, layer, geo, n_heads, n_kv_heads, eps, lora)
    return block_backward_saved(dh2, saved, layer, geo)


def block_backward_saved(dh2: torch.Tensor, s: dict, layer: LayerWeights,
                         geo: BlockGeometry) -> torch.Tensor:
    """The backward of one block from the intermediates block_forward_saving kept
    (``s`` is consumed: its dense weights are freed as each projection finishes)."""
    h0 = s["h0"]
    proj: _Projector = s["proj"]

    # MLP:  h2 = h1 + down(swiglu(gate(x2), up(x2))),  x2 = rmsnorm(h1)
    d_gate_up = proj.backward("down_proj", dh2, s["m"], swiglu_input=(s["g"], s["u"]))
    dx2 = proj.backward_group("gate_up_proj", d_gate_up, s["x2"])
    dx2_h1, _ = rms_norm_backward(dx2, s["h1"], layer.post_attention_layernorm, s["rstd2"], False)
    dh1 = dh2 + dx2_h1

    # attention:  h1 = h0 + o(attn(rope(q(x1)), rope(k(x1)), v(x1))),  x1 = rmsnorm(h0)
    da = proj.backward("o_proj", dh1, s["a"])
    dqr, dkr, dvh = attention_backward(da.view_as(s["qr"]), s["attention_saved"])
    dq, dk = rope_backward(dqr.contiguous(), dkr.contiguous(), geo.position_ids, geo.cos, geo.sin,
                           positions_checked=True)
    T = h0.shape[0]
    dx1 = proj.backward_group("qkv_proj", (dq.reshape(T, -1), dk.reshape(T, -1),
                                           dvh.reshape(T, -1)), s["x1"])
    dx1_h0, _ = rms_norm_backward(dx1, h0, layer.input_layernorm, s["rstd1"], False)
    return dh1 + dx1_h0
