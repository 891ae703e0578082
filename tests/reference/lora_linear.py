"""Float64 references for nf4_matmul and lora_linear, plus a double-quantized
NF4 test-weight builder that needs no bitsandbytes (absent on the GPU machine).

The references take the already-dequantized float64 weight
(tests.reference.nf4.reference_nf4_dequantize) and are differentiable, so
torch.autograd.grad of them is the backward oracle.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from csrc_triton.nf4 import NF4Weight
from csrc_triton.nf4_codebook import NESTED_BLOCKSIZE


def reference_nf4_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = x @ W^T over the last dim of x (float64 in, float64 out)."""
    return x @ w.t()


def reference_lora_linear(x: torch.Tensor, w: torch.Tensor, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scale: float,
                          keep_mask: Optional[torch.Tensor] = None,
                          dropout: float = 0.0) -> torch.Tensor:
    """y = x W^T + scale * (drop(x) A^T) B^T with drop(x) = x * keep / (1 - p).

    keep_mask: bool, x's shape (True = kept); None means no dropout.
    """
    dropped = x if keep_mask is None else x * keep_mask.to(x.dtype) / (1.0 - dropout)
    return x @ w.t() + scale * ((dropped @ lora_a.t()) @ lora_b.t())


def reference_double_quantize(q: NF4Weight) -> NF4Weight:
    """Re-encode a single-quant NF4Weight's fp32 absmax the way bitsandbytes'
    double quantization lays it out: absmax_u8 indexes a 256-entry signed code,
    scaled per group of 256 blocks by nested_absmax, plus a scalar offset (the
    mean absmax). The code here is a plain linear map in [-1, 1]: the kernels
    only look values up, so any 256 codes test the same path."""
    absmax = q.absmax.to(torch.float64)
    offset = absmax.mean()
    centered = absmax - offset
    n_groups = -(-absmax.numel() // NESTED_BLOCKSIZE)
    padded = torch.zeros(n_groups * NESTED_BLOCKSIZE, dtype=torch.float64)
    padded[: absmax.numel()] = centered
    nested_absmax = padded.view(n_groups, -1).abs().amax(dim=1).clamp_min(1e-12)
    nested_code = torch.linspace(-1.0, 1.0, 256, dtype=torch.float64)
    per_block_scale = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: absmax.numel()]
    normalized = centered / per_block_scale
    absmax_u8 = (normalized[:, None] - nested_code[None, :]).abs().argmin(dim=1).to(torch.uint8)
    return replace(q, absmax=absmax_u8, nested_absmax=nested_absmax.to(torch.float32),
                   nested_code=nested_code.to(torch.float32),
                   nested_offset=offset.to(torch.float32).reshape(()))
