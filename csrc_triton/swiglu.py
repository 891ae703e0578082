"""SwiGLU, the gated activation of the LLaMA MLP: h = silu(gate) * up.

Elementwise over two same-shape tensors [..., I]; forward and backward are one
Triton kernel each, over rows of I elements. gate and up may be column slices of
one wider buffer (the fused gate/up projection writes [rows, 2I]: gate is its first
I columns, up the next I), read in place through their row strides, and the
backward can write dgate / dup into slices of one buffer ([rows, 2I], the output
gradient of that fused projection), even over dh itself: each element is read
before it is written, by the same program.

Public:
  swiglu_op(gate, up) -> h                   autograd Function
Low level (used by the model's hand-written backward):
  swiglu_forward(gate, up) -> h
  swiglu_backward(dh, gate, up, out=None) -> (dgate, dup)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .checks import FLOAT_DTYPES, check_rows, check_same_device, wide_index
from .records import OpRecord
from ._runtime import INTERPRETING, new_output, record_launch

_OP = "swiglu"

# Elements per program: the interpreter pays per program, so it takes big blocks.
_BLOCK = 16384 if INTERPRETING else 1024
_NUM_WARPS = 4


@triton.jit
def _row_tile(n_rows, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
              INDEX_64: tl.constexpr):
    """(rows, cols, mask) of this program's [BLOCK_ROWS, BLOCK_COLS] tile; rows in int64
    when INDEX_64, so that row * stride cannot wrap."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    if INDEX_64:
        rows = rows.to(tl.int64)
    return rows[:, None], cols[None, :], mask


@triton.jit
def _swiglu_forward_kernel(gate_ptr, up_ptr, h_ptr, n_rows, n_cols, stride_gate, stride_up,
                           stride_h, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                           INDEX_64: tl.constexpr):
    """h = silu(g) * u = g * sigmoid(g) * u, elementwise in fp32, rounded once to h's dtype."""
    rows, cols, mask = _row_tile(n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS, INDEX_64)
    g = tl.load(gate_ptr + rows * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + rows * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_gradients(dh, g, u):
    """(dL/dg, dL/du) of h = silu(g) * u for fp32 tiles (derivation: _swiglu_backward_kernel);
    also the epilogue of nf4_matmul's backward when it produces dh itself."""
    s = tl.sigmoid(g)
    return dh * u * s * (1.0 + g * (1.0 - s)), dh * g * s


@triton.jit
def _swiglu_backward_kernel(dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_rows, n_cols,
                            stride_dh, stride_gate, stride_up, stride_dgate, stride_dup,
                            BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                            INDEX_64: tl.constexpr):
    """Gradients of h = silu(g) * u, with s = sigmoid(g):

      dL/du = dh * silu(g) = dh * g * s
      dL/dg = dh * u * silu'(g),  silu'(g) = d(g s)/dg = s + g * s * (1 - s)
                                          = s * (1 + g * (1 - s))
    (using sigmoid'(g) = s * (1 - s)). The forward is recomputed, nothing stored.
    dgate may be dh itself (every element is loaded before this program stores it).
    """
    rows, cols, mask = _row_tile(n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS, INDEX_64)
    dh = tl.load(dh_ptr + rows * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + rows * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    dgate, dup = swiglu_gradients(dh, g, u)
    tl.store(dgate_ptr + rows * stride_dgate + cols, dgate.to(dgate_ptr.dtype.element_ty),
             mask=mask)
    tl.store(dup_ptr + rows * stride_dup + cols, dup.to(dup_ptr.dtype.element_ty), mask=mask)


def check_swiglu_pair(gate: torch.Tensor, up: torch.Tensor) -> Tuple[int, int]:
    """gate and up: one float dtype and shape, rows of contiguous elements; their row strides."""
    stride_gate = check_rows(_OP, "gate", gate, dtypes=FLOAT_DTYPES)
    stride_up = check_rows(_OP, "up", up, dtypes=(gate.dtype,), shape=tuple(gate.shape))
    check_same_device(_OP, gate=gate, up=up)
    return stride_gate, stride_up


def _tiling(gate: torch.Tensor):
    """(n_rows, n_cols, grid, constexprs) of a launch over gate's rows."""
    n_cols = gate.shape[-1] if gate.dim() else 1
    n_rows = gate.numel() // max(n_cols, 1)
    block_cols = min(_BLOCK, triton.next_power_of_2(n_cols))
    block_rows = min(_BLOCK // block_cols, triton.next_power_of_2(n_rows))
    grid = (triton.cdiv(n_rows, block_rows), triton.cdiv(n_cols, block_cols))
    return n_rows, n_cols, grid, dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: same shape and dtype (fp32/fp16/bf16), rows of contiguous elements
    (any row strides) -> h = silu(gate) * up, a new contiguous tensor."""
    stride_gate, stride_up = check_swiglu_pair(gate, up)
    h = new_output(gate.shape, gate.dtype, gate.device)
    if gate.numel():
        n_rows, n_cols, grid, blocks = _tiling(gate)
        record_launch("_swiglu_forward_kernel")
        _swiglu_forward_kernel[grid](gate, up, h, n_rows, n_cols, stride_gate, stride_up, n_cols,
                                     **blocks, INDEX_64=wide_index(gate, up, h),
                                     num_warps=_NUM_WARPS)
    return h


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """Given dL/dh (gate's shape, any float dtype) -> (dgate, dup) in gate's dtype, new
    tensors, or written into ``out`` = (dgate, dup) (row views of gate's shape and dtype,
    e.g. the two halves of one [rows, 2I] buffer; dgate may be dh itself)."""
    stride_gate, stride_up = check_swiglu_pair(gate, up)
    stride_dh = check_rows(_OP, "dh", dh, dtypes=FLOAT_DTYPES, shape=tuple(gate.shape))
    check_same_device(_OP, dh=dh, gate=gate)
    if out is None:
        dgate = new_output(gate.shape, gate.dtype, gate.device)
        dup = new_output(gate.shape, gate.dtype, gate.device)
    else:
        dgate, dup = check_swiglu_out(out, gate)
    n = gate.numel()
    if n:
        n_rows, n_cols, grid, blocks = _tiling(gate)
        record_launch("_swiglu_backward_kernel")
        _swiglu_backward_kernel[grid](
            dh, gate, up, dgate, dup, n_rows, n_cols, stride_dh, stride_gate, stride_up,
            check_rows(_OP, "out[0]", dgate), check_rows(_OP, "out[1]", dup), **blocks,
            INDEX_64=wide_index(dh, gate, up, dgate, dup), num_warps=_NUM_WARPS)
    return dgate, dup


def check_swiglu_out(out, gate: torch.Tensor):
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError(f"{_OP}: argument 'out' must be (dgate, dup) or None")
    for name, t in zip(("out[0]", "out[1]"), out):
        check_rows(_OP, name, t, dtypes=(gate.dtype,), shape=tuple(gate.shape))
        check_same_device(_OP, gate=gate, **{name: t})
    return out[0], out[1]


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        # Incoming gradients may be expanded or strided views; the kernel wants them flat.
        return swiglu_backward(dh.contiguous(), gate, up)


def swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up, differentiable in both."""
    return SwiGLUFunction.apply(gate, up)


RECORD = OpRecord(
    "swiglu", (swiglu_forward, swiglu_backward), torch_mirror="csrc_torch.swiglu",
    reference="tests.reference.swiglu", parity="tests.test_torch_backend:swiglu_parity",
    bench="bench.ops_activation:swiglu_bench", compile_specs="tests.sm90_compile:swiglu_specs")
