"""Attention within packed documents as plain PyTorch: the torch backend of
csrc_triton.attention (same launchers, arguments, checks and return conventions).

    S = Q K^T / sqrt(D), masked to the keys a query sees (j <= i and j at or after
    first_key[i]: its document's first token, or i - W + 1 in a sliding window W, from
    document_bounds; and, with 4 bounds, j outside the query's gap [gap_start[i],
    gap_end[i]): a DPO pair's rejected answer skips the chosen one); lse_i = log sum_j exp(S_ij);
    P = exp(S - lse); out = P V.
    Backward from the saved lse: Delta_i = dO_i . O_i (O as stored, like the kernel),
    dP = dO V^T, dS = P (dP - Delta), dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D),
    dV = P^T dO; dK and dV of a kv head summed over its query heads.

Blocked like the kernel, never a score matrix over the whole row: the queries go
in blocks of QUERY_BLOCK tokens, and a block reads only the keys from its earliest
query's document start (min first_key over the block) to its last query. A block's
scores are [B, Hq, QUERY_BLOCK, keys it reads], so memory is O(S x block), and a
row of documents of lengths L_d costs O(sum L_d^2 + S x block) work instead of
O(S^2): 8,192 tokens of 300-token documents read ~556 keys per query, not ~4,096.
With a gap per query, a block also skips the keys that every one of its queries has
in its gap (a DPO pair's rejected answer skips the chosen one's keys, issue 30): its
keys are then two ranges, gathered once per block. Within a block the softmax is
exact (one logsumexp over the block's keys; the keys it skips are keys no query of
the block sees, whose probability is exactly 0).
The block starts are read back to the host (a few small reads per call): this is
the CPU path, where that read costs nothing; the Triton kernels, the GPU's path,
read the bounds on the device and stall nothing (tests/test_host_syncs.py).

GQA by layout, not by copying: q is viewed as [B, Hkv, group, S, D], so the query
heads of one kv head are stacked rows of one matmul against that head's K and V,
and dK/dV come out summed over the group by the same matmul.

Everything in fp32, rounded once to the inputs' dtype. A row that sees no key
(padding) gives out 0, lse -inf and zero gradients.
"""
from __future__ import annotations

import math
from typing import Iterator, Tuple

import torch

# document_bounds is O(S) plain torch; the checks are the kernel's own
from csrc_triton.attention import (Bounds, check_backward_args, check_bounds,  # noqa: F401
                                   check_gap, check_into, check_qkv, document_bounds)

# query tokens per block: large enough that each block is a few big matmuls (the
# Python loop runs S / QUERY_BLOCK times per layer), small enough that a block's
# [Hq, QUERY_BLOCK, keys] fp32 scores stay small (SmolLM2, one 8,192-token document:
# 9 x 256 x 8,192 x 4 B = 72 MiB)
QUERY_BLOCK = 256

# a query block's keys: ranges [a, b) of key indices, in order
Pieces = Tuple[Tuple[int, int], ...]


def _blocks(bounds: Bounds, seq: int, block: int) -> Iterator[Tuple[int, int, int]]:
    """(q0, q1, k0) per query block [q0, q1) that sees any key: its keys are [k0, q1)."""
    if bounds is None:
        yield from ((q0, min(q0 + block, seq), 0) for q0 in range(0, seq, block))
        return
    first_key = bounds[0]
    # a padding query (first_key = i + 1) sees nothing: it must not set k0
    index = torch.arange(seq, device=first_key.device)
    first_seen = torch.where(first_key <= index, first_key, seq).amin(dim=0)     # [S]
    starts = first_seen[:seq - seq % block].view(-1, block).amin(dim=1).tolist()
    if seq % block:
        starts.append(int(first_seen[seq - seq % block:].min()))
    for q0, k0 in zip(range(0, seq, block), starts):
        q1 = min(q0 + block, seq)
        if k0 < q1:
            yield q0, q1, k0


def _key_blocks(bounds: Bounds, seq: int, block: int) -> Iterator[Tuple[int, int, Pieces]]:
    """(q0, q1, pieces) per query block [q0, q1) that sees any key: its keys are the
    ranges [a, b) in ``pieces``, which are [k0, q1) (see _blocks) less the keys that
    every query of the block, in every row, has in its gap: [max gap_start, min gap_end)
    over the block, when not empty. Those keys have probability exactly 0 for every
    query of the block, so not computing them changes nothing but the work: a DPO
    pair's rejected queries then skip the chosen answer's keys (issue 30)."""
    blocks = list(_blocks(bounds, seq, block))
    if bounds is None or len(bounds) != 4 or not blocks:
        yield from ((q0, q1, ((k0, q1),)) for q0, q1, k0 in blocks)
        return
    first_key, _, gap_start, gap_end = bounds
    index = torch.arange(seq, device=first_key.device)
    # a query that sees nothing (padding) has every key in its gap: it must not shrink it
    sees = first_key <= index
    common_start = torch.where(sees, gap_start, 0).amax(dim=0)                 # [S]
    common_end = torch.where(sees, gap_end, seq).amin(dim=0)
    tail = -seq % block
    common_start = torch.cat([common_start, common_start.new_zeros(tail)])
    common_end = torch.cat([common_end, common_end.new_full((tail,), seq)])
    starts = common_start.view(-1, block).amax(dim=1).tolist()
    ends = common_end.view(-1, block).amin(dim=1).tolist()
    for q0, q1, k0 in blocks:
        gs, ge = max(starts[q0 // block], k0), min(ends[q0 // block], q1)
        if gs >= ge:
            yield q0, q1, ((k0, q1),)
            continue
        pieces = tuple((a, b) for a, b in ((k0, gs), (ge, q1)) if a < b)
        if pieces:          # else no query of the block sees any key: out 0, lse -inf
            yield q0, q1, pieces


def _gather(t: torch.Tensor, pieces: Pieces) -> torch.Tensor:
    """[B, H, S, D] -> its rows in ``pieces`` along S (a view when there is one piece)."""
    if len(pieces) == 1:
        return t[:, :, pieces[0][0]:pieces[0][1]]
    return torch.cat([t[:, :, a:b] for a, b in pieces], dim=2)


def _scatter_add(t: torch.Tensor, pieces: Pieces, rows: torch.Tensor) -> None:
    """t[:, :, pieces] += rows, the inverse of _gather."""
    offset = 0
    for a, b in pieces:
        t[:, :, a:b] += rows[:, :, offset:offset + b - a]
        offset += b - a


def _visible(bounds: Bounds, q0: int, q1: int, pieces: Pieces, device) -> torch.Tensor:
    """Bool [B or 1, 1, 1, n, m]: query q0 + a sees the c-th key of ``pieces`` (causal,
    from its first_key, outside its gap)."""
    queries = torch.arange(q0, q1, device=device)
    keys = torch.cat([torch.arange(a, b, device=device) for a, b in pieces])
    visible = (keys[None, :] <= queries[:, None])[None]
    if bounds is not None:
        visible = visible & (keys[None, None, :] >= bounds[0][:, q0:q1, None].long())
    if bounds is not None and len(bounds) == 4:
        gap_start, gap_end = (t[:, q0:q1, None].long() for t in bounds[2:])
        visible = visible & ((keys[None, None, :] < gap_start) | (keys[None, None, :] >= gap_end))
    return visible[:, None, None]


def _grouped(t: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[B, S, Hq, D] -> contiguous fp32 [B, Hkv, group, S, D] (query head h = kv * group + g)."""
    batch, seq, heads, dim = t.shape
    # reshape, not view: q may be a strided view into the fused q/k/v output
    return t.float().reshape(batch, seq, n_kv, heads // n_kv, dim).permute(0, 2, 3, 1, 4).contiguous()


def _ungrouped(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, Hkv, group, S, D] -> [B, S, Hq, D] in ``dtype``."""
    batch, n_kv, group, seq, dim = t.shape
    return t.permute(0, 3, 1, 2, 4).reshape(batch, seq, n_kv * group, dim).to(dtype).contiguous()


def _kv(t: torch.Tensor) -> torch.Tensor:
    """[B, S, Hkv, D] -> contiguous fp32 [B, Hkv, S, D]."""
    return t.float().transpose(1, 2).contiguous()


def _block_scores(qs, kf, visible):
    """Scaled scores of one block, -inf where not visible: qs [B, Hkv, G, n, D] (q already
    times 1/sqrt(D)), kf [B, Hkv, m, D] -> [B, Hkv, G, n, m] fp32."""
    batch, n_kv, group, n, dim = qs.shape
    scores = qs.reshape(batch, n_kv, group * n, dim) @ kf.transpose(-1, -2)
    return scores.view(batch, n_kv, group, n, -1).masked_fill_(~visible, float("-inf"))


def _block_softmax(scores):
    """(P, lse) from a block's scores, in place: m = max, e = exp(s - m), P = e / sum e,
    lse = m + log sum e. A row that sees nothing (all -inf) gets P = 0 and lse = -inf."""
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    probs = scores.sub_(top).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    lse = (top + torch.log(total)).squeeze(-1)
    return probs.div_(torch.where(total > 0, total, 1.0)), lse


def _block_probabilities_from_lse(scores, lse):
    """P = exp(s - lse) in place (the backward's recompute); exp(-inf) = 0 covers the keys
    not seen, and a row with lse -inf subtracts 0 instead (no -inf - -inf NaN)."""
    lse = torch.where(torch.isfinite(lse), lse, 0.0)
    return scores.sub_(lse[..., None]).exp_()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, G, n, x] -> [B, Hkv, G * n, x] (the group's query rows stacked)."""
    batch, n_kv, group, n, x = t.shape
    return t.reshape(batch, n_kv, group * n, x)


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            bounds: Bounds = None):
    """(out [B, S, Hq, D] in q's dtype, lse fp32 [B, Hq, S]); see the module docstring."""
    batch, seq, n_q_heads, n_kv_heads, head_dim = check_qkv(q, k, v)
    check_bounds(bounds, batch, seq, q.device)
    qs = _grouped(q, n_kv_heads).mul_(1.0 / math.sqrt(head_dim))
    kf, vf = _kv(k), _kv(v)
    out = torch.zeros_like(qs)
    lse = torch.full(qs.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    for q0, q1, pieces in _key_blocks(bounds, seq, QUERY_BLOCK):
        scores = _block_scores(qs[..., q0:q1, :], _gather(kf, pieces),
                               _visible(bounds, q0, q1, pieces, q.device))
        probs, lse[..., q0:q1] = _block_softmax(scores)
        out[..., q0:q1, :] = (_rows(probs) @ _gather(vf, pieces)).view(probs.shape[:-1] + (head_dim,))
    return _ungrouped(out, q.dtype), lse.view(batch, n_q_heads, seq)


def flash_attention_backward(d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                             bounds: Bounds = None, *, into=None):
    """(dq, dk, dv) in the inputs' dtype, from the forward's out and lse (written into
    ``into`` = (dq, dk, dv) views when given, as csrc_triton.attention's)."""
    batch, seq, n_q_heads, n_kv_heads, head_dim = check_backward_args(d_out, q, k, v, out, lse,
                                                                       bounds)
    scale = 1.0 / math.sqrt(head_dim)
    qs = _grouped(q, n_kv_heads).mul_(scale)
    kf, vf = _kv(k), _kv(v)
    d_o = _grouped(d_out, n_kv_heads)
    delta = (d_o * _grouped(out, n_kv_heads)).sum(-1)                    # [B, Hkv, G, S]
    lse_g = lse.view(qs.shape[:-1])
    dq, dk, dv = torch.zeros_like(qs), torch.zeros_like(kf), torch.zeros_like(vf)
    for q0, q1, pieces in _key_blocks(bounds, seq, QUERY_BLOCK):
        q_b, d_o_b = qs[..., q0:q1, :], d_o[..., q0:q1, :]
        k_b, v_b = _gather(kf, pieces), _gather(vf, pieces)
        scores = _block_scores(q_b, k_b, _visible(bounds, q0, q1, pieces, q.device))
        probs = _block_probabilities_from_lse(scores, lse_g[..., q0:q1])
        d_p = (_rows(d_o_b) @ v_b.transpose(-1, -2)).view(probs.shape)
        d_s = d_p.sub_(delta[..., q0:q1, None]).mul_(probs)              # P (dP - Delta), in place
        _scatter_add(dv, pieces, _rows(probs).transpose(-1, -2) @ _rows(d_o_b))
        dq[..., q0:q1, :] = (_rows(d_s) @ k_b).view(q_b.shape).mul_(scale)
        # dK = dS^T Q / sqrt(D) = dS^T (Q / sqrt(D))
        _scatter_add(dk, pieces, _rows(d_s).transpose(-1, -2) @ _rows(q_b))
    grads = _ungrouped(dq, q.dtype), _per_kv_head(dk, q.dtype), _per_kv_head(dv, q.dtype)
    if into is None:
        return grads
    return tuple(t.copy_(g) for t, g in zip(check_into(into, q, k), grads))


def _per_kv_head(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, Hkv, S, D] fp32 -> [B, S, Hkv, D] in ``dtype``."""
    return t.transpose(1, 2).to(dtype).contiguous()
