"""RMSNorm as in LLaMA: y = x * rsqrt(mean(x^2) + eps) * w over the last dim.

Forward and backward are Triton kernels working on a 2-D view [rows, H] (rows of
contiguous elements, any row stride; outputs contiguous); the per-row
rstd = rsqrt(mean(x^2) + eps) is returned by the forward (fp32) so the backward
does not recompute it. Row offsets are 64-bit only when a launch needs it (INDEX_64).

Public:
  rms_norm_op(x, weight, eps=1e-5) -> y          autograd Function, x [..., H]
Low level (used by the model's hand-written backward):
  rms_norm_forward(x2d, weight, eps) -> (y2d, rstd)
  rms_norm_backward(dy2d, x2d, weight, rstd, weight_grad) -> (dx2d, dweight or None)

Rounding, compared with transformers' LlamaRMSNorm: HF computes xhat = x * rstd
in fp32, casts xhat to the input dtype, and only then multiplies by the weight
(so in fp16/bf16 the result is rounded twice, and with an fp32 weight and a
half-precision x the product is promoted to fp32). Here x * rstd * w is
computed entirely in fp32 and rounded once, to x's dtype. In fp32 both agree
to fp32 rounding; in half precision they can differ by one ulp.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .checks import FLOAT_DTYPES, check_rows, check_same_device, check_tensor, wide_index
from .records import OpRecord
from ._runtime import INTERPRETING, new_output, record_launch

_OP = "rms_norm"

# Elements per program tile. The interpreter pays per program, so it gets
# bigger tiles; on the GPU a LLaMA row (H = 4096) is one program.
_TILE_ELEMENTS = 16384 if INTERPRETING else 4096


def _dw_programs(device: torch.device) -> int:
    """How many programs split the rows when dw is wanted; each writes one
    partial dw row. A few per SM on a GPU; a handful in the interpreter (enough
    to exercise the partial sums, few enough to stay cheap)."""
    if INTERPRETING or device.type != "cuda":
        return 8
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, n_cols, stride_x, stride_y,
                             eps, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                             INDEX_64: tl.constexpr):
    """One program normalizes BLOCK_ROWS whole rows of x [n_rows, n_cols].

    rstd_r = 1 / sqrt(sum_j x_rj^2 / n_cols + eps)      (fp32, stored per row)
    y_rj   = x_rj * rstd_r * w_j                        (fp32, rounded once to y's dtype)
    Masked lanes load 0, so they add nothing to the sum of squares.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    row = rows.to(tl.int64) if INDEX_64 else rows

    x = tl.load(x_ptr + row[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    mean_square = tl.sum(x * x, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(mean_square + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + row[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
                              n_rows, n_cols, stride_dy, stride_x, stride_dx, rows_per_program,
                              BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                              WEIGHT_GRAD: tl.constexpr, INDEX_64: tl.constexpr):
    """Gradients of y = xhat * w, xhat = x * rstd, rstd = (mean(x^2) + eps)^(-1/2).

    Derivation, for one row of length H (g = w * dy):
      dL/dxhat_j = g_j
      d rstd / d x_i = -rstd^3 * x_i / H
      dL/dx_i = rstd * g_i + sum_j g_j x_j * (-rstd^3 x_i / H)
              = rstd * (g_i - xhat_i * mean_j(g_j * xhat_j))
      dL/dw_j = sum over rows of dy_j * xhat_j

    Program p owns rows [p * rows_per_program, (p + 1) * rows_per_program)
    (rows_per_program is a multiple of BLOCK_ROWS) and walks them BLOCK_ROWS
    at a time. With WEIGHT_GRAD it accumulates its rows' dy * xhat in fp32 and
    writes one partial row dw_partial[p, :]; the launcher sums the partials
    (a fixed order, so dw is deterministic).
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_COLS], dtype=tl.float32)

    first_row = pid * rows_per_program
    for block_start in range(first_row, first_row + rows_per_program, BLOCK_ROWS):
        rows = block_start + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        row = (rows.to(tl.int64) if INDEX_64 else rows)[:, None]
        x = tl.load(x_ptr + row * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)

        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        mean_g_xhat = tl.sum(g * xhat, axis=1) / n_cols
        dx = rstd[:, None] * (g - xhat * mean_g_xhat[:, None])
        tl.store(dx_ptr + row * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)
        if WEIGHT_GRAD:
            dw_acc += tl.sum(dy * xhat, axis=0)

    if WEIGHT_GRAD:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=col_ok)


def _tiling(n_rows: int, n_cols: int):
    """(BLOCK_ROWS, BLOCK_COLS, num_warps): a whole row per tile, several short rows together."""
    block_cols = triton.next_power_of_2(n_cols)
    block_rows = max(1, min(_TILE_ELEMENTS // block_cols, triton.next_power_of_2(n_rows)))
    num_warps = min(16, max(1, block_rows * block_cols // 512))
    return block_rows, block_cols, num_warps


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{_OP}: argument 'eps' must be a finite number >= 0, got {eps!r}")
    return float(eps)


def _check_weight(weight: torch.Tensor, n_cols: int) -> None:
    check_tensor(_OP, "weight", weight, dtypes=FLOAT_DTYPES, shape=(n_cols,))


def check_forward_args(x2d, weight, eps) -> float:
    """The checks of rms_norm_forward (shared with csrc_torch's); returns eps as a float."""
    check_tensor(_OP, "x2d", x2d, dtypes=FLOAT_DTYPES, ndim=2, contiguous=False, max_numel=None)
    check_rows(_OP, "x2d", x2d)
    n_rows, n_cols = x2d.shape
    if n_cols == 0:
        raise ValueError(f"{_OP}: argument 'x2d' has an empty last dim (shape {tuple(x2d.shape)})")
    _check_weight(weight, n_cols)
    check_same_device(_OP, x2d=x2d, weight=weight)
    eps = _check_eps(eps)
    return eps


def check_backward_args(dy2d, x2d, weight, rstd, weight_grad) -> None:
    """The checks of rms_norm_backward (shared with csrc_torch's)."""
    check_tensor(_OP, "x2d", x2d, dtypes=FLOAT_DTYPES, ndim=2, contiguous=False, max_numel=None)
    check_rows(_OP, "x2d", x2d)
    n_rows, n_cols = x2d.shape
    check_rows(_OP, "dy2d", dy2d, dtypes=FLOAT_DTYPES, shape=(n_rows, n_cols))
    _check_weight(weight, n_cols)
    check_tensor(_OP, "rstd", rstd, dtypes=(torch.float32,), shape=(n_rows,))
    check_same_device(_OP, dy2d=dy2d, x2d=x2d, weight=weight, rstd=rstd)
    if not isinstance(weight_grad, bool):
        raise ValueError(f"{_OP}: argument 'weight_grad' must be a bool, got {weight_grad!r}")


def rms_norm_forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float):
    """x2d [rows, H] (fp32/fp16/bf16), weight [H] (any float dtype) ->
    (y2d [rows, H] in x2d's dtype, rstd [rows] fp32)."""
    eps = check_forward_args(x2d, weight, eps)
    n_rows, n_cols = x2d.shape

    y = new_output((n_rows, n_cols), x2d.dtype, x2d.device)
    rstd = new_output((n_rows,), torch.float32, x2d.device)
    if n_rows == 0:
        return y, rstd
    block_rows, block_cols, num_warps = _tiling(n_rows, n_cols)
    grid = (triton.cdiv(n_rows, block_rows),)
    record_launch("_rms_norm_forward_kernel")
    _rms_norm_forward_kernel[grid](x2d, weight, y, rstd, n_rows, n_cols,
                                   check_rows(_OP, "x2d", x2d), n_cols, eps,
                                   BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
                                   INDEX_64=wide_index(x2d, y), num_warps=num_warps)
    return y, rstd


def rms_norm_backward(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor, weight_grad: bool):
    """Given dL/dy [rows, H], the forward's x2d, weight and rstd, return
    (dx2d in x2d's dtype, dweight in weight's dtype, or None unless weight_grad)."""
    check_backward_args(dy2d, x2d, weight, rstd, weight_grad)
    n_rows, n_cols = x2d.shape

    dx = new_output((n_rows, n_cols), x2d.dtype, x2d.device)
    if n_rows == 0:
        return dx, (torch.zeros_like(weight) if weight_grad else None)
    block_rows, block_cols, num_warps = _tiling(n_rows, n_cols)
    n_row_blocks = triton.cdiv(n_rows, block_rows)
    blocks_per_program = triton.cdiv(n_row_blocks, _dw_programs(x2d.device)) if weight_grad else 1
    n_programs = triton.cdiv(n_row_blocks, blocks_per_program)
    # Without weight_grad the kernel never touches the partials; a 1-element
    # placeholder keeps the signature fixed.
    dw_partial = new_output((n_programs, n_cols) if weight_grad else (1,),
                            torch.float32, x2d.device)
    record_launch("_rms_norm_backward_kernel")
    _rms_norm_backward_kernel[(n_programs,)](
        dy2d, x2d, weight, rstd, dx, dw_partial, n_rows, n_cols, check_rows(_OP, "dy2d", dy2d),
        check_rows(_OP, "x2d", x2d), n_cols, blocks_per_program * block_rows,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, WEIGHT_GRAD=weight_grad,
        INDEX_64=wide_index(dy2d, x2d, dx), num_warps=num_warps)
    if not weight_grad:
        return dx, None
    # A few hundred partial rows at most: summing them in torch is negligible.
    return dx, dw_partial.sum(dim=0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y2d, rstd = rms_norm_forward(x.reshape(-1, x.shape[-1]), weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y2d.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        n_cols = x.shape[-1]
        # Incoming gradients may be expanded or strided views; the kernel wants rows.
        dx2d, dweight = rms_norm_backward(dy.contiguous().view(-1, n_cols), x.view(-1, n_cols),
                                          weight, rstd, bool(ctx.needs_input_grad[1]))
        return dx2d.view(x.shape), dweight, None


def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """y = x * rsqrt(mean(x^2, -1) + eps) * weight for x [..., H], weight [H].

    Differentiable in x, and in weight when weight.requires_grad (norms are
    frozen under QLoRA, so dw is skipped unless asked for)."""
    check_tensor(_OP, "x", x, dtypes=FLOAT_DTYPES, max_numel=None)
    if x.dim() == 0:
        raise ValueError(f"{_OP}: argument 'x' must have at least 1 dim [..., H], got a scalar")
    return RMSNormFunction.apply(x, weight, eps)


RECORD = OpRecord(
    "rms_norm", (rms_norm_forward, rms_norm_backward), torch_mirror="csrc_torch.rms_norm",
    reference="tests.reference.rms_norm", parity="tests.test_torch_backend:rms_norm_parity",
    bench="bench.ops_activation:rms_norm_bench", compile_specs="tests.sm90_compile:rms_norm_specs")
