"""NF4 dequantization in torch, with a small cache of dequantized fp32 weights.

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
from csrc_triton.nf4 import NESTED_BLOCKSIZE, NF4Weight

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
    group = torch.arange(w.n_blocks, device=w.device) // NESTED_BLOCKSIZE
    scaled = w.nested_code[w.absmax.long()] * w.nested_absmax[group]
    return scaled + w.nested_offset


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
