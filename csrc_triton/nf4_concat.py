"""Row concatenation of NF4 weights: q/k/v (or gate/up) as one matmul operand.

NF4 stores a weight flattened row-major in blocks (nf4.NF4Weight), so when every
weight's element count is a multiple of the blocksize, stacking weights [N_s, K]
into [sum N_s, K] is a concatenation of their packed bytes and of their absmax:
element (n, k) of segment s is element (n - row_start_s, k) of weight s, in the
same block with the same statistic. Double quantization adds one nested level
per weight (groups of 256 blocks and ONE offset per weight); those cannot be
merged without requantizing, so the concatenation keeps each segment's nested
groups and offset (nested_offset becomes [S]) and the kernels look the segment
up per block (nf4_decode.nested_group_and_offset). Every element decodes to exactly the
value it had in its own weight, and the memory is the same.

``segment_view`` gives each original weight back as an NF4Weight whose tensors
are views into the concatenation: a caller keeps the per-projection names
without a second copy of the bytes.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .nf4 import NF4Weight
from .nf4_codebook import NESTED_BLOCKSIZE

MAX_SEGMENTS = 3


def concatenation_problem(weights: Sequence[NF4Weight]) -> Optional[str]:
    """Why ``weights`` cannot be concatenated by rows (None when they can)."""
    if not 2 <= len(weights) <= MAX_SEGMENTS:
        return f"{len(weights)} weights; 2 to {MAX_SEGMENTS} can be concatenated"
    first = weights[0]
    for i, w in enumerate(weights):
        if not isinstance(w, NF4Weight) or len(w.shape) != 2:
            return f"weight {i} is not a 2-D NF4Weight"
        if w.segment_rows is not None:
            return f"weight {i} is already a concatenation"
        if w.shape[1] != first.shape[1] or w.blocksize != first.blocksize:
            return (f"weight {i} has shape {tuple(w.shape)} and blocksize {w.blocksize}; weight 0 "
                    f"{tuple(first.shape)} and {first.blocksize} (K and blocksize must agree)")
        if w.numel % w.blocksize:
            return f"weight {i} has {w.numel} elements, not a multiple of its blocksize {w.blocksize}"
        if (w.dtype, w.double_quant, w.device) != (first.dtype, first.double_quant, first.device):
            return f"weight {i} differs from weight 0 in dtype, double quantization or device"
        if not torch.equal(w.code, first.code) or (
                w.double_quant and not torch.equal(w.nested_code, first.nested_code)):
            return f"weight {i} has another code table than weight 0"
    return None


def concatenate_rows(weights: Sequence[NF4Weight]) -> NF4Weight:
    """One NF4Weight [sum N_s, K] decoding to torch.cat of the weights (new storage)."""
    problem = concatenation_problem(weights)
    if problem is not None:
        raise ValueError(f"concatenate_rows: {problem}")
    first = weights[0]
    nested = {}
    if first.double_quant:
        nested = dict(nested_absmax=torch.cat([w.nested_absmax.reshape(-1) for w in weights]),
                      nested_code=first.nested_code,
                      nested_offset=torch.stack([w.nested_offset.reshape(()) for w in weights]))
    fused = NF4Weight(packed=torch.cat([w.packed.reshape(-1) for w in weights]),
                      absmax=torch.cat([w.absmax.reshape(-1) for w in weights]),
                      shape=torch.Size((sum(w.shape[0] for w in weights), first.shape[1])),
                      blocksize=first.blocksize, dtype=first.dtype, code=first.code,
                      segment_rows=tuple(int(w.shape[0]) for w in weights), **nested)
    return fused.validate("concatenate_rows")


def segment_view(fused: NF4Weight, index: int) -> NF4Weight:
    """Segment ``index`` of a concatenation as an ordinary NF4Weight sharing its storage."""
    if fused.segment_rows is None or not 0 <= index < len(fused.segment_rows):
        raise ValueError(f"segment_view: no segment {index} in this weight")
    K = fused.shape[1]
    rows = fused.segment_rows
    row0 = sum(rows[:index])
    elem0, elem1 = row0 * K, (row0 + rows[index]) * K
    b0, b1 = elem0 // fused.blocksize, elem1 // fused.blocksize
    nested = {}
    if fused.double_quant:
        _, group_starts = fused.segment_starts()
        g0 = group_starts[index]
        nested = dict(nested_absmax=fused.nested_absmax[g0:g0 + -(-(b1 - b0) // NESTED_BLOCKSIZE)],
                      nested_code=fused.nested_code, nested_offset=fused.nested_offset[index])
    return NF4Weight(packed=fused.packed[elem0 // 2:elem1 // 2], absmax=fused.absmax[b0:b1],
                     shape=torch.Size((rows[index], K)), blocksize=fused.blocksize,
                     dtype=fused.dtype, code=fused.code, **nested)


def segment_views(fused: NF4Weight) -> List[NF4Weight]:
    return [segment_view(fused, i) for i in range(len(fused.segment_rows))]
