"""The lm-head's matmuls with fp32 results (linear_loss's token chunks): a @ b for a, b
of one dtype, as fp32, with fp32 accumulation.

GPU fp16/bf16: cuBLAS with an fp32 output, torch.mm(a, b, out_dtype=torch.float32).
Only where that is unsupported does the process fall back, for good and with one
warning, to upcasting the operands: a torch whose mm has no out_dtype argument
(TypeError naming it), a build without the aten::mm.dtype kernel (NotImplementedError
naming it), or _mm_dtype_out_cuda's own checks (RuntimeError "out_dtype must be ...").
Every other error propagates and changes nothing: running out of memory (a batch
search provokes it on purpose), an illegal memory access, a launch failure.
CPU: upcast, exact for the products of half values.

The upcast never makes an fp32 copy of a whole large operand (the lm-head weight is
2.1 GB in fp32 at LLaMA-3's vocabulary): past UPCAST_BLOCK_BYTES of fp32 operands,
the product is built in blocks along its largest dimension, each block's operands
upcast on their own (along M or N: rows or columns of the result; along K: partial
products added into it). ``upcast_bytes`` is the most one call holds in fp32 copies
beside its result (the memory planner counts it: anita_core.memory.replay), and
``upcasts`` says whether a call on this device and dtype takes that path.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch

UPCAST_BLOCK_BYTES = 32 * 2**20

# None: not known yet; False once torch.mm(out_dtype=float32) proved unsupported
_cuda_out_dtype_works: Optional[bool] = None


def out_dtype_unsupported(err: BaseException) -> bool:
    """Whether ``err`` (raised by torch.mm(..., out_dtype=torch.float32)) says that
    the fp32-output matmul is unavailable, rather than that the call failed."""
    text = str(err)
    if isinstance(err, TypeError):
        return "out_dtype" in text                  # mm() without the keyword
    if isinstance(err, NotImplementedError):
        return "mm.dtype" in text                   # no aten::mm.dtype kernel here
    if isinstance(err, RuntimeError):
        return "out_dtype must be" in text          # _mm_dtype_out_cuda's TORCH_CHECKs
    return False


def _try_out_dtype(a: torch.Tensor, b: torch.Tensor) -> Optional[torch.Tensor]:
    """torch.mm(a, b, out_dtype=float32), or None (and the fallback from now on) when
    that is unsupported; any other error propagates."""
    global _cuda_out_dtype_works
    try:
        product = torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError) as err:
        if not out_dtype_unsupported(err):
            raise
        _cuda_out_dtype_works = False
        warnings.warn(f"linear_loss: torch.mm(out_dtype=float32) unavailable ({err}); "
                      "computing the lm-head chunks from fp32 operands instead (exact, slower)")
        return None
    _cuda_out_dtype_works = True
    return product


def upcasts(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether mm_fp32 upcasts operands of ``dtype`` on ``device``: on a CPU for half
    dtypes, on a GPU where out_dtype is unsupported (asked once, with a 1 x 1 product)."""
    if dtype == torch.float32:
        return False
    if torch.device(device).type != "cuda":
        return True
    if _cuda_out_dtype_works is None:
        one = torch.zeros((1, 1), dtype=dtype, device=device)
        _try_out_dtype(one, one)
    return not _cuda_out_dtype_works


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32 with fp32 accumulation, for a [M, K] and b [K, N] of one dtype."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _cuda_out_dtype_works is not False:
        product = _try_out_dtype(a, b)
        if product is not None:
            return product
    return _upcast_mm(a, b)


def _blocks(M: int, K: int, N: int) -> Tuple[Optional[str], int]:
    """(the dimension the upcast product is cut along, or None for one piece; rows of
    that dimension per block)."""
    if (M * K + K * N) * 4 <= UPCAST_BLOCK_BYTES:
        return None, 0
    axis = max((M, "M"), (N, "N"), (K, "K"))[1]
    per_row = {"M": K, "N": K + M, "K": M + N}[axis] * 4
    return axis, max(1, UPCAST_BLOCK_BYTES // per_row)


def upcast_bytes(M: int, K: int, N: int) -> int:
    """The most one upcasting mm_fp32 of [M, K] @ [K, N] holds besides its [M, N] fp32
    result: the fp32 operands (one piece), or the whole upcast operand that is not cut
    plus one block's upcast slice (and, cut along N, the block's product before it is
    copied into the result's columns)."""
    axis, block = _blocks(M, K, N)
    if axis is None:
        return (M * K + K * N) * 4
    if axis == "M":
        return (K * N + block * K) * 4
    if axis == "N":
        return (M * K + block * (K + M)) * 4
    return block * (M + N) * 4


def _upcast_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    M, K = a.shape
    N = b.shape[1]
    axis, block = _blocks(M, K, N)
    if axis is None:
        return a.float() @ b.float()
    out = torch.empty((M, N), dtype=torch.float32, device=a.device)
    if axis == "M":
        b32 = b.float()
        for i in range(0, M, block):
            torch.mm(a[i:i + block].float(), b32, out=out[i:i + block])
    elif axis == "N":
        a32 = a.float()
        for j in range(0, N, block):
            out[:, j:j + block] = a32 @ b[:, j:j + block].float()
    else:
        for k in range(0, K, block):
            a_k, b_k = a[:, k:k + block].float(), b[k:k + block].float()
            if k == 0:
                torch.mm(a_k, b_k, out=out)
            else:
                out.addmm_(a_k, b_k)
            del a_k, b_k            # before the next block's copies exist
    return out
