"""Reference NF4 in plain torch: quantize to the nearest code value, dequantize by lookup.

Used to build NF4Weight test inputs for other ops and as the float64 oracle of
what a dequantized weight is. Byte-identity with bitsandbytes is tested
against bitsandbytes itself, not against this; the emulation of bitsandbytes'
rules at the bottom (for machines without it) is itself checked against it.
"""
from __future__ import annotations

import torch

from csrc_triton.nf4 import NF4Weight
from csrc_triton.nf4_codebook import nf4_code


def _padded_groups(values: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """``values`` flattened, zero-padded to whole groups, viewed as [n_groups, group]."""
    flat = values.detach().to("cpu").reshape(-1).to(dtype)
    n_groups = -(-flat.numel() // group)
    padded = torch.zeros(n_groups * group, dtype=dtype)
    padded[:flat.numel()] = flat
    return padded.view(n_groups, group)


def reference_nf4_quantize(w: torch.Tensor, blocksize: int = 64) -> NF4Weight:
    """Single-level NF4 (fp32 absmax), nearest code value per element."""
    n = w.numel()
    blocks = _padded_groups(w, blocksize, torch.float64)
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


# ---------------------------------------------------------------------------
# bitsandbytes' CPU quantization rules, emulated in plain torch fp32 on the CPU.
# They let the byte-identity tests run where bitsandbytes is not installed
# (the GPU machine); where it is, tests check them against bitsandbytes itself.
# ---------------------------------------------------------------------------

def reference_bnb_dynamic_quantize(values: torch.Tensor, dynamic_map: torch.Tensor,
                                   group: int = 256):
    """bitsandbytes' CPU quantize_blockwise of fp32 ``values`` (any device; computed
    on the CPU): per group of ``group`` values m = max |v|, x = clamp(v * (1/m), -1, 1),
    t = trunc(((x + 1) * 0.5) * 65535 + 0.5), index = number of map midpoints below
    -1 + 2t/65535 (0 for a group with m = 0). Returns (uint8 indices, fp32 m)."""
    n = values.numel()
    groups = _padded_groups(values, group, torch.float32)
    n_groups = groups.shape[0]
    group_max = groups.abs().amax(dim=1)
    divisor = torch.where(group_max == 0, torch.ones_like(group_max), group_max)
    x = (groups * (1.0 / divisor)[:, None]).clamp(-1.0, 1.0)
    t = ((x + 1.0) * 0.5) * 65535.0 + 0.5
    grid = (2.0 * t.to(torch.int32).to(torch.float32)) / 65535.0 - 1.0
    code = dynamic_map.to("cpu", torch.float32)
    midpoints = (code[:-1] + code[1:]) * 0.5
    # searchsorted (left) = the number of midpoints strictly below each grid point
    index = torch.searchsorted(midpoints, grid.reshape(-1)).view(n_groups, group)
    index = torch.where(group_max[:, None] == 0, torch.zeros_like(index), index)
    return index.reshape(-1)[:n].to(torch.uint8), group_max


def reference_bnb_nf4_quantize(w: torch.Tensor, blocksize: int = 64,
                               double_quant: bool = False) -> NF4Weight:
    """bitsandbytes' quantize_4bit(quant_type="nf4") on CPU, in torch fp32.

    Full blocks multiply by the fp32 reciprocal of max(absmax, 1e-38), the partial
    last block divides by it (and stores the clamped value); the index counts the
    NF4 midpoints strictly below the scaled value; an odd numel pads with y = 0.
    Double quantization takes the mean of the absmax on ``w``'s device (as
    bitsandbytes and nf4_quantize do) and runs reference_bnb_dynamic_quantize."""
    from csrc_triton.nf4_codebook import signed_dynamic_map

    n = w.numel()
    blocks = _padded_groups(w, blocksize, torch.float32)
    n_blocks = blocks.shape[0]
    absmax = blocks.abs().amax(dim=1)
    safe = absmax.clamp(min=1e-38)
    scaled = blocks * (1.0 / safe)[:, None]
    if n % blocksize:
        scaled[-1] = blocks[-1] / safe[-1]
        absmax[-1] = safe[-1]
    code = nf4_code()
    midpoints = (code[:-1] + code[1:]) * 0.5
    index = (scaled.reshape(-1, 1) > midpoints[None, :]).sum(dim=1).to(torch.uint8)
    index = index[: n + n % 2]  # the pad element is a scaled 0 of the last block
    packed = (index[0::2] << 4) | index[1::2]
    nested = {}
    if double_quant:
        offset = absmax.to(w.device).mean().cpu()
        dynamic_map = signed_dynamic_map()
        absmax, nested_absmax = reference_bnb_dynamic_quantize(absmax - offset, dynamic_map)
        nested = dict(nested_absmax=nested_absmax, nested_code=dynamic_map, nested_offset=offset)
    return NF4Weight(packed=packed, absmax=absmax, shape=w.shape, blocksize=blocksize,
                     dtype=w.dtype, **nested)
