"""lora_linear: y = x W^T + scale * (drop(x) A^T) B^T with W frozen in NF4.

The big matmuls (x W^T forward, dY W backward) run on ``nf4_matmul``'s path for
this M: the fused NF4 kernels, with the LoRA term added in their epilogues on
the output tile already in registers, or dequantize + cuBLAS, with the LoRA
term added by one addmm. The rank-r matmuls (xa = drop(x) A^T, g = dY B, dA,
dB) run in torch in the compute dtype (nf4_dense.compute_dtype: the
activations' fp16/bf16 on a GPU, on the tensor cores with fp32 accumulation, as
PEFT computes them under bf16; fp32 under the interpreter), so no fp32 copy of
an activation is made; dA and dB are scaled in fp32 and returned in the
adapters' dtype (LoRA masters are usually fp32 while x is fp16/bf16).

Backward (W frozen), with xd = drop(x) = x * keep / (1 - p) and xa = xd A^T:
  dB = scale * dY^T xa
  dA = scale * (dY B)^T xd
  dX = dY W + scale * keep / (1 - p) * ((dY B) A)
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from .nf4 import NF4Weight
from .nf4_dense import compute_dtype
from .nf4_matmul import (LoraBackwardEpilogue, LoraForwardEpilogue, launch_backward_input,
                         launch_forward)
from .nf4_operand import check_nf4_weight


class LoRAContext(NamedTuple):
    """What lora_linear_backward needs besides x, W, A, B."""
    keep_mask: Optional[torch.Tensor]  # bool [M, K], True = kept; None when no dropout ran
    dropout: float                     # the p actually applied (0.0 without dropout)
    xa: torch.Tensor                   # [M, r] = drop(x) A^T, in the compute dtype


def _check_lora_args(op: str, x2d, w: NF4Weight, A, B, scale, dropout) -> None:
    check_nf4_weight(op, w)
    N, K = w.shape
    check_tensor(op, "x2d", x2d, dtypes=FLOAT_DTYPES, ndim=2, shape=(None, K))
    check_tensor(op, "A", A, dtypes=FLOAT_DTYPES, ndim=2, shape=(None, K))
    rank = A.shape[0]
    if rank < 1:
        raise ValueError(f"{op}: argument 'A' has rank {rank} rows; expected at least 1")
    check_tensor(op, "B", B, dtypes=FLOAT_DTYPES, ndim=2, shape=(N, rank))
    check_same_device(op, x2d=x2d, w=w.packed, A=A, B=B)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: argument 'scale' must be a finite Python number, got {scale!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{op}: argument 'dropout' must be a probability in [0, 1), "
                         f"got {dropout!r}")


def check_lora_backward_args(op: str, dy2d, x2d, w: NF4Weight, A, B, scale,
                             ctx: LoRAContext) -> None:
    """The checks of lora_linear_backward (shared with csrc_torch's)."""
    _check_lora_args(op, x2d, w, A, B, scale, ctx.dropout)
    M, K = x2d.shape
    N, rank = B.shape
    check_tensor(op, "dy2d", dy2d, dtypes=(x2d.dtype,), ndim=2, shape=(M, N))
    check_tensor(op, "ctx.xa", ctx.xa, dtypes=(compute_dtype(x2d.dtype),), ndim=2, shape=(M, rank))
    if ctx.keep_mask is not None:
        check_tensor(op, "ctx.keep_mask", ctx.keep_mask, dtypes=(torch.bool,), ndim=2,
                     shape=(M, K))
    check_same_device(op, dy2d=dy2d, x2d=x2d, xa=ctx.xa, keep_mask=ctx.keep_mask)


def _dropped_input(x2d: torch.Tensor, ctx: LoRAContext) -> torch.Tensor:
    """xd = x * keep / (1 - p) in the compute dtype (x itself when there is no
    dropout and x is already in it: no copy of the activation)."""
    xd = x2d.to(compute_dtype(x2d.dtype))
    if ctx.keep_mask is not None:
        xd = xd.mul(ctx.keep_mask).mul_(1.0 / (1.0 - ctx.dropout))
    return xd


def _low_rank_mm(a: torch.Tensor, b: torch.Tensor, scale: Optional[float] = None,
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """a @ b for the rank-r products, in a's dtype (the compute dtype: tensor cores
    with fp32 accumulation for fp16/bf16); ``scale`` applied in fp32 after it."""
    product = torch.mm(a, b.to(a.dtype))
    if scale is None:
        return product
    return product.float().mul_(scale).to(out_dtype)


def lora_linear_forward(x2d: torch.Tensor, w: NF4Weight, A: torch.Tensor, B: torch.Tensor,
                        scale: float, dropout: float = 0.0, training: bool = True,
                        generator: Optional[torch.Generator] = None, *,
                        dense_w: Optional[torch.Tensor] = None, path: Optional[str] = None):
    """y2d = x2d W^T + scale * (drop(x2d) A^T) B^T, in x2d's dtype.
    ``dense_w``/``path``: see nf4_matmul.launch_forward.

    x2d [M, K] fp32/fp16/bf16; W [N, K] NF4; A [r, K], B [N, r] any float dtype.
    Dropout (keep probability 1 - p, mask from torch.rand(generator=generator))
    runs only when ``training`` and p > 0. Returns (y2d, LoRAContext).
    """
    op = "lora_linear_forward"
    _check_lora_args(op, x2d, w, A, B, scale, dropout)
    keep_mask = None
    p = float(dropout) if training else 0.0
    if generator is not None and generator.device.type != x2d.device.type:
        raise ValueError(f"{op}: argument 'generator' is on {generator.device}; the dropout "
                         f"mask is drawn on x2d's device {x2d.device}")
    if p > 0.0:
        keep_mask = torch.rand(x2d.shape, generator=generator, device=x2d.device) >= p
    else:
        p = 0.0
    ctx = LoRAContext(keep_mask=keep_mask, dropout=p, xa=None)
    xa = _low_rank_mm(_dropped_input(x2d, ctx), A.t())
    ctx = ctx._replace(xa=xa)
    y2d = launch_forward(op, x2d, w, LoraForwardEpilogue(xa=xa, lora_b=B, scale=float(scale)),
                         dense_w=dense_w, path=path)
    return y2d, ctx


def lora_linear_backward(dy2d: torch.Tensor, x2d: torch.Tensor, w: NF4Weight, A: torch.Tensor,
                         B: torch.Tensor, scale: float, ctx: LoRAContext, *,
                         input_grad: bool = True, dense_w: Optional[torch.Tensor] = None,
                         path: Optional[str] = None):
    """Gradients of lora_linear_forward: (dx2d in x2d's dtype, dA in A's dtype,
    dB in B's dtype), all accumulated in fp32. ``ctx`` is what the forward returned.
    ``input_grad=False`` skips the NF4 kernel and returns None for dx2d (for a
    frozen input, e.g. the first layer's). ``dense_w``/``path``: see
    nf4_matmul.launch_backward_input."""
    op = "lora_linear_backward"
    check_lora_backward_args(op, dy2d, x2d, w, A, B, scale, ctx)

    dy = dy2d.to(compute_dtype(dy2d.dtype))
    g = _low_rank_mm(dy, B)                                        # dY B, [M, r]
    d_b = _low_rank_mm(dy.t(), ctx.xa, scale, B.dtype)             # scale * dY^T xa, [N, r]
    d_a = _low_rank_mm(g.t(), _dropped_input(x2d, ctx), scale, A.dtype)  # scale * g^T xd, [r, K]
    if not input_grad:
        return None, d_a, d_b
    keep = None if ctx.keep_mask is None else ctx.keep_mask.view(torch.uint8)
    epilogue = LoraBackwardEpilogue(g=g, lora_a=A, scale=float(scale), keep=keep,
                                    keep_scale=1.0 / (1.0 - ctx.dropout))
    dx2d = launch_backward_input(op, dy2d, w, x2d.dtype, epilogue, dense_w=dense_w, path=path)
    return dx2d, d_a, d_b


class LoRALinear(torch.autograd.Function):
    """lora_linear over the last dim of x; gradients to x, A and B (W is frozen)."""

    @staticmethod
    def forward(ctx, x, w, A, B, scale, dropout, training, generator):
        op = "lora_linear"
        check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
        check_nf4_weight(op, w)
        if x.dim() < 1 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"{op}: argument 'x' has shape {tuple(x.shape)}; expected "
                             f"last dim {w.shape[1]} (= in_features K of w {tuple(w.shape)})")
        x2d = x.reshape(-1, w.shape[1])
        y2d, lora_ctx = lora_linear_forward(x2d, w, A, B, scale, dropout, training, generator)
        ctx.save_for_backward(x2d, A, B, lora_ctx.xa, lora_ctx.keep_mask)
        ctx.w, ctx.scale, ctx.dropout, ctx.x_shape = w, scale, lora_ctx.dropout, x.shape
        return y2d.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2d, A, B, xa, keep_mask = ctx.saved_tensors
        lora_ctx = LoRAContext(keep_mask=keep_mask, dropout=ctx.dropout, xa=xa)
        dy2d = dy.reshape(-1, ctx.w.shape[0]).contiguous()
        dx2d, d_a, d_b = lora_linear_backward(dy2d, x2d, ctx.w, A, B, ctx.scale, lora_ctx,
                                              input_grad=ctx.needs_input_grad[0])
        dx = None if dx2d is None else dx2d.reshape(ctx.x_shape)
        return dx, None, d_a, d_b, None, None, None, None


def lora_linear(x: torch.Tensor, w: NF4Weight, A: torch.Tensor, B: torch.Tensor, scale: float,
                dropout: float = 0.0, training: bool = True,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """y = x W^T + scale * (drop(x) A^T) B^T.

    x: [..., K] fp32/fp16/bf16, contiguous; W: NF4Weight [N, K] (frozen);
    A: [r, K] and B: [N, r] (PEFT's lora_A.weight / lora_B.weight), any float
    dtype. Returns [..., N] in x's dtype. Differentiable in x, A and B.
    """
    return LoRALinear.apply(x, w, A, B, scale, dropout, training, generator)
