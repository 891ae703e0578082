"""NF4 in torch: quantization (byte-identical to csrc_triton's), and dequantization
with a small cache of dequantized fp32 weights.

nf4_quantize follows the bitsandbytes CPU rules that csrc_triton.nf4 documents
(full blocks multiply by the fp32 reciprocal of max(absmax, 1e-38), the partial
last block divides; the index counts the NF4 midpoints strictly below; double
quantization looks absmax - mean up through the 65536-point grid), so a
checkpoint quantized on load is the same bytes on either backend.

w[i] = code[idx_i] * absmax[i // blocksize], where with double quantization
absmax[b] = nested_code[absmax_u8[b]] * nested_absmax[b // 256] + offset
(a rounded product, then a rounded sum, as csrc_triton.nf4 does), all in fp32:
the result equals csrc_triton's nf4_dequantize(q, float32) bit for bit.

Cache choice: a block's backward recomputes its forward and then runs the
transposed matmuls on the same seven projections, and generation reads every
layer once per token, so dequantizing on every call would repeat the same work
2-3 times per layer per step. Dequantized fp32 weights are therefore kept in a
least-recently-used cache bounded by a byte budget (default 1 GiB; at least the
weight just used is always kept). A budget of one layer's projections already
turns the backward's dequantizations into hits; SmolLM2-135M's 210 projections
(425 MB in fp32) fit whole, so after the first step nothing is dequantized again.
Entries are keyed by the identity of the packed tensor and invalidated if the
packed bytes or absmax are modified in place (tensor version counters).
"""
from __future__ import annotations

import collections
import weakref

import torch
import torch.nn.functional as F

from csrc_triton._runtime import new_output
from csrc_triton.nf4 import NF4Weight
from csrc_triton.nf4_codebook import NESTED_BLOCKSIZE, nf4_code, signed_dynamic_map
from csrc_triton.nf4_encode import check_quantize_args

DEFAULT_CACHE_BYTES = 1 << 30

_cache: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()
_budget = [DEFAULT_CACHE_BYTES]
_stats = {"hits": 0, "misses": 0}


def set_dequant_cache_bytes(n_bytes: int) -> int:
    """Set the cache budget in bytes (0 keeps only the last weight); returns the old one."""
    if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes < 0:
        raise ValueError(f"set_dequant_cache_bytes: n_bytes must be an int >= 0, got {n_bytes!r}")
    old, _budget[0] = _budget[0], n_bytes
    _evict(keep=None)
    return old


def dequant_cache_info() -> dict:
    """Entries, bytes held, budget, hits and misses (for benchmarks and tests)."""
    held = sum(entry[1].numel() * 4 for entry in _cache.values())
    return dict(entries=len(_cache), bytes=held, budget=_budget[0], **_stats)


def clear_dequant_cache() -> None:
    _cache.clear()
    _stats.update(hits=0, misses=0)


def _block_absmax(w: NF4Weight) -> torch.Tensor:
    if not w.double_quant:
        return w.absmax.float()
    block = torch.arange(w.n_blocks, device=w.device)
    if not w.segmented:
        group, offset = block // NESTED_BLOCKSIZE, w.nested_offset
    else:       # each segment keeps its own nested groups and offset (NF4Weight.segment_starts)
        block_starts, group_starts = (torch.tensor(v, device=w.device) for v in w.segment_starts())
        segment = torch.bucketize(block, block_starts, right=True) - 1
        group = group_starts[segment] + (block - block_starts[segment]) // NESTED_BLOCKSIZE
        offset = w.nested_offset[segment]
    scaled = w.nested_code[w.absmax.long()] * w.nested_absmax[group]
    return scaled + offset


def _dequantize_uncached(w: NF4Weight) -> torch.Tensor:
    # One 256-row table maps a packed byte to its (high, low) pair of code values.
    byte = torch.arange(256, device=w.device)
    pairs = torch.stack((w.code[byte >> 4], w.code[byte & 15]), dim=1).float()
    values = F.embedding(w.packed.reshape(-1).int(), pairs).reshape(-1)[: w.numel]
    n_full = w.numel // w.blocksize * w.blocksize
    absmax = _block_absmax(w)
    out = new_output((w.numel,), torch.float32, w.device)
    full = out[:n_full].view(-1, w.blocksize)
    torch.mul(values[:n_full].view(-1, w.blocksize), absmax[: full.shape[0], None], out=full)
    if n_full < w.numel:
        torch.mul(values[n_full:], absmax[-1], out=out[n_full:])
    return out.view(w.shape)


def _versions(w: NF4Weight) -> tuple:
    return (w.packed._version, w.absmax._version)


def _evict(keep) -> None:
    held = sum(entry[1].numel() * 4 for entry in _cache.values())
    for key in list(_cache):
        if held <= _budget[0]:
            break
        if key == keep:
            continue
        held -= _cache.pop(key)[1].numel() * 4


def dequantize_fp32(w: NF4Weight) -> torch.Tensor:
    """The weight ``w`` encodes, fp32, shape ``w.shape`` (cached; do not modify it)."""
    key = id(w.packed)
    entry = _cache.get(key)
    if entry is not None and entry[0]() is w.packed and entry[2] == _versions(w) \
            and entry[3] is w.absmax:
        _cache.move_to_end(key)
        _stats["hits"] += 1
        return entry[1]
    _stats["misses"] += 1
    dense = _dequantize_uncached(w)
    _cache[key] = (weakref.ref(w.packed), dense, _versions(w), w.absmax)
    _cache.move_to_end(key)
    _evict(keep=key)
    return dense


def _groups(flat: torch.Tensor, size: int) -> torch.Tensor:
    """``flat`` zero-padded to whole groups of ``size``, as [n_groups, size]."""
    n_groups = -(-flat.numel() // size)
    padded = torch.zeros(n_groups * size, dtype=torch.float32, device=flat.device)
    padded[: flat.numel()] = flat
    return padded.view(n_groups, size)


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) * 0.5


def dynamic_quantize(values: torch.Tensor, offset: torch.Tensor, dynamic_map: torch.Tensor):
    """(indices uint8, group max fp32) of values - offset in groups of 256 against the
    map, by bitsandbytes' CPU table rule (csrc_triton.nf4_encode.launch_dynamic_quantize)."""
    groups = _groups(values - offset, NESTED_BLOCKSIZE)
    group_max = groups.abs().amax(dim=1)
    divisor = torch.where(group_max == 0, torch.ones_like(group_max), group_max)
    x = (groups * (1.0 / divisor)[:, None]).clamp_(-1.0, 1.0)
    t = ((x + 1.0) * 0.5) * 65535.0 + 0.5
    grid = (2.0 * t.to(torch.int32).to(torch.float32)) / 65535.0 - 1.0
    index = torch.searchsorted(_midpoints(dynamic_map), grid.reshape(-1)).view_as(grid)
    index = torch.where(group_max[:, None] == 0, torch.zeros_like(index), index)
    return index.reshape(-1)[: values.numel()].to(torch.uint8), group_max


def _nested_quantize(absmax: torch.Tensor):
    offset = absmax.mean()          # torch's own mean, as bitsandbytes and the kernel take it
    dynamic_map = signed_dynamic_map(absmax.device)
    return dynamic_quantize(absmax, offset, dynamic_map) + (dynamic_map, offset)


def nf4_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """``w`` in NF4, the same bytes as csrc_triton.nf4_quantize (and bitsandbytes on CPU)."""
    check_quantize_args(w, blocksize, double_quant)
    w = w.detach()
    n = w.numel()
    blocks = _groups(w.reshape(-1).float(), blocksize)
    absmax = blocks.abs().amax(dim=1)
    safe = absmax.clamp_min(1e-38)
    scaled = blocks * (1.0 / safe)[:, None]
    if n % blocksize:               # the partial last block divides (it can differ in the last bit)
        scaled[-1] = blocks[-1] / safe[-1]
        absmax[-1] = safe[-1]
    code = nf4_code(w.device)
    # midpoints strictly below: a value on a midpoint takes the lower code; the
    # padding of an odd numel is a scaled 0 (index 7)
    flat = scaled.reshape(-1)[: n + n % 2]
    index = torch.zeros(flat.shape, dtype=torch.uint8, device=w.device)
    for midpoint in _midpoints(code).tolist():     # 15 compares: cheaper than a binary search
        index += flat > midpoint
    packed = (index[0::2] << 4) | index[1::2]
    nested = {}
    if double_quant:
        absmax, nested_absmax, nested_code, offset = _nested_quantize(absmax)
        nested = dict(nested_absmax=nested_absmax, nested_code=nested_code, nested_offset=offset)
    return NF4Weight(packed=packed, absmax=absmax, shape=w.shape, blocksize=blocksize,
                     dtype=w.dtype, code=code, **nested)
