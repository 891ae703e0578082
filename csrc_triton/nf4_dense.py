"""The large-M path of the NF4 matmul: dequantize W once, then cuBLAS.

At training shapes (M = tokens in the thousands) a fused kernel that decodes
NF4 inside the matmul spends more issue slots on the decode than on the tensor
cores (see ``fused_max_m``), while "dequantize, then a dense GEMM" costs one
memory-bound pass over W plus a GEMM that runs at the library's full rate.
This module holds that path and the rule choosing it:

  forward   y  = x W^T                       torch.mm in the compute dtype, fp32 accumulation
            y += scale * xa B^T              one addmm on the same output (rank-r GEMM)
  backward  dx = dY W                        torch.mm
            dx += scale * keep/(1-p) * (g A)   addmm, or mm + mask when dropout ran

The compute dtype is the activation's (fp16/bf16 go to the tensor cores with
W rounded to it once, as bitsandbytes rounds it); under the Triton interpreter
every operand is fp32 (``_runtime.DOT_IN_FP32``), as the fused kernels compute
there, and only the output is rounded.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from . import _runtime
from .nf4 import NF4Weight
from .nf4_decode import launch_nf4_dequantize

# --------------------------------------------------------------------------------------
# Dispatch: fused kernel below FUSED_MAX_M rows, dequantize + cuBLAS from there on.
# --------------------------------------------------------------------------------------

FUSED_MAX_M_VARIABLE = "ANITA_NF4_FUSED_MAX_M"

# Static H100 SXM figures the cost model uses (no GPU has measured the crossover yet):
H100_ISSUE_RATE = 132 * 4 * 1.755e9   # warp-instructions per second: SMs x schedulers x clock
H100_COPY_BYTES_PER_S = 3.0e12        # ~90% of the 3.35 TB/s HBM3 peak
# Non-MMA SASS instructions the fused kernel issues per decoded weight element,
# read off its sm_90 main loop by tests/sm90_compile.py: (loop instructions -
# HGMMAs) x num_warps / (BLOCK_N x BLOCK_K). bf16 forward, 64x64x64, 4 warps:
# (353 - 4) x 4 / 4,096 = 0.34. (Before the decode was vectorized, 128x128x64,
# 8 warps: (1,044 - 4) x 8 / 8,192 = 1.02, which put the threshold at one tile row.)
FUSED_DECODE_INSTRUCTIONS_PER_ELEMENT = 0.34
# Rows of the fused kernel's small-M tile (its configs have BLOCK_M <= this).
FUSED_TILE_M = 64
# Bytes per weight element the dequantize path moves beyond the fused kernel:
# the dequantize pass reads 0.5 and writes 2 (bf16), the GEMM reads 2 instead of
# the fused kernel's 0.5 (the block absmax, 1/64 byte per element, is left out).
DEQUANT_EXTRA_BYTES_PER_ELEMENT = 0.5 + 2.0 + 2.0 - 0.5


def fused_max_m(decode_instructions_per_element: float = FUSED_DECODE_INSTRUCTIONS_PER_ELEMENT,
                issue_rate: float = H100_ISSUE_RATE, copy_rate: float = H100_COPY_BYTES_PER_S,
                tile_m: int = FUSED_TILE_M) -> int:
    """The largest M for which the static cost model prefers the fused kernel.

    Both paths issue the same tensor-core work (2 M N K). On top of it the fused
    kernel decodes every weight element once per row of output tiles,
    ceil(M / tile_m) x N K x c instructions at ``issue_rate`` (the turn-1 loop
    does not overlap decode with the MMA, so the times add), while the
    dequantize path moves DEQUANT_EXTRA_BYTES_PER_ELEMENT x N K more bytes at
    ``copy_rate``. The fused kernel wins while
        ceil(M / tile_m) < extra_bytes x issue_rate / (c x copy_rate),
    i.e. for M up to tile_m x floor(that ratio) (at least one tile row: at M <=
    tile_m the fused kernel also reads 4x fewer weight bytes, which is what
    bounds small-M matmuls). With the figures below the ratio is 3.6, so the
    threshold is 3 x 64 = 192 rows (with the turn-1 decode, 1.02 instructions per
    element, it was 1.2: one tile row, 64). No GPU has measured the crossover yet;
    bench/nf4_matmul.py reports it, and $ANITA_NF4_FUSED_MAX_M overrides the model.
    """
    ratio = DEQUANT_EXTRA_BYTES_PER_ELEMENT * issue_rate / (
        decode_instructions_per_element * copy_rate)
    return tile_m * max(1, math.floor(ratio))


FUSED_MAX_M_DEFAULT = fused_max_m()


def fused_max_m_setting() -> int:
    """FUSED_MAX_M_DEFAULT, or the value of $ANITA_NF4_FUSED_MAX_M (an int >= 0;
    0 sends every M to the dequantize path)."""
    raw = os.environ.get(FUSED_MAX_M_VARIABLE)
    if raw is None or raw.strip() == "":
        return FUSED_MAX_M_DEFAULT
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{FUSED_MAX_M_VARIABLE}={raw!r}: expected an integer >= 0 "
                         "(rows up to which the fused NF4 kernel is used)")
    return value


PATHS = ("fused", "dequant")


def choose_path(op: str, m: int, path: Optional[str] = None,
                dtype: Optional[torch.dtype] = None) -> str:
    """'fused' for m <= the threshold, else 'dequant'; an explicit ``path`` wins.

    fp32 activations on a GPU always take the dequantize path: the fused
    kernel's fp32 dot (IEEE, no tensor cores) compiles to FFMA and spills
    (tests/sm90_compile.py), where cuBLAS' SGEMM does not."""
    if path is not None:
        if path not in PATHS:
            raise ValueError(f"{op}: argument 'path' is {path!r}; expected one of {PATHS} or None")
        return path
    if dtype == torch.float32 and not _runtime.DOT_IN_FP32:
        return "dequant"
    return "fused" if m <= fused_max_m_setting() else "dequant"


# --------------------------------------------------------------------------------------
# The dequantize path
# --------------------------------------------------------------------------------------

def compute_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if _runtime.DOT_IN_FP32 else activation_dtype


def dequantize_for_matmul(w: NF4Weight, activation_dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in the dtype the dequantize path multiplies in (a new tensor)."""
    return launch_nf4_dequantize(w, compute_dtype(activation_dtype)).view(w.shape)


def check_dense_weight(op: str, dense_w: torch.Tensor, w: NF4Weight,
                       activation_dtype: torch.dtype) -> None:
    """A caller-held dequantized W must be what dequantize_for_matmul returns."""
    want = compute_dtype(activation_dtype)
    if (not isinstance(dense_w, torch.Tensor) or dense_w.shape != w.shape
            or dense_w.dtype != want or dense_w.device != w.device):
        got = (f"{type(dense_w).__name__}" if not isinstance(dense_w, torch.Tensor)
               else f"{dense_w.dtype} {tuple(dense_w.shape)} on {dense_w.device}")
        raise ValueError(f"{op}: argument 'dense_w' is {got}; expected {want} "
                         f"{tuple(w.shape)} on {w.device} (dequantize_for_matmul(w, dtype))")


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def dense_forward(x2d: torch.Tensor, dense_w: torch.Tensor, out: torch.Tensor,
                  lora=None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out = x2d W^T (+ bias) (+ lora.scale * xa B^T), written into ``out`` (x2d's dtype).
    The bias [N] rides in the GEMM: addmm with a 1-D contiguous bias into a contiguous
    ``out`` (beta 1, K and N > 1) is cuBLASLt's bias epilogue in PyTorch's CUDA addmm, not
    another pass over ``out`` (outside those conditions PyTorch copies b into out first)."""
    dtype = dense_w.dtype
    x = _as(x2d, dtype)
    if dtype == out.dtype:
        if bias is None:
            torch.mm(x, dense_w.t(), out=out)
        else:
            torch.addmm(bias, x, dense_w.t(), out=out)
        if lora is not None:
            out.addmm_(_as(lora.xa, dtype), _as(lora.lora_b, dtype).t(), alpha=lora.scale)
        return out
    # interpreter, fp16/bf16 activations: fp32 throughout, one rounding at the end
    y = torch.mm(x, dense_w.t()) if bias is None else torch.addmm(_as(bias, dtype), x, dense_w.t())
    if lora is not None:
        y.addmm_(_as(lora.xa, dtype), _as(lora.lora_b, dtype).t(), alpha=lora.scale)
    return out.copy_(y)


def dense_backward_input(dy2d: torch.Tensor, dense_w: torch.Tensor, out: torch.Tensor,
                         lora=None) -> torch.Tensor:
    """out = dY W (+ lora.scale * keep * keep_scale * (g A)), written into ``out``."""
    dtype = dense_w.dtype
    dy = _as(dy2d, dtype)
    acc = out if dtype == out.dtype else None
    acc = torch.mm(dy, dense_w, out=acc) if acc is not None else torch.mm(dy, dense_w)
    if lora is not None:
        g, a = _as(lora.g, dtype), _as(lora.lora_a, dtype)
        if lora.keep is None:
            acc.addmm_(g, a, alpha=lora.scale)
        else:
            low_rank = torch.mm(g, a)
            low_rank.mul_(lora.keep)
            acc.add_(low_rank, alpha=lora.scale * lora.keep_scale)
    return acc if acc is out else out.copy_(acc)
