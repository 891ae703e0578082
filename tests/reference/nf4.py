"""Reference NF4 in plain torch: quantize to the nearest code value, dequantize by lookup.

Used to build NF4Weight test inputs for other ops and as the float64 oracle of
what a dequantized weight is. Byte-identity with bitsandbytes is tested
against bitsandbytes itself, not against this.
"""
from __future__ import annotations

import torch

from csrc_triton.nf4 import NF4Weight, nf4_code


def reference_nf4_quantize(w: torch.Tensor, blocksize: int = 64) -> NF4Weight:
    """Single-level NF4 (fp32 absmax), nearest code value per element."""
    flat = w.detach().reshape(-1).to(torch.float64)
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.zeros(n_blocks * blocksize, dtype=torch.float64)
    padded[:n] = flat
    blocks = padded.view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1).to(torch.float32)
    scale = absmax.to(torch.float64).clamp_min(torch.finfo(torch.float32).tiny)
    normalized = (blocks / scale[:, None]).reshape(-1)[:n]
    code = nf4_code().to(torch.float64)
    idx = (normalized[:, None] - code[None, :]).abs().argmin(dim=1).to(torch.uint8)
    if n % 2:
        idx = torch.cat([idx, torch.zeros(1, dtype=torch.uint8)])
    packed = (idx[0::2] << 4) | idx[1::2]
    return NF4Weight(packed=packed.contiguous(), absmax=absmax, shape=w.shape,
                     blocksize=blocksize, dtype=w.dtype)


def reference_nf4_absmax(q: NF4Weight) -> torch.Tensor:
    """Per-block absmax in float64, undoing double quantization if present."""
    if not q.double_quant:
        return q.absmax.to(torch.float64)
    nested = q.nested_absmax.to(torch.float64).repeat_interleave(256)[: q.n_blocks]
    return (q.nested_code.to(torch.float64)[q.absmax.long()] * nested
            + q.nested_offset.to(torch.float64))


def reference_nf4_dequantize(q: NF4Weight) -> torch.Tensor:
    """The weight NF4Weight encodes, in float64."""
    packed = q.packed.reshape(-1).long()
    idx = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[: q.numel]
    absmax = reference_nf4_absmax(q).repeat_interleave(q.blocksize)[: q.numel]
    return (nf4_code().to(torch.float64)[idx] * absmax).reshape(q.shape)
