"""Attention within packed documents as plain PyTorch: the torch backend of
csrc_triton.attention (same launchers, arguments, checks and return conventions).

    S = Q K^T / sqrt(D), masked to the keys a query sees (j <= i and j at or after the
    first token of i's document, from document_bounds); lse_i = log sum_j exp(S_ij);
    P = exp(S - lse); out = P V.
    Backward from the saved lse: Delta_i = dO_i . O_i (O as stored, like the kernel),
    dP = dO V^T, dS = P (dP - Delta), dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D),
    dV = P^T dO; dK and dV of a kv head summed over its query heads.

Everything in fp32, rounded once to the inputs' dtype. K and V are repeated per query
head and scores are [B, Hq, S, S] fp32: fine for the CPU-sized runs this backend
serves (SmolLM2 at 512 tokens: 9 MiB); the Triton kernel is the O(S)-memory path.
A row that sees no key (padding) gives out 0, lse -inf and zero gradients.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

# document_bounds is O(S) plain torch; the checks are the kernel's own
from csrc_triton.attention import (check_backward_args, check_bounds, check_into,  # noqa: F401
                                   check_qkv, document_bounds)
Bounds = Optional[Tuple[torch.Tensor, torch.Tensor]]


def _visible(bounds: Bounds, batch: int, seq: int, device) -> torch.Tensor:
    """Bool [B, 1, S, S]: query i sees key j (causal, within i's document)."""
    index = torch.arange(seq, device=device)
    causal = (index[None, :] <= index[:, None])[None, None]
    if bounds is None:
        return causal.expand(batch, 1, seq, seq)
    first_key = bounds[0].long()                                      # [B, S]
    return causal & (index[None, None, None, :] >= first_key[:, None, :, None])


def _per_query_head(t: torch.Tensor, group: int) -> torch.Tensor:
    """[B, S, Hkv, D] -> fp32 [B, Hq, S, D], each kv head repeated for its query heads."""
    return t.float().transpose(1, 2).repeat_interleave(group, dim=1)


def _probabilities(q, k, bounds, lse=None):
    """(P [B, Hq, S, S] fp32, lse [B, Hq, S] fp32); with ``lse`` given, P is rebuilt from it."""
    batch, seq, n_q, head_dim = q.shape
    group = n_q // k.shape[2]
    scores = (q.float().transpose(1, 2) @ _per_query_head(k, group).transpose(-1, -2))
    scores.mul_(1.0 / math.sqrt(head_dim))
    visible = _visible(bounds, batch, seq, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)                          # -inf where nothing is seen
    probs = torch.exp(scores - lse[..., None]).masked_fill(~visible, 0.0)   # no -inf - -inf NaN
    return probs, lse


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            bounds: Bounds = None):
    """(out [B, S, Hq, D] in q's dtype, lse fp32 [B, Hq, S]); see the module docstring."""
    batch, seq, n_q_heads, _, _ = check_qkv(q, k, v)
    check_bounds(bounds, batch, seq, q.device)
    group = n_q_heads // k.shape[2]
    probs, lse = _probabilities(q, k, bounds)
    out = probs @ _per_query_head(v, group)
    return out.transpose(1, 2).to(q.dtype).contiguous(), lse.contiguous()


def flash_attention_backward(d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                             bounds: Bounds = None, *, into=None):
    """(dq, dk, dv) in the inputs' dtype, from the forward's out and lse (written into
    ``into`` = (dq, dk, dv) views when given, as csrc_triton.attention's)."""
    batch, seq, n_q_heads, n_kv_heads, head_dim = check_backward_args(d_out, q, k, v, out, lse,
                                                                       bounds)
    group = n_q_heads // n_kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    probs, _ = _probabilities(q, k, bounds, lse)
    d_o = d_out.float().transpose(1, 2)                                 # [B, Hq, S, D]
    delta = (d_o * out.float().transpose(1, 2)).sum(-1, keepdim=True)   # [B, Hq, S, 1]
    d_scores = probs * (d_o @ _per_query_head(v, group).transpose(-1, -2) - delta)
    dq = (d_scores @ _per_query_head(k, group)).mul_(scale)
    dk = (d_scores.transpose(-1, -2) @ q.float().transpose(1, 2)).mul_(scale)
    dv = probs.transpose(-1, -2) @ d_o

    def per_kv_head(t):             # [B, Hq, S, D] -> [B, S, Hkv, D], summed over the group
        t = t.view(batch, n_kv_heads, group, seq, head_dim).sum(2)
        return t.transpose(1, 2).to(q.dtype).contiguous()

    grads = dq.transpose(1, 2).to(q.dtype).contiguous(), per_kv_head(dk), per_kv_head(dv)
    if into is None:
        return grads
    return tuple(t.copy_(g) for t, g in zip(check_into(into, q, k), grads))
