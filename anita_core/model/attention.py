"""Causal grouped-query attention that never crosses a document boundary.

Forward and backward both go through torch's scaled_dot_product_attention
(DESIGN.md allows this until a Triton attention kernel replaces it). The
training forward records nothing; a block's backward recomputes the block, and
that recompute runs the attention under autograd once, so nothing
[S x S]-sized is kept between the forward and the backward pass.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def document_mask(segment_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Boolean [B, 1, S, S] mask: query t sees key s iff s <= t and both carry the
    same segment id. None means one causal document per row (SDPA's is_causal
    path, which needs no mask tensor). A query always sees itself, so no row of
    the softmax is empty and padding (segment -1) cannot produce NaN."""
    if segment_ids is None:
        return None
    S = segment_ids.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=segment_ids.device).tril_()
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same_doc & causal)[:, None, :, :]


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: Optional[torch.Tensor]) -> torch.Tensor:
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] -> out [B, S, Hq, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=mask is None, scale=1.0 / math.sqrt(q.shape[-1]),
        enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def attention_forward_for_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   mask: Optional[torch.Tensor]):
    """attention_forward recorded by autograd (used by a block's backward, which
    recomputes the block anyway): returns (out, graph) where graph feeds
    attention_backward, so the recompute's attention forward is the only one."""
    with torch.enable_grad():
        leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
        out = attention_forward(*leaves, mask)
    return out.detach(), (out, leaves)


def attention_backward(d_out: torch.Tensor, graph) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for q, k, v of the attention recorded by attention_forward_for_backward."""
    out, leaves = graph
    dq, dk, dv = torch.autograd.grad(out, leaves, d_out)
    return dq, dk, dv


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     query_positions_in_cache: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Attention for generation. q [B, Sq, Hq, D]; caches [B, L, Hkv, D] already
    holding this step's keys; query i sits at cache slot query_positions_in_cache[i]
    (shared by all rows); key_valid [B, L] marks real (non-padding) cache slots."""
    L = k_cache.shape[1]
    slots = torch.arange(L, device=q.device)
    causal = slots[None, :] <= query_positions_in_cache[:, None]          # [Sq, L]
    mask = causal[None, None] & key_valid[:, None, None, :]               # [B, 1, Sq, L]
    # a left-padded row's padding queries would see nothing: let them see themselves
    own = slots[None, :] == query_positions_in_cache[:, None]
    mask = mask | own[None, None]
    return attention_forward(q, k_cache, v_cache, mask)
