"""low_rank_matmul: the rank-r products of LoRA (x A^T, dY B, dY^T xa, g^T x) when the
compute dtype is wider than an operand.

lora_linear computes its rank-r products in the compute dtype (nf4_dense.compute_dtype)
with fp32 accumulation. On a GPU that is the activations' fp16/bf16, and torch.mm
(cuBLAS, tensor cores) takes the activations as they are. Where the kernels compute in
fp32 (the Triton interpreter) a torch.mm would need an fp32 copy of the activation
first: a whole [tokens x hidden] tensor written and read again for a product whose
output is [tokens x r]. This kernel reads each operand in its own dtype and widens the
tile in registers instead, so no copy of an activation is ever made.

    C[M, N] = scale * sum_k A[m, k] B[k, n]    (fp32 accumulation, one rounding to C)

A and B are read through their strides, so a transposed operand (dY^T, g^T) costs
nothing either; offsets are int64 when an operand spans more than 2^31 - 1
elements (INDEX_64, chosen by the launcher), int32 otherwise. No backward: it is a
building block of lora_linear's hand-written backward, never differentiated itself.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _runtime
from .checks import wide_index
from .nf4_matmul import _interpreter_block
from .nf4_matmul_kernels import _mma

_GPU_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)


@triton.jit
def _low_rank_matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk,
                            stride_bn, scale, OPERANDS_IN_FP32: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            INDEX_64: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of C = scale * A @ B, looping over K; C is [M, N]
    row-major. Out-of-range rows and columns load as 0 and add nothing."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        if INDEX_64:
            offs_k = offs_k.to(tl.int64)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, OPERANDS_IN_FP32)
    acc = acc * scale
    tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def low_rank_matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype,
                    scale: Optional[float] = None) -> torch.Tensor:
    """scale * (a @ b) as a new [M, N] tensor of ``out_dtype``; a [M, K] and b [K, N] any
    float dtypes and strides (arguments are the caller's to validate)."""
    M, K = a.shape
    N = b.shape[1]
    c = _runtime.new_output((M, N), out_dtype, a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    if _runtime.INTERPRETING:
        blocks = dict(BLOCK_M=_interpreter_block(M, 512), BLOCK_N=_interpreter_block(N, 256),
                      BLOCK_K=_interpreter_block(K, 256))
    else:
        blocks = _GPU_BLOCKS
    grid = (triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(N, blocks["BLOCK_N"]))
    _runtime.record_launch("_low_rank_matmul_kernel", 2 * M * N * K)
    _low_rank_matmul_kernel[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0),
                                  b.stride(1), 1.0 if scale is None else float(scale),
                                  OPERANDS_IN_FP32=_runtime.DOT_IN_FP32 or torch.float32 in
                                  (a.dtype, b.dtype), INDEX_64=wide_index(a, b, c), **blocks)
    return c
