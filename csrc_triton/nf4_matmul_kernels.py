"""The fused NF4 matmul kernels (nf4_matmul's small-M path, launched there) and their
@triton.jit decode / tile helpers (low_rank's kernel shares _mma).

A full-precision copy of W is never written: each program decodes the
[BLOCK_N, BLOCK_K] slice of W it is about to multiply straight from the packed
bytes (each byte loaded once, giving two neighbouring elements), the 16-entry
code (loaded once per program, gathered in registers) and the per-block absmax
(decoded once per run of a block). At these M the matmul is bound by reading W,
and the fused kernel reads 4x fewer bytes than a bf16 matmul.

The forward adds an optional frozen bias in its epilogue (HAS_BIAS: Qwen2's q/k/v,
y[m, n] += b[n] in fp32 before the one rounding); without it the kernel compiles as
it did before the bias existed. Both kernels carry an optional LoRA epilogue (used by
``lora_linear``):
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

import triton
import triton.language as tl

from .nf4_decode import block_absmax, nf4_code_lookup
from .swiglu import swiglu_gradients

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
        scale = block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
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
        scale = block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
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
        y_ptr, xa_ptr, lora_b_ptr, bias_ptr,
        M, N, K, R, lora_scale,
        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr,
        SEGMENTED: tl.constexpr, ROW_ALIGNED: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
        HAS_BIAS: tl.constexpr, OPERANDS_IN_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    """Forward: y[m, n] = sum_k x[m, k] * W[n, k]  (+ lora_scale * sum_r xa[m, r] * B[n, r])
    (+ bias[n]).

    x: [M, K] row-major, W: logical [N, K] in NF4 (flat index n*K + k), y: [M, N].
    Each program owns one [BLOCK_M, BLOCK_N] tile of y and loops over K; each
    step decodes the [BLOCK_N, BLOCK_K] W tile from NF4 in registers and feeds
    its transpose to tl.dot.
    xa: [M, R] and B: [N, R] (lora_operand_dtype) feed the LoRA epilogue.
    bias: [N] in y's dtype (HAS_BIAS), widened to fp32 and added to the accumulator,
    so the output is rounded once. The bias is frozen (no gradient), and dL/dx does
    not involve it: the backward kernel has no bias term.
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
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _nf4_matmul_bwd_input_kernel(
        dy_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
        nested_offset_ptr, seg_block_1, seg_block_2, seg_group_1, seg_group_2,
        dx_ptr, g_ptr, lora_a_ptr, keep_ptr, gate_ptr, up_ptr,
        M, N, K, R, lora_scale, keep_scale, stride_gate, stride_up,
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
    the output gradient of the concatenated gate/up projection. gate and up are read
    through their row strides (halves of that projection's [M, 2K] output).
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
        gate = tl.load(gate_ptr + offs_m[:, None] * stride_gate + offs_k[None, :], mask=tile_ok,
                       other=0.0).to(tl.float32)
        up = tl.load(up_ptr + offs_m[:, None] * stride_up + offs_k[None, :], mask=tile_ok,
                     other=0.0).to(tl.float32)
        d_gate, d_up = swiglu_gradients(acc, gate, up)
        out = offs_m[:, None] * (2 * K) + offs_k[None, :]
        tl.store(dx_ptr + out, d_gate.to(dx_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(dx_ptr + K + out, d_up.to(dx_ptr.dtype.element_ty), mask=tile_ok)
    else:
        tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=tile_ok)

