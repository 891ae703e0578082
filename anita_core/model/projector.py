"""One block's projections: NF4 matmuls (+ LoRA), fused where the layer allows, and the
LoRA contexts and dense weights the block's backward needs (block.py's helper). A
family's frozen projection bias (Qwen2's q/k/v: LayerWeights.biases) rides in the
forward matmul; it changes no backward (b holds no x, and it is not trained)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from anita_core.model.ops import (choose_path, dequantize_for_matmul, lora_linear_backward,
                                  lora_linear_forward, lora_linear_fused_backward,
                                  lora_linear_fused_forward, nf4_matmul_backward_input,
                                  nf4_matmul_forward)
from anita_core.model.weights import FUSED_GROUPS, LayerWeights


@dataclass
class BlockLoRA:
    """The adapters of one block as the kernels need them (absent keys: no adapter)."""
    weights: Dict[str, tuple]           # projection -> (A, B)
    scale: float
    dropout: float
    training: bool
    generator: Optional[torch.Generator]

    def draws_masks(self) -> bool:
        return self.training and self.dropout > 0 and self.generator is not None


class Projector:
    """Runs one block's projections through NF4 (+ LoRA) and keeps the LoRA contexts
    the backward needs.

    Projections that read the same input (weights.FUSED_GROUPS: q/k/v, gate/up)
    run as ONE NF4 matmul on the layer's row concatenation of their weights, with
    one product of the input and their stacked LoRA A (lora_linear_fused_*), when
    the layer holds that concatenation and no dropout mask is drawn; with dropout
    (PEFT draws an independent mask per projection, in q, k, v order) they run one
    by one, exactly as before.

    With ``reuse_weights`` (LayerPolicy.reuse_weights) a weight whose M takes the
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
        bias = self.layer.biases.get(name)
        if ab is None:
            return nf4_matmul_forward(x, w, dense_w=dense_w, bias=bias)
        y, ctx = lora_linear_forward(x, w, *ab, self.lora.scale, self.lora.dropout,
                                     self.lora.training, self.lora.generator, dense_w=dense_w,
                                     bias=bias)
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
        bias = self.layer.bias_of(members)      # [b_q; b_k; b_v] for Qwen2, else None
        if not any(adapters):
            y = nf4_matmul_forward(x, w, dense_w=dense_w, bias=bias)
        else:
            y, self.contexts[group] = lora_linear_fused_forward(x, w, adapters, self.lora.scale,
                                                                dense_w=dense_w, bias=bias)
        return list(y.split(w.segment_rows, dim=1))

    def fused(self, group: str) -> bool:
        """Whether FUSED_GROUPS[group] runs as one matmul (then its backward takes the
        members' dY side by side in one [rows, sum N] tensor)."""
        return self._fused(group, 0)

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
