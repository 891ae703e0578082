"""lora_linear launchers in torch: y = x W^T + scale * (drop(x) A^T) B^T, W in NF4.

Same dropout draw (torch.rand on the same generator, so a replayed generator state
gives the same mask), same LoRAContext and same gradients as csrc_triton.lora_linear
(see its docstring for the derivation); the NF4 products run on the dequantized
fp32 weight and the LoRA term (and the optional frozen bias) is added in fp32 before
the single rounding. The backwards are the same with or without a bias.
"""
from __future__ import annotations

from typing import Optional

import torch

from csrc_triton.lora_linear import (FusedLoRAContext, LoRAContext, check_fused_args,
                                     check_lora_args, dropped_input, check_fused_backward_args,
                                     check_lora_backward_args, split_adapter_grads,
                                     stacked_adapters)
from csrc_triton.nf4 import NF4Weight
from csrc_triton.nf4_matmul import check_bias, check_swiglu_input

from .nf4_matmul import dense_weight, input_grad_or_swiglu, with_bias


def lora_linear_forward(x2d: torch.Tensor, w: NF4Weight, A: torch.Tensor, B: torch.Tensor,
                        scale: float, dropout: float = 0.0, training: bool = True,
                        generator: Optional[torch.Generator] = None, *,
                        dense_w: Optional[torch.Tensor] = None, path: Optional[str] = None,
                        bias: Optional[torch.Tensor] = None):
    """y2d = x2d W^T (+ bias) + scale * (drop(x2d) A^T) B^T in x2d's dtype; returns
    (y2d, LoRAContext). ``dense_w``/``path``/``bias``: see csrc_torch.nf4_matmul."""
    op = "lora_linear_forward"
    check_lora_args(op, x2d, w, A, B, scale, dropout)
    check_bias(op, bias, w.shape[0], x2d.dtype, x2d.device)
    if generator is not None and generator.device.type != x2d.device.type:
        raise ValueError(f"{op}: argument 'generator' is on {generator.device}; the dropout "
                         f"mask is drawn on x2d's device {x2d.device}")
    p = float(dropout) if training else 0.0
    keep_mask = None
    if p > 0.0:
        keep_mask = torch.rand(x2d.shape, generator=generator, device=x2d.device) >= p
    else:
        p = 0.0
    ctx = LoRAContext(keep_mask=keep_mask, dropout=p, xa=None)
    xa = (dropped_input(x2d, ctx).float() @ A.float().t()).contiguous()
    y = with_bias(x2d.float() @ dense_weight(op, w, dense_w, path).t(), bias)
    y.add_(xa @ B.float().t(), alpha=float(scale))
    return y.to(x2d.dtype), ctx._replace(xa=xa)


def lora_linear_backward(dy2d: torch.Tensor, x2d: torch.Tensor, w: NF4Weight, A: torch.Tensor,
                         B: torch.Tensor, scale: float, ctx: LoRAContext, *,
                         input_grad: bool = True, dense_w: Optional[torch.Tensor] = None,
                         path: Optional[str] = None, swiglu_input: Optional[tuple] = None):
    """(dx2d in x2d's dtype or None unless input_grad, dA in A's dtype, dB in B's dtype);
    with ``swiglu_input`` dx2d is [dgate, dup] (csrc_torch.nf4_matmul.input_grad_or_swiglu)."""
    op = "lora_linear_backward"
    check_lora_backward_args(op, dy2d, x2d, w, A, B, scale, ctx)
    check_swiglu_input(op, swiglu_input, x2d.shape[0], x2d.shape[1], x2d.dtype)
    dy32 = dy2d.float()
    g = dy32 @ B.float()                                   # dY B, [M, r]
    d_b = (dy32.t() @ ctx.xa).mul_(scale).to(B.dtype)
    d_a = (g.t() @ dropped_input(x2d, ctx).float()).mul_(scale).to(A.dtype)
    if not input_grad:
        return None, d_a, d_b
    low_rank = g @ A.float()                               # (dY B) A, [M, K]
    if ctx.keep_mask is not None:
        low_rank = low_rank.mul_(ctx.keep_mask).mul_(1.0 / (1.0 - ctx.dropout))
    dx = dy32 @ dense_weight(op, w, dense_w, path)
    dx.add_(low_rank, alpha=float(scale))
    return input_grad_or_swiglu(dx, x2d.dtype, swiglu_input), d_a, d_b


def lora_linear_fused_forward(x2d: torch.Tensor, w: NF4Weight, adapters, scale: float, *,
                              dense_w: Optional[torch.Tensor] = None, path: Optional[str] = None,
                              bias: Optional[torch.Tensor] = None):
    """y2d = x2d W^T (+ bias) + scale * (x2d A^T) B^T for a row concatenation W with the
    stacked A and block-diagonal B (csrc_triton.lora_linear), bias = the segments' biases
    concatenated; returns (y2d, FusedLoRAContext)."""
    op = "lora_linear_fused_forward"
    ranks = check_fused_args(op, x2d, w, adapters, scale)
    check_bias(op, bias, w.shape[0], x2d.dtype, x2d.device)
    lora_a, lora_b = stacked_adapters(w, adapters, ranks, torch.float32)
    x32 = x2d.float()
    xa = x32 @ lora_a.t()
    y = with_bias(x32 @ dense_weight(op, w, dense_w, path).t(), bias)
    y.add_(xa @ lora_b.t(), alpha=float(scale))
    return y.to(x2d.dtype), FusedLoRAContext(xa=xa, lora_a=lora_a, lora_b=lora_b, ranks=ranks)


def lora_linear_fused_backward(dy2d: torch.Tensor, x2d: torch.Tensor, w: NF4Weight, adapters,
                               scale: float, ctx: FusedLoRAContext, *, input_grad: bool = True,
                               dense_w: Optional[torch.Tensor] = None,
                               path: Optional[str] = None):
    """(dx2d or None unless input_grad, [(dA_s, dB_s) or None per segment])."""
    op = "lora_linear_fused_backward"
    ranks = check_fused_backward_args(op, dy2d, x2d, w, adapters, scale, ctx)
    dy32 = dy2d.float()
    g = dy32 @ ctx.lora_b
    grads = split_adapter_grads(w, adapters, ranks, (g.t() @ x2d.float()).mul_(scale),
                                (dy32.t() @ ctx.xa).mul_(scale))
    if not input_grad:
        return None, grads
    dx = dy32 @ dense_weight(op, w, dense_w, path)
    dx.add_(g @ ctx.lora_a, alpha=float(scale))
    return dx.to(x2d.dtype), grads
