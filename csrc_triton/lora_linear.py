"""lora_linear: y = x W^T + scale * (drop(x) A^T) B^T with W frozen in NF4.

The big matmuls (x W^T forward, dY W backward) run on ``nf4_matmul``'s path for
this M: the fused NF4 kernels, with the LoRA term added in their epilogues on
the output tile already in registers, or dequantize + cuBLAS, with the LoRA
term added by one addmm. The rank-r matmuls (xa = drop(x) A^T, g = dY B, dA,
dB) run in the compute dtype (nf4_dense.compute_dtype: the activations'
fp16/bf16 on a GPU, torch.mm on the tensor cores with fp32 accumulation, as PEFT
computes them under bf16; fp32 under the interpreter, where low_rank.low_rank_matmul
widens the activation tiles in registers), so no fp32 copy of an activation is
made; dA and dB are scaled in fp32 and returned in the adapters' dtype (LoRA
masters are usually fp32 while x is fp16/bf16).

lora_linear_fused_* run projections that share an input (q/k/v, gate/up) as one
NF4 matmul and one product with their stacked A (see the section below).

Backward (W frozen), with xd = drop(x) = x * keep / (1 - p) and xa = xd A^T:
  dB = scale * dY^T xa
  dA = scale * (dY B)^T xd
  dX = dY W + scale * keep / (1 - p) * ((dY B) A)

Bias (Qwen2's q/k/v): the forwards take an optional frozen ``bias`` [N] in x's dtype,
y = x W^T + b + scale * (drop(x) A^T) B^T, added by the NF4 matmul (nf4_matmul:
the fused kernel's epilogue or the dequantize path's addmm). b depends on nothing,
so dX, dA and dB above are unchanged, and b gets no gradient (a base weight, frozen
under QLoRA): the backward launchers take no bias.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import _runtime
from .checks import FLOAT_DTYPES, check_same_device, check_tensor
from .low_rank import low_rank_matmul
from .nf4 import NF4Weight
from .nf4_dense import compute_dtype
from .nf4_matmul import (LoraBackwardEpilogue, LoraForwardEpilogue, check_bias,
                         check_swiglu_input, launch_backward_input, launch_forward,
                         refuse_trainable_bias)
from .nf4_operand import check_nf4_weight
from .records import OpRecord


class LoRAContext(NamedTuple):
    """What lora_linear_backward needs besides x, W, A, B."""
    keep_mask: Optional[torch.Tensor]  # bool [M, K], True = kept; None when no dropout ran
    dropout: float                     # the p actually applied (0.0 without dropout)
    xa: torch.Tensor                   # [M, r] = drop(x) A^T, in the compute dtype


def check_lora_args(op: str, x2d, w: NF4Weight, A, B, scale, dropout) -> None:
    check_nf4_weight(op, w)
    N, K = w.shape
    check_tensor(op, "x2d", x2d, dtypes=FLOAT_DTYPES, ndim=2, shape=(None, K), max_numel=None)
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
    check_lora_args(op, x2d, w, A, B, scale, ctx.dropout)
    M, K = x2d.shape
    N, rank = B.shape
    check_tensor(op, "dy2d", dy2d, dtypes=(x2d.dtype,), ndim=2, shape=(M, N), max_numel=None)
    check_tensor(op, "ctx.xa", ctx.xa, dtypes=(compute_dtype(x2d.dtype),), ndim=2, shape=(M, rank))
    if ctx.keep_mask is not None:
        check_tensor(op, "ctx.keep_mask", ctx.keep_mask, dtypes=(torch.bool,), ndim=2,
                     shape=(M, K), max_numel=None)
    check_same_device(op, dy2d=dy2d, x2d=x2d, xa=ctx.xa, keep_mask=ctx.keep_mask)


def dropped_input(x2d: torch.Tensor, ctx: LoRAContext) -> torch.Tensor:
    """xd = x * keep / (1 - p) in the compute dtype; x itself when there is no
    dropout (_low_rank_mm reads it in its own dtype: no copy of the activation)."""
    if ctx.keep_mask is None:
        return x2d
    return x2d.to(compute_dtype(x2d.dtype)).mul(ctx.keep_mask).mul_(1.0 / (1.0 - ctx.dropout))


def _low_rank_mm(a: torch.Tensor, b: torch.Tensor, scale: Optional[float] = None,
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """a @ b for the rank-r products in the compute dtype of a's activations (tensor
    cores with fp32 accumulation for fp16/bf16), returned in it; with ``scale``,
    scale * (a @ b) in ``out_dtype``, the scale applied in fp32.

    Where the compute dtype is wider than an operand (fp32 under the interpreter),
    low_rank.low_rank_matmul widens the tiles in registers rather than making an
    fp32 copy of an activation; elsewhere torch.mm, with the (small) LoRA factor
    rounded to the activations' dtype."""
    dtype = compute_dtype(a.dtype)
    if a.dtype != dtype or b.dtype != dtype:
        if _runtime.DOT_IN_FP32:
            return low_rank_matmul(a, b, dtype if scale is None else out_dtype, scale)
        b = b.to(a.dtype)
    product = torch.mm(a, b)
    if scale is None:
        return product
    return product.float().mul_(scale).to(out_dtype)


def lora_linear_forward(x2d: torch.Tensor, w: NF4Weight, A: torch.Tensor, B: torch.Tensor,
                        scale: float, dropout: float = 0.0, training: bool = True,
                        generator: Optional[torch.Generator] = None, *,
                        dense_w: Optional[torch.Tensor] = None, path: Optional[str] = None,
                        bias: Optional[torch.Tensor] = None):
    """y2d = x2d W^T (+ bias) + scale * (drop(x2d) A^T) B^T, in x2d's dtype.
    ``dense_w``/``path``: see nf4_matmul.launch_forward; ``bias``: None or a frozen
    [N] in x2d's dtype (see the module docstring).

    x2d [M, K] fp32/fp16/bf16; W [N, K] NF4; A [r, K], B [N, r] any float dtype.
    Dropout (keep probability 1 - p, mask from torch.rand(generator=generator))
    runs only when ``training`` and p > 0. Returns (y2d, LoRAContext).
    """
    op = "lora_linear_forward"
    check_lora_args(op, x2d, w, A, B, scale, dropout)
    check_bias(op, bias, w.shape[0], x2d.dtype, x2d.device)
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
    xa = _low_rank_mm(dropped_input(x2d, ctx), A.t())
    ctx = ctx._replace(xa=xa)
    y2d = launch_forward(op, x2d, w, LoraForwardEpilogue(xa=xa, lora_b=B, scale=float(scale)),
                         dense_w=dense_w, path=path, bias=bias)
    return y2d, ctx


def lora_linear_backward(dy2d: torch.Tensor, x2d: torch.Tensor, w: NF4Weight, A: torch.Tensor,
                         B: torch.Tensor, scale: float, ctx: LoRAContext, *,
                         input_grad: bool = True, dense_w: Optional[torch.Tensor] = None,
                         path: Optional[str] = None, swiglu_input: Optional[tuple] = None):
    """Gradients of lora_linear_forward: (dx2d in x2d's dtype, dA in A's dtype,
    dB in B's dtype), all accumulated in fp32. ``ctx`` is what the forward returned.
    ``input_grad=False`` skips the NF4 kernel and returns None for dx2d (for a
    frozen input, e.g. the first layer's). ``dense_w``/``path``/``swiglu_input``
    (dx2d becomes [dgate, dup]): see nf4_matmul.launch_backward_input. The same whether
    or not the forward had a bias (frozen, no x in it: module docstring)."""
    op = "lora_linear_backward"
    check_lora_backward_args(op, dy2d, x2d, w, A, B, scale, ctx)
    check_swiglu_input(op, swiglu_input, x2d.shape[0], x2d.shape[1], x2d.dtype)

    g = _low_rank_mm(dy2d, B)                                      # dY B, [M, r]
    d_b = _low_rank_mm(dy2d.t(), ctx.xa, scale, B.dtype)           # scale * dY^T xa, [N, r]
    d_a = _low_rank_mm(g.t(), dropped_input(x2d, ctx), scale, A.dtype)  # scale * g^T xd, [r, K]
    if not input_grad:
        return None, d_a, d_b
    keep = None if ctx.keep_mask is None else ctx.keep_mask.view(torch.uint8)
    epilogue = LoraBackwardEpilogue(g=g, lora_a=A, scale=float(scale), keep=keep,
                                    keep_scale=1.0 / (1.0 - ctx.dropout))
    dx2d = launch_backward_input(op, dy2d, w, x2d.dtype, epilogue, dense_w=dense_w, path=path,
                                 swiglu_input=swiglu_input)
    return dx2d, d_a, d_b


class LoRALinear(torch.autograd.Function):
    """lora_linear over the last dim of x; gradients to x, A and B (W and the bias are
    frozen)."""

    @staticmethod
    def forward(ctx, x, w, A, B, scale, dropout, training, generator, bias=None):
        op = "lora_linear"
        check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, max_numel=None)
        check_nf4_weight(op, w)
        refuse_trainable_bias(op, bias)
        if x.dim() < 1 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"{op}: argument 'x' has shape {tuple(x.shape)}; expected "
                             f"last dim {w.shape[1]} (= in_features K of w {tuple(w.shape)})")
        x2d = x.reshape(-1, w.shape[1])
        y2d, lora_ctx = lora_linear_forward(x2d, w, A, B, scale, dropout, training, generator,
                                            bias=bias)
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
        return dx, None, d_a, d_b, None, None, None, None, None


def lora_linear_op(x: torch.Tensor, w: NF4Weight, A: torch.Tensor, B: torch.Tensor, scale: float,
                dropout: float = 0.0, training: bool = True,
                generator: Optional[torch.Generator] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W^T (+ bias) + scale * (drop(x) A^T) B^T.

    x: [..., K] fp32/fp16/bf16, contiguous; W: NF4Weight [N, K] (frozen);
    A: [r, K] and B: [N, r] (PEFT's lora_A.weight / lora_B.weight), any float
    dtype; bias: None or [N] in x's dtype, frozen (one that requires grad is
    refused). Returns [..., N] in x's dtype. Differentiable in x, A and B.
    """
    return LoRALinear.apply(x, w, A, B, scale, dropout, training, generator, bias)


# ---------------------------------------------------------------------------
# projections that share an input (q/k/v; gate/up), no dropout
# ---------------------------------------------------------------------------
# W is the row concatenation [N_0; N_1; ...] of the segments' NF4 weights
# (nf4_concat), each segment s with an optional adapter (A_s [r_s, K], B_s [N_s, r_s]).
# With A = [A_0; A_1; ...] stacked [R, K] (R = sum r_s over adapted segments) and
# B = blockdiag(B_0, B_1, ...) [N, R] (zero where segment and rank slot differ):
#   xa = x A^T        [M, R]: every segment's x A_s^T, one product of x
#   y  = x W^T + scale * xa B^T          (segment s of y: x W_s^T + scale * x A_s^T B_s^T)
# Backward, with dY = [dY_0, dY_1, ...] [M, N]:
#   g  = dY B         [M, R]: g_s = dY_s B_s
#   dB = scale * dY^T xa, whose (s, s) block is dB_s (the off-diagonal blocks are dropped)
#   dA = scale * g^T x, whose rows of slot s are dA_s
#   dX = dY W + scale * g A = sum_s (dY_s W_s + scale * g_s A_s)
# PEFT draws an independent dropout mask per projection, so with dropout the
# projections run one by one (lora_linear_forward on nf4_concat.segment_view).

class FusedLoRAContext(NamedTuple):
    """What lora_linear_fused_backward needs besides x, W and the adapters."""
    xa: torch.Tensor       # [M, R] = x A^T in the compute dtype
    lora_a: torch.Tensor   # [R, K] the adapted segments' A stacked, compute dtype
    lora_b: torch.Tensor   # [N, R] block-diagonal B, compute dtype
    ranks: tuple           # r_s per segment, 0 for a segment without adapter


def check_fused_args(op: str, x2d, w: NF4Weight, adapters, scale) -> tuple:
    check_nf4_weight(op, w)
    if w.segment_rows is None:
        raise ValueError(f"{op}: argument 'w' must be a row concatenation (nf4_concat), "
                         f"got an ordinary weight of shape {tuple(w.shape)}")
    N, K = w.shape
    check_tensor(op, "x2d", x2d, dtypes=FLOAT_DTYPES, ndim=2, shape=(None, K), max_numel=None)
    if len(adapters) != len(w.segment_rows):
        raise ValueError(f"{op}: argument 'adapters' has {len(adapters)} entries; w has "
                         f"{len(w.segment_rows)} segments")
    ranks = []
    for s, (rows, pair) in enumerate(zip(w.segment_rows, adapters)):
        if pair is None:
            ranks.append(0)
            continue
        A, B = pair
        check_tensor(op, f"adapters[{s}][0]", A, dtypes=FLOAT_DTYPES, ndim=2, shape=(None, K))
        check_tensor(op, f"adapters[{s}][1]", B, dtypes=FLOAT_DTYPES, ndim=2,
                     shape=(rows, A.shape[0]))
        check_same_device(op, x2d=x2d, A=A, B=B)
        ranks.append(A.shape[0])
    if not any(ranks):
        raise ValueError(f"{op}: argument 'adapters' has no adapter; use nf4_matmul_forward")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: argument 'scale' must be a finite Python number, got {scale!r}")
    return tuple(ranks)


def stacked_adapters(w: NF4Weight, adapters, ranks: tuple, dtype: torch.dtype):
    """(A stacked [R, K], B block-diagonal [N, R]) in ``dtype`` (see the comment above)."""
    K = w.shape[1]
    lora_a = torch.cat([pair[0].to(dtype) for pair in adapters if pair is not None]).reshape(-1, K)
    lora_b = torch.zeros(w.shape[0], sum(ranks), dtype=dtype, device=lora_a.device)
    row = col = 0
    for rows, rank, pair in zip(w.segment_rows, ranks, adapters):
        if pair is not None:
            lora_b[row:row + rows, col:col + rank] = pair[1]
        row, col = row + rows, col + rank
    return lora_a, lora_b


def split_adapter_grads(w: NF4Weight, adapters, ranks: tuple, d_a: torch.Tensor,
                        d_b: torch.Tensor) -> list:
    """[(dA_s, dB_s) in the adapters' dtypes, or None] from the stacked dA [R, K] and
    the block-diagonal-shaped dB [N, R]."""
    grads, row, col = [], 0, 0
    for rows, rank, pair in zip(w.segment_rows, ranks, adapters):
        if pair is None:
            grads.append(None)
        else:
            grads.append((d_a[col:col + rank].to(pair[0].dtype).contiguous(),
                          d_b[row:row + rows, col:col + rank].to(pair[1].dtype).contiguous()))
        row, col = row + rows, col + rank
    return grads


def check_fused_backward_args(op: str, dy2d, x2d, w: NF4Weight, adapters, scale,
                              ctx: FusedLoRAContext) -> tuple:
    """The checks of lora_linear_fused_backward (shared with csrc_torch's); returns the ranks."""
    ranks = check_fused_args(op, x2d, w, adapters, scale)
    M = x2d.shape[0]
    check_tensor(op, "dy2d", dy2d, dtypes=(x2d.dtype,), ndim=2, shape=(M, w.shape[0]),
                 max_numel=None)
    if not isinstance(ctx, FusedLoRAContext) or tuple(ctx.ranks) != ranks:
        raise ValueError(f"{op}: argument 'ctx' is not the FusedLoRAContext of these adapters "
                         f"(ranks {ranks})")
    check_tensor(op, "ctx.xa", ctx.xa, ndim=2, shape=(M, sum(ranks)))
    return ranks


def lora_linear_fused_forward(x2d: torch.Tensor, w: NF4Weight, adapters, scale: float, *,
                              dense_w: Optional[torch.Tensor] = None, path: Optional[str] = None,
                              bias: Optional[torch.Tensor] = None):
    """[y_0, y_1, ...] = x2d W^T (+ bias) + scale * (x2d A^T) B^T for a row concatenation W
    of segments with adapters ``adapters`` ([(A_s, B_s) or None] per segment; no dropout):
    ONE product of x2d with the stacked A and one NF4 matmul with the LoRA epilogue.
    ``bias``: None or the frozen [N] concatenation of the segments' biases ([b_q; b_k; b_v]
    for q/k/v), in x2d's dtype. Returns (y2d [M, N] in x2d's dtype, FusedLoRAContext).
    ``dense_w``/``path``: see nf4_matmul.launch_forward."""
    op = "lora_linear_fused_forward"
    ranks = check_fused_args(op, x2d, w, adapters, scale)
    check_bias(op, bias, w.shape[0], x2d.dtype, x2d.device)
    lora_a, lora_b = stacked_adapters(w, adapters, ranks, compute_dtype(x2d.dtype))
    xa = _low_rank_mm(x2d, lora_a.t())
    y2d = launch_forward(op, x2d, w, LoraForwardEpilogue(xa=xa, lora_b=lora_b, scale=float(scale)),
                         dense_w=dense_w, path=path, bias=bias)
    return y2d, FusedLoRAContext(xa=xa, lora_a=lora_a, lora_b=lora_b, ranks=ranks)


def lora_linear_fused_backward(dy2d: torch.Tensor, x2d: torch.Tensor, w: NF4Weight, adapters,
                               scale: float, ctx: FusedLoRAContext, *, input_grad: bool = True,
                               dense_w: Optional[torch.Tensor] = None,
                               path: Optional[str] = None):
    """Gradients of lora_linear_fused_forward: (dx2d in x2d's dtype or None unless
    ``input_grad``, [(dA_s, dB_s) in the adapters' dtypes, or None per segment]):
    three rank-R products and one NF4 matmul with the LoRA epilogue. The same whether
    or not the forward had a bias (frozen, no x in it)."""
    op = "lora_linear_fused_backward"
    ranks = check_fused_backward_args(op, dy2d, x2d, w, adapters, scale, ctx)
    g = _low_rank_mm(dy2d, ctx.lora_b)                                     # dY B, [M, R]
    d_b = _low_rank_mm(dy2d.t(), ctx.xa, scale, torch.float32)            # [N, R]
    d_a = _low_rank_mm(g.t(), x2d, scale, torch.float32)                  # [R, K]
    grads = split_adapter_grads(w, adapters, ranks, d_a, d_b)
    if not input_grad:
        return None, grads
    epilogue = LoraBackwardEpilogue(g=g, lora_a=ctx.lora_a, scale=float(scale), keep=None,
                                    keep_scale=1.0)
    return launch_backward_input(op, dy2d, w, x2d.dtype, epilogue, dense_w=dense_w, path=path), grads


RECORD = OpRecord(
    "lora_linear", (lora_linear_forward, lora_linear_backward, lora_linear_fused_forward,
                    lora_linear_fused_backward),
    torch_mirror="csrc_torch.lora_linear", reference="tests.reference.lora_linear",
    parity="tests.test_torch_backend:lora_linear_parity", bench="bench.ops_nf4:lora_linear_bench",
    compile_specs="tests.sm90_compile:low_rank_specs")
