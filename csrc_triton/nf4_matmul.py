"""nf4_matmul: y = x @ W^T with W stored in NF4, on one of two paths chosen by M.

Small M (<= nf4_dense.fused_max_m_setting(), 192 by default): the fused kernels
here. A full-precision copy of W is never written: each program decodes the
[BLOCK_N, BLOCK_K] slice of W it is about to multiply straight from the packed
bytes (each byte loaded once, giving two neighbouring elements), the 16-entry
code (loaded once per program, gathered in registers) and the per-block absmax
(decoded once per run of a block). At these M the matmul is bound by reading W,
and the fused kernel reads 4x fewer bytes than a bf16 matmul.

Large M: nf4_dense's path, dequantize once then cuBLAS (the decode, repeated for
every row of output tiles, would cost more than the tensor cores' work).

Both kernels carry an optional LoRA epilogue (used by ``lora_linear``):
  forward   y  += scale * xa @ B^T                      (xa = drop(x) A^T, [M, r])
  backward  dx += scale * keep/(1-p) * (g @ A)          (g  = dY B,        [M, r])
(a rank-r tl.dot on the tensor cores, operands in the activations' dtype), so
the low-rank update rides on the output tile that the NF4 matmul already holds
in registers instead of costing another pass over y or dx.

W may be a row concatenation of weights (nf4_concat: q/k/v as one matmul), decoded
segment by segment where double quantization keeps per-weight nested statistics.
The backward can also apply SwiGLU's backward to its own output tile
(``swiglu_input``): the down projection's dX kernel then writes d[gate, up] directly.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import _runtime
from ._checks import FLOAT_DTYPES, check_numel, check_same_device, check_tensor
from .nf4 import NF4Weight
from .nf4_decode import _NO_FMA, nested_group_and_offset, nf4_code_lookup
from .nf4_dense import (check_dense_weight, choose_path, dense_backward_input, dense_forward,
                        dequantize_for_matmul)
from .nf4_operand import check_nf4_weight, weight_args, weight_constexprs
from .swiglu import swiglu_backward, swiglu_gradients

# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------


@triton.jit
def _nf4_code_values(packed_ptr, code_ptr, flat, valid):
    """code[nib(i)] for the flat (row-major) element indices ``flat``, fp32.

    nib(i) is the high nibble of byte i // 2 when i is even, the low nibble when odd.
    """
    byte = tl.load(packed_ptr + flat // 2, mask=valid, other=0).to(tl.int32)
    nibble = tl.where((flat % 2) == 0, byte >> 4, byte & 15)
    return tl.load(code_ptr + nibble)  # nibble is always in 0..15


@triton.jit
def _block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, block, valid,
                  seg_block_1, seg_block_2, seg_group_1, seg_group_2,
                  DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr, SEGMENTED: tl.constexpr):
    """absmax[b] (fp32) for the quantization-block indices ``block``.

    With double quantization the stored absmax is a uint8 index and
    absmax[b] = nested_code[absmax_u8[b]] * nested_absmax[g(b)] + offset(b), with
    g(b) = b // NESTED and one offset, or per segment (nf4_decode.nested_group_and_offset).
    """
    if DOUBLE_QUANT:
        group, offset = nested_group_and_offset(nested_offset_ptr, block, valid, seg_block_1,
                                                seg_block_2, seg_group_1, seg_group_2,
                                                NESTED, SEGMENTED)
        absmax_q = tl.load(absmax_ptr + block, mask=valid, other=0).to(tl.int32)
        nested_scale = tl.load(nested_absmax_ptr + group, mask=valid, other=0.0)
        return tl.load(nested_code_ptr + absmax_q) * nested_scale + offset
    else:
        return tl.load(absmax_ptr + block, mask=valid, other=0.0)


@triton.jit
def _nf4_weight_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                     nested_offset_ptr, seg_block_1, seg_block_2, seg_group_1, seg_group_2,
                     offs_n, n_ok, k0, K,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                     DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr, SEGMENTED: tl.constexpr,
                     ROW_ALIGNED: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """W[offs_n, k0:k0+BLOCK_K] decoded from NF4 into an [BLOCK_N, BLOCK_K] tile of OUT_DTYPE
    (each element computed in fp32, rounded once).

    Math: W[n, k] = code[nib(i)] * absmax[i // BLOCKSIZE] with i = n*K + k (blocks
    run over W flattened row-major, so in general a block may span rows).
    Elements past N or K come back as exact 0 so they add nothing to a dot.

    ROW_ALIGNED (K % BLOCKSIZE == 0, BLOCKSIZE a power of two, so K is even and
    no byte straddles two rows): the tile splits into runs of
    SUB = min(BLOCK_K, BLOCKSIZE) consecutive k that share one block, so the
    absmax (double-quant decode included) is computed once per run on a
    [BLOCK_N, BLOCK_K // SUB] tile and broadcast, not once per element.
    """
    if ROW_ALIGNED:
        # Each packed byte is loaded once (contiguous along k: vectorized loads)
        # and gives two neighbours: its high nibble is element k (even), its low
        # nibble element k + 1. The two decoded halves are interleaved back with
        # join + reshape.
        SUB: tl.constexpr = BLOCK_K if BLOCK_K < BLOCKSIZE else BLOCKSIZE
        HALF_SUB: tl.constexpr = SUB // 2
        run_start = k0 + tl.arange(0, BLOCK_K // SUB) * SUB                   # [RUNS]
        # K % SUB == 0, so a run lies entirely inside or entirely past K
        run_ok = n_ok[:, None] & (run_start[None, :] < K)                     # [BN, RUNS]
        byte_index = (offs_n[:, None, None] * (K // 2) + run_start[None, :, None] // 2
                      + tl.arange(0, HALF_SUB)[None, None, :])                 # [BN, RUNS, HALF]
        byte = tl.load(packed_ptr + byte_index, mask=run_ok[:, :, None], other=0).to(tl.int32)
        block = (offs_n[:, None] * K + run_start[None, :]) // BLOCKSIZE
        scale = _block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                              block, run_ok, seg_block_1, seg_block_2, seg_group_1, seg_group_2,
                              DOUBLE_QUANT, NESTED, SEGMENTED)
        scale = tl.where(run_ok, scale, 0.0)[:, :, None]   # rows/runs past the edge decode to 0
        table = tl.load(code_ptr + tl.arange(0, 16))
        even = (nf4_code_lookup(table, byte >> 4) * scale).to(OUT_DTYPE)
        odd = (nf4_code_lookup(table, byte & 15) * scale).to(OUT_DTYPE)
        return tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        valid = n_ok[:, None] & (offs_k[None, :] < K)
        flat = offs_n[:, None] * K + offs_k[None, :]
        values = _nf4_code_values(packed_ptr, code_ptr, flat, valid)
        scale = _block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                              flat // BLOCKSIZE, valid, seg_block_1, seg_block_2, seg_group_1,
                              seg_group_2, DOUBLE_QUANT, NESTED, SEGMENTED)
        return tl.where(valid, values * scale, 0.0).to(OUT_DTYPE)


@triton.jit
def _mma(a, b, acc, OPERANDS_IN_FP32: tl.constexpr):
    """acc + a @ b with fp32 accumulation.

    OPERANDS_IN_FP32: both tiles go to tl.dot as fp32 with IEEE precision (the
    interpreter, or fp32 activations). Otherwise both go to the tensor cores in
    ``a``'s fp16/bf16 dtype (``b``, the dequantized weight tile or a LoRA factor,
    is rounded to it as bitsandbytes rounds W to the compute dtype).
    """
    if OPERANDS_IN_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b.to(a.dtype), acc)
    return acc


@triton.jit
def _tile_ids(M_TILES, COLUMN_TILES, GROUP_M: tl.constexpr):
    """Map the 1-D program id to (row tile, column tile), walking GROUP_M row
    tiles down one column strip before moving right, so the weight tiles a
    group shares stay in L2 (a GROUP_M of 1 is plain row-major order)."""
    pid = tl.program_id(0)
    tiles_per_group = GROUP_M * COLUMN_TILES
    group = pid // tiles_per_group
    first_row_tile = group * GROUP_M
    rows_in_group = tl.minimum(M_TILES - first_row_tile, GROUP_M)
    inside = pid % tiles_per_group
    return first_row_tile + inside % rows_in_group, inside // rows_in_group


@triton.jit
def _nf4_matmul_fwd_kernel(
        x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
        nested_offset_ptr, seg_block_1, seg_block_2, seg_group_1, seg_group_2,
        y_ptr, xa_ptr, lora_b_ptr,
        M, N, K, R, lora_scale,
        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr,
        SEGMENTED: tl.constexpr, ROW_ALIGNED: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
        OPERANDS_IN_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    """Forward: y[m, n] = sum_k x[m, k] * W[n, k]  (+ lora_scale * sum_r xa[m, r] * B[n, r]).

    x: [M, K] row-major, W: logical [N, K] in NF4 (flat index n*K + k), y: [M, N].
    Each program owns one [BLOCK_M, BLOCK_N] tile of y and loops over K; each
    step decodes the [BLOCK_N, BLOCK_K] W tile from NF4 in registers and feeds
    its transpose to tl.dot.
    xa: [M, R] and B: [N, R] (lora_operand_dtype) feed the LoRA epilogue.
    """
    pid_m, pid_n = _tile_ids(tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if OPERANDS_IN_FP32:
        w_dtype = tl.float32
    else:
        w_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x_tile = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_tile = _nf4_weight_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                                  nested_code_ptr, nested_offset_ptr, seg_block_1, seg_block_2,
                                  seg_group_1, seg_group_2, offs_n, n_ok, k0, K,
                                  BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, NESTED, SEGMENTED,
                                  ROW_ALIGNED, w_dtype)
        acc = _mma(x_tile, tl.trans(w_tile), acc, OPERANDS_IN_FP32)
    if HAS_LORA:
        low_rank = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            xa = tl.load(xa_ptr + offs_m[:, None] * R + offs_r[None, :],
                         mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            b_t = tl.load(lora_b_ptr + offs_n[None, :] * R + offs_r[:, None],
                          mask=n_ok[None, :] & r_ok[:, None], other=0.0)
            low_rank = _mma(xa, b_t, low_rank, OPERANDS_IN_FP32)
        acc += lora_scale * low_rank
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _nf4_matmul_bwd_input_kernel(
        dy_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
        nested_offset_ptr, seg_block_1, seg_block_2, seg_group_1, seg_group_2,
        dx_ptr, g_ptr, lora_a_ptr, keep_ptr, gate_ptr, up_ptr,
        M, N, K, R, lora_scale, keep_scale,
        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr,
        SEGMENTED: tl.constexpr, ROW_ALIGNED: tl.constexpr, HAS_LORA: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, HAS_SWIGLU: tl.constexpr, BLOCK_R: tl.constexpr,
        OPERANDS_IN_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    """Backward w.r.t. the input: dx[m, k] = sum_n dy[m, n] * W[n, k]
    (+ lora_scale * keep[m, k] * keep_scale * sum_r g[m, r] * A[r, k]).

    Derivation: y = x W^T gives dL/dx = dL/dy . dy/dx = dY W. For the LoRA term
    y += s * (d(x) A^T) B^T with d(x) = x * keep / (1 - p): dL/d(d(x)) = s * (dY B) A,
    and d(x) is elementwise, so dL/dx gains s * keep/(1-p) * ((dY B) A); g = dY B
    (fp32 [M, R]) is precomputed because R is tiny. W is frozen: no dW.
    dy: [M, N], W: logical [N, K] in NF4, dx: [M, K]. Each program owns a
    [BLOCK_M, BLOCK_K] tile of dx and loops over N, decoding [BLOCK_N, BLOCK_K]
    W tiles in registers.

    HAS_SWIGLU (x = silu(gate) * up, the down projection's input): the tile of dx is
    not stored; dL/dgate and dL/dup of it (swiglu.swiglu_gradients, from the fp32
    tile) are, side by side in rows of 2K: dx_ptr[m, k] and dx_ptr[m, K + k], i.e.
    the output gradient of the concatenated gate/up projection.
    """
    pid_m, pid_k = _tile_ids(tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    k_ok = offs_k < K
    if OPERANDS_IN_FP32:
        w_dtype = tl.float32
    else:
        w_dtype = dy_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy_tile = tl.load(dy_ptr + offs_m[:, None] * N + offs_n[None, :],
                          mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w_tile = _nf4_weight_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                                  nested_code_ptr, nested_offset_ptr, seg_block_1, seg_block_2,
                                  seg_group_1, seg_group_2, offs_n, n_ok, pid_k * BLOCK_K, K,
                                  BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, NESTED, SEGMENTED,
                                  ROW_ALIGNED, w_dtype)
        acc = _mma(dy_tile, w_tile, acc, OPERANDS_IN_FP32)
    if HAS_LORA:
        low_rank = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            g = tl.load(g_ptr + offs_m[:, None] * R + offs_r[None, :],
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            a = tl.load(lora_a_ptr + offs_r[:, None] * K + offs_k[None, :],
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            low_rank = _mma(g, a, low_rank, OPERANDS_IN_FP32)
        if HAS_DROPOUT:
            keep = tl.load(keep_ptr + offs_m[:, None] * K + offs_k[None, :],
                           mask=m_ok[:, None] & k_ok[None, :], other=0)
            low_rank = tl.where(keep != 0, low_rank * keep_scale, 0.0)
        acc += lora_scale * low_rank
    tile_ok = m_ok[:, None] & k_ok[None, :]
    if HAS_SWIGLU:
        tile = offs_m[:, None] * K + offs_k[None, :]
        gate = tl.load(gate_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
        d_gate, d_up = swiglu_gradients(acc, gate, up)
        out = offs_m[:, None] * (2 * K) + offs_k[None, :]
        tl.store(dx_ptr + out, d_gate.to(dx_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(dx_ptr + K + out, d_up.to(dx_ptr.dtype.element_ty), mask=tile_ok)
    else:
        tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=tile_ok)


# ---------------------------------------------------------------------------
# block sizes
# ---------------------------------------------------------------------------

class GpuConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8       # row tiles walked per column strip, for L2 reuse of W tiles


# The autotuner's choices on a GPU, for the M the fused path sees (<= the dispatch
# threshold, 192 by default: 128-row tiles and 64-row ones). BLOCK_M 16
# tiles use mma.sync (HMMA: wgmma needs 64 rows) and waste less at M <= 16.
# Every one compiles for sm_90 within the shared-memory limit in bf16 and fp16
# (tests/test_hopper_compile.py, `-m sweep`).
GPU_CONFIGS = (
    GpuConfig(128, 128, 64, 8, 3), GpuConfig(64, 64, 64, 4, 4), GpuConfig(64, 128, 64, 4, 3),
    GpuConfig(64, 64, 128, 4, 3), GpuConfig(16, 64, 128, 4, 3), GpuConfig(16, 128, 64, 4, 3))
# The configs held to the no-spill / HGMMA bar by the default compile check:
# the reference tile and the small-M one.
CHOSEN_GPU_CONFIGS = GPU_CONFIGS[:2]


def lora_operand_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    """dtype of the LoRA epilogue's operands (xa or g, and B or A) for these activations:
    the activations' own on a GPU (the epilogue's rank-r dot runs on the tensor cores
    with fp32 accumulation), fp32 where the kernels compute in fp32."""
    return torch.float32 if _operands_in_fp32(activation_dtype) else activation_dtype


def _gpu_configs():
    return [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k,
                           "GROUP_M": c.group_m}, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in GPU_CONFIGS]


if _runtime.INTERPRETING:
    # The interpreter cannot autotune (NOTES.md); the launcher picks blocks.
    _fwd_kernel = _nf4_matmul_fwd_kernel
    _bwd_input_kernel = _nf4_matmul_bwd_input_kernel
else:
    _fwd_kernel = triton.autotune(configs=_gpu_configs(), key=["M", "N", "K"])(
        _nf4_matmul_fwd_kernel)
    _bwd_input_kernel = triton.autotune(configs=_gpu_configs(), key=["M", "N", "K"])(
        _nf4_matmul_bwd_input_kernel)


def _interpreter_block(size: int, cap: int) -> int:
    # Interpreter cost ~ programs x loop steps (NOTES.md): each program and each
    # operation costs a fixed Python overhead, while NumPy handles a tile of
    # 512 x 256 as fast as a small one, so cover a whole dimension where we can.
    return min(cap, max(16, triton.next_power_of_2(size)))


def _launch(kernel, name: str, grid_dims, args, constexprs, flops: int):
    """Launch with launcher-chosen blocks on the interpreter, autotuned on GPU.
    FMA contraction is off, so the absmax decode nested_code * nested_absmax +
    offset rounds twice, as in nf4_dequantize and bitsandbytes (the MMAs and the
    single multiply per element do not depend on it).

    ``name`` and ``flops`` (2 per multiply-add) go to _runtime.record_launch.
    grid_dims: (rows, columns) of the output tile grid, as sizes of the
    dimensions that BLOCK_M and the second block constexpr cut.
    """
    rows, (column_size, column_block_name) = grid_dims
    _runtime.record_launch(name, flops)
    if _runtime.INTERPRETING:
        blocks = {"BLOCK_M": _interpreter_block(rows, 512), "BLOCK_N": _interpreter_block(args["N"], 256),
                  "BLOCK_K": _interpreter_block(args["K"], 256), "GROUP_M": 1}
        n_tiles = triton.cdiv(rows, blocks["BLOCK_M"]) * triton.cdiv(
            column_size, blocks[column_block_name])
        kernel[(n_tiles,)](**args, **constexprs, **blocks, **_NO_FMA)
    else:
        def grid(meta):
            return (triton.cdiv(rows, meta["BLOCK_M"])
                    * triton.cdiv(column_size, meta[column_block_name]),)
        kernel[grid](**args, **constexprs, **_NO_FMA)


def _lora_block(rank: int) -> int:
    # tl.dot needs every dimension >= 16; ranks above 64 loop in chunks.
    return min(64, max(16, triton.next_power_of_2(rank)))


# ---------------------------------------------------------------------------
# launchers (2-D)
# ---------------------------------------------------------------------------

class LoraForwardEpilogue(NamedTuple):
    """y += scale * xa @ B^T on the output tile."""
    xa: torch.Tensor       # [M, r], any float dtype (cast to lora_operand_dtype)
    lora_b: torch.Tensor   # [N, r], contiguous, any float dtype
    scale: float


class LoraBackwardEpilogue(NamedTuple):
    """dx += scale * keep/(1-p) * (g @ A) on the output tile."""
    g: torch.Tensor                    # [M, r] = dY B, any float dtype
    lora_a: torch.Tensor               # [r, K], contiguous, any float dtype
    scale: float
    keep: Optional[torch.Tensor]       # uint8 [M, K] (1 = kept), None without dropout
    keep_scale: float                  # 1 / (1 - p)


def _lora_operand(t: torch.Tensor, activation_dtype: torch.dtype) -> torch.Tensor:
    # [M, r] or [N, r] / [r, K]: a small copy at most
    return t.to(lora_operand_dtype(activation_dtype)).contiguous()


def _operands_in_fp32(dtype: torch.dtype) -> bool:
    return _runtime.DOT_IN_FP32 or dtype == torch.float32


def launch_forward(op: str, x2d: torch.Tensor, w: NF4Weight,
                   lora: Optional[LoraForwardEpilogue] = None, *,
                   dense_w: Optional[torch.Tensor] = None,
                   path: Optional[str] = None) -> torch.Tensor:
    """y = x2d @ W^T (+ LoRA epilogue). Arguments must already be validated.

    ``path`` 'fused' | 'dequant' | None (by M: nf4_dense.choose_path). The
    dequantize path uses ``dense_w`` (= dequantize_for_matmul(w, x2d.dtype)) when
    given, so a caller running forward and backward on one layer decodes W once."""
    M, K = x2d.shape
    N = w.shape[0]
    check_numel(op, "the output [M, N]", M * N)
    y = _runtime.new_output((M, N), x2d.dtype, x2d.device)
    if M == 0:
        return y
    if dense_w is not None or choose_path(op, M, path, x2d.dtype) == "dequant":
        if dense_w is None:
            dense_w = dequantize_for_matmul(w, x2d.dtype)
        check_dense_weight(op, dense_w, w, x2d.dtype)
        return dense_forward(x2d, dense_w, y, lora)
    rank = 0 if lora is None else lora.xa.shape[1]
    args = dict(x_ptr=x2d, y_ptr=y, M=M, N=N, K=K, R=max(rank, 1),
                xa_ptr=x2d if lora is None else _lora_operand(lora.xa, x2d.dtype),
                lora_b_ptr=x2d if lora is None else _lora_operand(lora.lora_b, x2d.dtype),
                lora_scale=0.0 if lora is None else float(lora.scale),
                **weight_args(w))
    constexprs = dict(HAS_LORA=lora is not None, BLOCK_R=_lora_block(rank),
                      OPERANDS_IN_FP32=_operands_in_fp32(x2d.dtype), **weight_constexprs(w))
    _launch(_fwd_kernel, "_nf4_matmul_fwd_kernel", (M, (N, "BLOCK_N")), args, constexprs,
            2 * M * N * (K + rank))
    return y


def check_swiglu_input(op: str, swiglu_input, M: int, K: int, dtype: torch.dtype) -> None:
    """``swiglu_input`` = (gate, up), each [M, K] in the activations' dtype, or None."""
    if swiglu_input is None:
        return
    if not isinstance(swiglu_input, (tuple, list)) or len(swiglu_input) != 2:
        raise ValueError(f"{op}: argument 'swiglu_input' must be (gate, up) or None")
    for name, t in zip(("gate", "up"), swiglu_input):
        check_tensor(op, f"swiglu_input.{name}", t, dtypes=(dtype,), ndim=2, shape=(M, K))


def launch_backward_input(op: str, dy2d: torch.Tensor, w: NF4Weight, out_dtype: torch.dtype,
                          lora: Optional[LoraBackwardEpilogue] = None, *,
                          dense_w: Optional[torch.Tensor] = None, path: Optional[str] = None,
                          swiglu_input: Optional[tuple] = None) -> torch.Tensor:
    """dx = dy2d @ W (+ LoRA epilogue). Arguments must already be validated.
    ``dense_w`` and ``path`` as in launch_forward (dense_w in dy2d's dtype).
    ``swiglu_input`` = (gate, up) with x = silu(gate) * up: returns [dgate, dup]
    [M, 2K] instead of dx (the kernel's SwiGLU epilogue)."""
    M, N = dy2d.shape
    K = w.shape[1]
    check_numel(op, f"the input gradient [M, {'K' if swiglu_input is None else '2K'}]",
                M * K * (1 if swiglu_input is None else 2))
    dx = _runtime.new_output((M, K * (1 if swiglu_input is None else 2)), out_dtype, dy2d.device)
    if M == 0:
        return dx
    if dense_w is not None or choose_path(op, M, path, dy2d.dtype) == "dequant":
        if dense_w is None:
            dense_w = dequantize_for_matmul(w, dy2d.dtype)
        check_dense_weight(op, dense_w, w, dy2d.dtype)
        if swiglu_input is None:
            return dense_backward_input(dy2d, dense_w, dx, lora)
        dm = dense_backward_input(dy2d, dense_w, _runtime.new_output((M, K), out_dtype, dy2d.device),
                                  lora)
        return torch.cat(swiglu_backward(dm, *swiglu_input), dim=1, out=dx)
    rank = 0 if lora is None else lora.g.shape[1]
    has_dropout = lora is not None and lora.keep is not None
    args = dict(dy_ptr=dy2d, dx_ptr=dx, M=M, N=N, K=K, R=max(rank, 1),
                g_ptr=dy2d if lora is None else _lora_operand(lora.g, dy2d.dtype),
                lora_a_ptr=dy2d if lora is None else _lora_operand(lora.lora_a, dy2d.dtype),
                keep_ptr=lora.keep if has_dropout else dy2d,
                gate_ptr=dy2d if swiglu_input is None else swiglu_input[0],
                up_ptr=dy2d if swiglu_input is None else swiglu_input[1],
                lora_scale=0.0 if lora is None else float(lora.scale),
                keep_scale=1.0 if lora is None else float(lora.keep_scale),
                **weight_args(w))
    constexprs = dict(HAS_LORA=lora is not None, HAS_DROPOUT=has_dropout,
                      HAS_SWIGLU=swiglu_input is not None,
                      BLOCK_R=_lora_block(rank),
                      OPERANDS_IN_FP32=_operands_in_fp32(dy2d.dtype), **weight_constexprs(w))
    _launch(_bwd_input_kernel, "_nf4_matmul_bwd_input_kernel", (M, (K, "BLOCK_K")), args,
            constexprs, 2 * M * K * (N + rank))
    return dx


def nf4_matmul_forward(x2d: torch.Tensor, w: NF4Weight, *, dense_w: Optional[torch.Tensor] = None,
                       path: Optional[str] = None) -> torch.Tensor:
    """y2d = x2d @ W^T for x2d [M, K] fp32/fp16/bf16 and W [N, K] in NF4; y2d in x2d's dtype.
    ``dense_w``/``path``: see launch_forward."""
    op = "nf4_matmul_forward"
    check_nf4_weight(op, w)
    check_tensor(op, "x2d", x2d, dtypes=FLOAT_DTYPES, ndim=2, shape=(None, w.shape[1]))
    check_same_device(op, x2d=x2d, w=w.packed)
    return launch_forward(op, x2d, w, dense_w=dense_w, path=path)


def nf4_matmul_backward_input(dy2d: torch.Tensor, w: NF4Weight, *,
                              dense_w: Optional[torch.Tensor] = None,
                              path: Optional[str] = None,
                              swiglu_input: Optional[tuple] = None) -> torch.Tensor:
    """dx2d = dy2d @ W for dy2d [M, N] and W [N, K] in NF4; dx2d in dy2d's dtype.
    ``dense_w``/``path``/``swiglu_input``: see launch_backward_input."""
    op = "nf4_matmul_backward_input"
    check_nf4_weight(op, w)
    check_tensor(op, "dy2d", dy2d, dtypes=FLOAT_DTYPES, ndim=2, shape=(None, w.shape[0]))
    check_same_device(op, dy2d=dy2d, w=w.packed)
    check_swiglu_input(op, swiglu_input, dy2d.shape[0], w.shape[1], dy2d.dtype)
    return launch_backward_input(op, dy2d, w, dy2d.dtype, dense_w=dense_w, path=path,
                                 swiglu_input=swiglu_input)


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------

class NF4Matmul(torch.autograd.Function):
    """y = x @ W^T over the last dim of x; gradient flows to x only (W is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
        op = "nf4_matmul"
        check_nf4_weight(op, w)
        check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
        if x.dim() < 1 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"{op}: argument 'x' has shape {tuple(x.shape)}; expected "
                             f"last dim {w.shape[1]} (= in_features K of w {tuple(w.shape)})")
        check_same_device(op, x=x, w=w.packed)
        ctx.w = w
        ctx.x_shape = x.shape
        y2d = launch_forward(op, x.reshape(-1, w.shape[1]), w)
        return y2d.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        w = ctx.w
        if not ctx.needs_input_grad[0]:
            return None, None
        dy2d = dy.reshape(-1, w.shape[0]).contiguous()
        dx2d = launch_backward_input("nf4_matmul.backward", dy2d, w, dy.dtype)
        return dx2d.reshape(ctx.x_shape), None


def nf4_matmul(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """y = x @ W^T. x: [..., K] fp32/fp16/bf16, contiguous; W: NF4Weight of logical
    shape [N, K]. Returns [..., N] in x's dtype (fp32 accumulation). Differentiable
    in x; W gets no gradient."""
    return NF4Matmul.apply(x, w)
