"""Float64 oracle for causal attention within packed documents (grouped-query heads).

Written independently of the kernel's run-based bounds: visibility comes straight
from segment-id equality, GQA from repeating K/V per query head, and the softmax of a
row that sees nothing (padding) is defined as all zeros. Differentiable, so torch
autograd of it is the backward reference.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def reference_visible(segment_ids: Optional[torch.Tensor], batch: int, seq: int) -> torch.Tensor:
    """Bool [B, S, S]: query i sees key j iff j <= i, same segment, and i is not padding (-1)."""
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    if segment_ids is None:
        return causal.expand(batch, seq, seq)
    seg = segment_ids.cpu()
    same = seg[:, :, None] == seg[:, None, :]
    real = (seg >= 0)[:, :, None]
    return causal & same & real


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        segment_ids: Optional[torch.Tensor] = None,
                        visible: Optional[torch.Tensor] = None):
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] -> (out [B, S, Hq, D], lse [B, Hq, S]) in float64.
    Rows that see no key give out = 0 and lse = -inf. ``visible`` (bool [B, S, S], query
    i sees key j), when given, replaces the mask from segment ids."""
    batch, seq, n_q, head_dim = q.shape
    group = n_q // k.shape[2]
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
    k64 = k64.repeat_interleave(group, dim=2)
    v64 = v64.repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q64, k64) / math.sqrt(head_dim)
    if visible is None:
        visible = reference_visible(segment_ids, batch, seq)
    visible = visible[:, None]                                           # [B, 1, S, S]
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(total > 0, total, torch.ones_like(total))
    out = torch.einsum("bhij,bjhd->bihd", probs, v64)
    lse = (row_max + torch.log(total)).squeeze(-1)                      # log 0 = -inf
    return out, lse
