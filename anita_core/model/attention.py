"""Causal grouped-query attention that never crosses a document boundary.

Training and evaluation go through anita's Triton flash attention
(csrc_triton.attention): documents come in as segment ids, turned once per batch
into O(S) document bounds that every layer shares, so nothing [S x S]-sized is
ever allocated. The training forward keeps nothing; a block's backward recomputes
the block, and that recompute keeps the attention output and its fp32 log-sum-exp
([B, Hq, S]) for the attention backward.

Generation with a KV cache keeps torch's scaled_dot_product_attention
(``cached_attention``): decode steps are one query per row against a left-padded
cache whose validity mask is not a packed-document rule, the work is a memory-bound
read of the cache that SDPA already does well, and its mask is [B, 1, new tokens,
cache length], O(S) per decoded token (O(prompt^2) only in the prefill of
generation, which is not the training path).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from anita_core.model.ops import document_bounds, flash_attention_backward, flash_attention_forward

Bounds = Optional[Tuple[torch.Tensor, torch.Tensor]]


def attention_bounds(segment_ids: Optional[torch.Tensor]) -> Bounds:
    """The per-batch document bounds (first_key, key_end) of ``segment_ids`` [B, S]
    (-1 = padding, whose outputs are 0), or None for one causal document per row."""
    return None if segment_ids is None else document_bounds(segment_ids)


def windowed_bounds(bounds: Bounds, window: Optional[int], batch: int, seq: int,
                    device: torch.device) -> Bounds:
    """``bounds`` narrowed to a sliding window of W keys per query, the query itself
    included (transformers' sliding_window: key j seen by query i iff i - W < j <= i):
    first_key = max(first_key, i - W + 1), key_end = min(key_end, j + W); padding
    (first_key = i + 1, key_end = j) stays as it is. Unchanged when W >= S. Row indices
    stand for positions: true inside a document (its positions count up by one); a
    preference-pair row (bounds with a gap: its rejected answer's positions restart
    after the prompt) cannot take a window shorter than the row, and is refused."""
    if window is None or window >= seq:
        return bounds
    if bounds is not None and len(bounds) == 4:
        raise ValueError(f"a sliding window of {window} tokens cannot run on packed preference "
                         f"pairs of {seq} positions: use the padded layout (--no-pack-pairs)")
    index = torch.arange(seq, device=device, dtype=torch.int32).expand(batch, seq)
    if bounds is None:
        first_key, key_end = torch.zeros_like(index), torch.full_like(index, seq)
    else:
        first_key, key_end = bounds
    return (torch.maximum(first_key, index - (window - 1)).contiguous(),
            torch.minimum(key_end, index + window).contiguous())


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      bounds: Bounds) -> torch.Tensor:
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] -> out [B, S, Hq, D]."""
    out, _ = flash_attention_forward(q, k, v, bounds)
    return out


def attention_forward_for_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   bounds: Bounds):
    """attention_forward for a block's recompute: returns (out, saved), where saved
    (the inputs, out and the log-sum-exp) feeds attention_backward."""
    out, lse = flash_attention_forward(q, k, v, bounds)
    return out, (q, k, v, out, lse, bounds)


def attention_backward(d_out: torch.Tensor, saved,
                       into=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for q, k, v of the attention saved by attention_forward_for_backward,
    written into ``into`` = (dq, dk, dv) views when given (flash_attention_backward)."""
    q, k, v, out, lse, bounds = saved
    return flash_attention_backward(d_out.contiguous(), q, k, v, out, lse, bounds, into=into)


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     query_positions_in_cache: torch.Tensor, key_valid: torch.Tensor,
                     window: Optional[int] = None) -> torch.Tensor:
    """Attention for generation (SDPA, see the module docstring). q [B, Sq, Hq, D];
    caches [B, L, Hkv, D] already holding this step's keys; query i sits at cache slot
    query_positions_in_cache[i] (shared by all rows); key_valid [B, L] marks real
    (non-padding) cache slots."""
    L = k_cache.shape[1]
    slots = torch.arange(L, device=q.device)
    causal = slots[None, :] <= query_positions_in_cache[:, None]          # [Sq, L]
    if window is not None:  # a row's real tokens sit in consecutive slots: slot gaps are position gaps
        causal &= slots[None, :] > query_positions_in_cache[:, None] - window
    mask = causal[None, None] & key_valid[:, None, None, :]               # [B, 1, Sq, L]
    # a left-padded row's padding queries would see nothing: let them see themselves
    own = slots[None, :] == query_positions_in_cache[:, None]
    mask = mask | own[None, None]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), attn_mask=mask,
        scale=1.0 / math.sqrt(q.shape[-1]), enable_gqa=q.shape[2] != k_cache.shape[2])
    return out.transpose(1, 2)
