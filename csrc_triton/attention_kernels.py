"""The flash attention kernels (launched by attention): the forward, the Delta
preprocessing, dK/dV and dQ (their @triton.jit tile helpers: attention_tiles).
Shapes and who sees whom (first_key / key_end from segment ids, a sliding window,
a gap per query): the attention docstring. In short, query i sees key j iff

    first_key[i] <= j <= i   and not   gap_start[i] <= j < gap_end[i]   (HAS_GAP only)

and the queries that see key j lie in [j, key_end[j]) (those whose gap holds j
excluded). A sliding window is bounds only (first_key >= i - W + 1, key_end <= j + W):
the walks below start and stop at them, so the key blocks before a query tile's
window and the query tiles past a key block's window are never read.

Tiles. A query tile is BLOCK_M tokens x BLOCK_H query heads that share one kv head
(the K/V blocks it reads serve all of them; GPU configs use BLOCK_H = 1, the
interpreter stacks the whole group to cut its per-program cost).

Forward (online softmax, per query tile, scale c = 1/sqrt(D)):
    s_ij = c q_i . k_j   for visible (i, j), -inf otherwise
    m_i  = running max,  l_i = sum_j exp(s_ij - m_i),  acc_i = sum_j exp(s_ij - m_i) v_j
    o_i  = acc_i / l_i,  lse_i = m_i + log l_i
Key blocks are walked only over [min first_key of the tile's rows, its last token]:
blocks before the tile's first document or after its last query are skipped, not
masked. Exponentials are base 2 with log2(e) folded into c.

A gap changes nothing in these formulas: its keys are not visible (s_ij = -inf,
so P_ij = 0 and they add nothing to l_i, acc_i, nor below to dV, dS, dQ, dK).

Backward, from the saved lse (P is recomputed, never stored):
    P_ij = exp(s_ij - lse_i)  (0 where not visible, the gap included),   O = P V
    dV = P^T dO                      (O is linear in V)
    dP = dO V^T                      (same, in P)
    dS_ij = P_ij (dP_ij - Delta_i),  Delta_i = sum_j P_ij dP_ij = dO_i . O_i
        (softmax Jacobian: dP/ds for one row is diag(P) - P P^T)
    dQ = c dS K,    dK = c dS^T Q    (s = c Q K^T)
Delta comes from a small preprocessing kernel (rowsum(dO * O), with O as stored).
dK/dV are computed by one program per (key block, kv head) that loops over the kv
head's query heads and the query blocks that can see the key block (from the block
itself to the end of its last key's document, key_end), so the GQA sum over a group
happens in registers with no second pass over memory and no atomics; dQ by one
program per query tile, over the same visible key blocks as the forward.

Masks only where they are needed. A key block that every row of a query tile sees
whole (all its keys at or after every row's first_key, all of them at or before the
tile's first token) needs no visibility mask; only the blocks that cross the
diagonal or a document start do. So each walk is two loops: one over the masked
blocks (those before and after the unmasked range, _unmasked_range; few, so not
software-pipelined), one over the unmasked ones (no mask, no -inf guard in the
running max). For dK/dV the unmasked query tiles are those that see the whole key
block: from the diagonal to the end of its first key's document. On one causal
document with 128 x 64 tiles that leaves 2 masked key blocks per query tile.

The gap (HAS_GAP, a constexpr: without it the kernels compile as before it
existed). Each query row loads its gap_start / gap_end with its first_key, and
every block, masked or not, masks the gap per element (and keeps the -inf guard:
a gap may hide all of a row's keys in a block). Skipped, in forward and dQ: the
blocks of the unmasked range that lie inside every row's gap ([max gap_start,
min gap_end) of the tile's rows, whole blocks only; none once a row's gap is
empty), e.g. the chosen answer's blocks for a tile of a DPO pair's rejected
queries. Masked blocks inside every gap are still walked (a few per tile at most).
dK/dV skips nothing more than key_end says: whether a query tile gaps a key block
away is known only from the tile's own rows, so bounds should end key_end before
such queries (a chosen key's key_end at the chosen answer's end: then the rejected
queries are never walked for it).

Layout: q, k, v, out (and their gradients) are [B, S, heads, D] with each token's
heads x D contiguous and tokens ``stride_*`` elements apart, so q/k/v may be column
slices of the fused projection's output and dq/dk/dv slices of one buffer. k and v
share a token stride, as do dk and dv, and out and d_out. INDEX_64 (set by the
launcher when an offset can pass 2^31 - 1) widens token rows to int64 before they
are multiplied by a stride; otherwise the kernels compile as 32-bit ones.

All arithmetic is fp32: on a GPU fp16/bf16 tiles go straight to tl.dot (tensor
cores, fp32 accumulation; P and dS are rounded to the input dtype for their dot,
as every flash attention does); fp32 inputs and the interpreter use IEEE fp32 dots.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_tiles import (_accumulate, _gap_skip, _key_tile, _outside_gap, _probabilities,
                              _query_rows, _query_tile, _row_statistics, _scores, _tile,
                              _token_rows, _unmasked_range, _visible)

# ---------------------------------------------------------------- forward

@triton.jit
def _forward_step(acc, m_i, l_i, q, k_ptr, v_ptr, b, kv_h, start, seq, stride_kv, head_dim,
                  tokens, first_key, gap_start, gap_end, qk_scale_log2, MASKED: tl.constexpr,
                  HAS_GAP: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, INDEX_64: tl.constexpr):
    """One key block of the online softmax (see _attention_forward_kernel)."""
    cols, kv_offsets, kv_mask = _key_tile(b, kv_h, start, seq, stride_kv, head_dim, BLOCK_N,
                                          BLOCK_D, INDEX_64)
    k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
    s = _scores(q, k, DOT_FP32) * qk_scale_log2
    if MASKED:
        s = tl.where(_visible(tokens, cols, first_key), s, float("-inf"))
    if HAS_GAP:
        s = tl.where(_outside_gap(cols, gap_start, gap_end), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MASKED:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    elif HAS_GAP:                   # a gap may hide a row's every key so far
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new               # every key seen: m_new is finite
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(s - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
    acc = _accumulate(acc * alpha[:, None], p, v, DOT_FP32)
    return acc, m_new, l_i


@triton.jit
def _attention_forward_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, first_key_ptr,
                              gap_start_ptr, gap_end_ptr,
                              seq, n_q_heads, n_kv_heads, group, head_dim, qk_scale_log2,
                              stride_q, stride_kv, stride_o, seq_bucket,
                              HAS_BOUNDS: tl.constexpr, HAS_GAP: tl.constexpr,
                              DOT_FP32: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                              INDEX_64: tl.constexpr):
    """One query tile (BLOCK_M tokens x BLOCK_H query heads of one kv head): online
    softmax over the visible key blocks, which it reads once for all its heads.

    Scores are kept in base-2 units (qk_scale_log2 = log2(e) / sqrt(D)):
      m_new = max(m, rowmax s),  alpha = 2^(m - m_new),  p = 2^(s - m_new)
      l = l alpha + rowsum p,    acc = acc alpha + p V
    A row that has seen no key yet keeps m = -inf; it subtracts 0 instead of m_new
    so that -inf - -inf never makes a NaN (only in masked blocks: in an unmasked one
    every row sees a key). At the end o = acc / l and lse = (m + log2 l) ln 2; a row
    with l = 0 (padding) writes o = 0, lse = -inf. Only the key blocks that can be
    visible are walked, and only the diagonal / document-start ones masked
    (_query_tile). With HAS_GAP every block also masks each row's gap (and guards the
    running max: a gap may hide all of a row's keys so far), and the unmasked range
    skips the blocks inside every row's gap (_gap_skip). ``seq_bucket`` (next power
    of two of seq) only keys the autotuner.
    """
    (b, kv_h, tokens, token_row, heads, stat_index, row_ok, first_key, gap_start, gap_end,
     lo, full_lo, full_hi, hi) = _query_tile(first_key_ptr, gap_start_ptr, gap_end_ptr, seq,
                                             n_q_heads, n_kv_heads, group, HAS_BOUNDS, HAS_GAP,
                                             BLOCK_M, BLOCK_N, BLOCK_H, INDEX_64)
    q_offsets, q_mask = _tile(token_row, heads, stride_q, head_dim, row_ok, BLOCK_D)
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)
    m_i = tl.full((BLOCK_H * BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H * BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_H * BLOCK_M, BLOCK_D), tl.float32)
    # the masked blocks (before full_lo, from full_hi on) in one loop, not pipelined (one
    # or two blocks per tile where there is one document), then the unmasked ones
    n_lo = tl.cdiv(full_lo - lo, BLOCK_N)      # full_lo may be hi: a partial block
    for i in tl.range(0, n_lo + tl.cdiv(hi - full_hi, BLOCK_N), num_stages=1):
        start = tl.where(i < n_lo, lo + i * BLOCK_N, full_hi + (i - n_lo) * BLOCK_N)
        acc, m_i, l_i = _forward_step(acc, m_i, l_i, q, k_ptr, v_ptr, b, kv_h, start, seq,
                                      stride_kv, head_dim, tokens, first_key, gap_start,
                                      gap_end, qk_scale_log2, True, HAS_GAP, DOT_FP32, BLOCK_N,
                                      BLOCK_D, INDEX_64)
    if HAS_GAP:
        # the unmasked blocks around those inside every row's gap: [full_lo, skip_lo), then
        # [skip_hi, full_hi), in one loop
        skip_lo, skip_hi = _gap_skip(full_lo, full_hi, gap_start, gap_end, row_ok, seq, BLOCK_N)
        n_below = tl.cdiv(skip_lo - full_lo, BLOCK_N)
        for i in range(0, n_below + tl.cdiv(full_hi - skip_hi, BLOCK_N)):
            start = tl.where(i < n_below, full_lo + i * BLOCK_N, skip_hi + (i - n_below) * BLOCK_N)
            acc, m_i, l_i = _forward_step(acc, m_i, l_i, q, k_ptr, v_ptr, b, kv_h, start, seq,
                                          stride_kv, head_dim, tokens, first_key, gap_start,
                                          gap_end, qk_scale_log2, False, True, DOT_FP32,
                                          BLOCK_N, BLOCK_D, INDEX_64)
    else:
        for start in range(full_lo, full_hi, BLOCK_N):
            acc, m_i, l_i = _forward_step(acc, m_i, l_i, q, k_ptr, v_ptr, b, kv_h, start, seq,
                                          stride_kv, head_dim, tokens, first_key, gap_start,
                                          gap_end, qk_scale_log2, False, False, DOT_FP32,
                                          BLOCK_N, BLOCK_D, INDEX_64)
    seen = l_i > 0.0
    l_div = tl.where(seen, l_i, 1.0)
    out = acc / l_div[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_div)) * 0.6931471805599453, float("-inf"))
    o_offsets, _ = _tile(token_row, heads, stride_o, head_dim, row_ok, BLOCK_D)
    tl.store(out_ptr + o_offsets, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(lse_ptr + stat_index, lse, mask=row_ok)


# ---------------------------------------------------------------- backward

@triton.jit
def _attention_delta_kernel(out_ptr, d_out_ptr, delta_ptr, n_rows, seq, n_q_heads, head_dim,
                            stride_o, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                            INDEX_64: tl.constexpr):
    """Delta = sum_d dO_d O_d of BLOCK_ROWS head vectors (row r = (b S + t) Hq + h), written
    to fp32 [B, Hq, S]: the rowsum(P * dP) of the softmax backward."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    if INDEX_64:
        rows = rows.to(tl.int64)
    token_row = rows // n_q_heads                      # b S + t
    offsets, mask = _tile(token_row, rows % n_q_heads, stride_o, head_dim, row_ok, BLOCK_D)
    o = tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(d_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    stat_index = ((token_row // seq) * n_q_heads + rows % n_q_heads) * seq + token_row % seq
    tl.store(delta_ptr + stat_index, tl.sum(o * do, axis=1), mask=row_ok)


@triton.jit
def _dkdv_step(dk, dv, k, v, q_ptr, d_out_ptr, lse_ptr, delta_ptr, first_key_ptr, gap_start_ptr,
               gap_end_ptr, b, kv_h, g0, start, cols, seq, n_q_heads, group, head_dim,
               qk_scale_log2, stride_q, stride_o, MASKED: tl.constexpr,
               HAS_BOUNDS: tl.constexpr, HAS_GAP: tl.constexpr, DOT_FP32: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
               INDEX_64: tl.constexpr):
    """One query tile's contribution to a key block's dK, dV (see _attention_dkdv_kernel)."""
    tokens, token_row, heads, stat_index, row_ok, first_key, gap_start, gap_end = _query_rows(
        b, kv_h, g0, start, seq, n_q_heads, group, first_key_ptr, gap_start_ptr, gap_end_ptr,
        HAS_BOUNDS, HAS_GAP, BLOCK_M, BLOCK_H, INDEX_64)
    q_offsets, q_mask = _tile(token_row, heads, stride_q, head_dim, row_ok, BLOCK_D)
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)
    do_offsets, _ = _tile(token_row, heads, stride_o, head_dim, row_ok, BLOCK_D)
    do = tl.load(d_out_ptr + do_offsets, mask=q_mask, other=0.0)
    lse2, delta = _row_statistics(lse_ptr, delta_ptr, stat_index, row_ok)
    p = _probabilities(q, k, tokens, cols, first_key, gap_start, gap_end, lse2, qk_scale_log2,
                       MASKED, HAS_GAP, DOT_FP32)
    dv = _accumulate(dv, tl.trans(p), do, DOT_FP32)
    ds = p * (_scores(do, v, DOT_FP32) - delta[:, None])
    dk = _accumulate(dk, tl.trans(ds), q, DOT_FP32)
    return dk, dv


@triton.jit
def _attention_dkdv_kernel(q_ptr, k_ptr, v_ptr, d_out_ptr, lse_ptr, delta_ptr,
                           dk_ptr, dv_ptr, first_key_ptr, key_end_ptr, gap_start_ptr,
                           gap_end_ptr, seq, n_q_heads, n_kv_heads, group, head_dim,
                           qk_scale_log2, scale, stride_q, stride_kv, stride_o, stride_dkv,
                           seq_bucket, HAS_BOUNDS: tl.constexpr, HAS_GAP: tl.constexpr,
                           DOT_FP32: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                           INDEX_64: tl.constexpr):
    """dK, dV of one key block of one kv head, summed over the group's query heads:
      dV_j = sum_h sum_i P_ij dO_i,    dK_j = c sum_h sum_i dS_ij Q_i,
    over the query tiles that can see the key block: from the block's first key
    (causal) to max key_end of its keys (the end of the last key's document). The
    query tiles from the diagonal to the end of the first key's document (key_end of
    it) see every key of the block: no mask there. With HAS_GAP each row's gap is
    masked in every tile (whether a tile's rows skip the block is known only once
    their gaps are loaded); nothing more is skipped here than key_end says, so bounds
    whose key_end ends before the queries that gap a key away (a DPO pair's chosen
    keys: at the chosen answer's end) walk none of them."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    kv_h = pid_bh % n_kv_heads
    n0 = pid_n * BLOCK_N
    cols, kv_offsets, kv_mask = _key_tile(b, kv_h, n0, seq, stride_kv, head_dim, BLOCK_N,
                                          BLOCK_D, INDEX_64)
    k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
    if HAS_BOUNDS:
        key_end = tl.load(key_end_ptr + b * seq + cols, mask=cols < seq, other=0)
        first_end = tl.load(key_end_ptr + b * seq + n0)
    else:
        key_end = tl.where(cols < seq, seq, 0)
        first_end = seq
    lo = (n0 // BLOCK_M) * BLOCK_M
    hi = tl.minimum(tl.max(key_end, axis=0), seq)
    full_lo, full_hi = _unmasked_range(lo, hi, n0 + BLOCK_N - 1, first_end - 1, BLOCK_M)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    # (query tile, head tile) pairs walked in one flat loop per kind: the masked tiles
    # (before full_lo, from full_hi on; not pipelined), then the unmasked ones. Nesting
    # the head tiles outside would keep both loops' pipelines live at once (spills).
    head_tiles = tl.cdiv(group, BLOCK_H)
    n_lo = tl.cdiv(full_lo - lo, BLOCK_M)
    n_masked = n_lo + tl.cdiv(hi - full_hi, BLOCK_M)
    for it in tl.range(0, n_masked * head_tiles, num_stages=1):
        i = it // head_tiles
        start = tl.where(i < n_lo, lo + i * BLOCK_M, full_hi + (i - n_lo) * BLOCK_M)
        dk, dv = _dkdv_step(dk, dv, k, v, q_ptr, d_out_ptr, lse_ptr, delta_ptr, first_key_ptr,
                            gap_start_ptr, gap_end_ptr, b, kv_h, (it % head_tiles) * BLOCK_H,
                            start, cols, seq, n_q_heads, group, head_dim, qk_scale_log2,
                            stride_q, stride_o, True, HAS_BOUNDS, HAS_GAP, DOT_FP32, BLOCK_M,
                            BLOCK_D, BLOCK_H, INDEX_64)
    for it in range(0, (full_hi - full_lo) // BLOCK_M * head_tiles):
        dk, dv = _dkdv_step(dk, dv, k, v, q_ptr, d_out_ptr, lse_ptr, delta_ptr, first_key_ptr,
                            gap_start_ptr, gap_end_ptr, b, kv_h, (it % head_tiles) * BLOCK_H,
                            full_lo + (it // head_tiles) * BLOCK_M, cols, seq, n_q_heads,
                            group, head_dim, qk_scale_log2, stride_q, stride_o, False,
                            HAS_BOUNDS, HAS_GAP, DOT_FP32, BLOCK_M, BLOCK_D, BLOCK_H, INDEX_64)
    out_offsets, _ = _tile(_token_rows(b, cols, seq, INDEX_64), kv_h, stride_dkv, head_dim,
                           cols < seq, BLOCK_D)
    tl.store(dk_ptr + out_offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_offsets, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_ptr, v_ptr, b, kv_h, start, seq, stride_kv, head_dim,
             tokens, first_key, gap_start, gap_end, qk_scale_log2, MASKED: tl.constexpr,
             HAS_GAP: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, INDEX_64: tl.constexpr):
    """One key block's contribution to a query tile's dQ (see _attention_dq_kernel)."""
    cols, kv_offsets, kv_mask = _key_tile(b, kv_h, start, seq, stride_kv, head_dim, BLOCK_N,
                                          BLOCK_D, INDEX_64)
    k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
    p = _probabilities(q, k, tokens, cols, first_key, gap_start, gap_end, lse2, qk_scale_log2,
                       MASKED, HAS_GAP, DOT_FP32)
    ds = p * (_scores(do, v, DOT_FP32) - delta[:, None])
    return _accumulate(dq, ds, k, DOT_FP32)


@triton.jit
def _attention_dq_kernel(q_ptr, k_ptr, v_ptr, d_out_ptr, lse_ptr, delta_ptr, dq_ptr,
                         first_key_ptr, gap_start_ptr, gap_end_ptr, seq, n_q_heads, n_kv_heads,
                         group, head_dim, qk_scale_log2, scale, stride_q, stride_kv, stride_o,
                         stride_dq, seq_bucket, HAS_BOUNDS: tl.constexpr, HAS_GAP: tl.constexpr,
                         DOT_FP32: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_H: tl.constexpr, INDEX_64: tl.constexpr):
    """dQ_i = c sum_j dS_ij K_j for one query tile, over the same visible key blocks as
    the forward, masked on the same ones (the gap too, and the same blocks skipped)."""
    (b, kv_h, tokens, token_row, heads, stat_index, row_ok, first_key, gap_start, gap_end,
     lo, full_lo, full_hi, hi) = _query_tile(first_key_ptr, gap_start_ptr, gap_end_ptr, seq,
                                             n_q_heads, n_kv_heads, group, HAS_BOUNDS, HAS_GAP,
                                             BLOCK_M, BLOCK_N, BLOCK_H, INDEX_64)
    q_offsets, q_mask = _tile(token_row, heads, stride_q, head_dim, row_ok, BLOCK_D)
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)
    do_offsets, _ = _tile(token_row, heads, stride_o, head_dim, row_ok, BLOCK_D)
    do = tl.load(d_out_ptr + do_offsets, mask=q_mask, other=0.0)
    lse2, delta = _row_statistics(lse_ptr, delta_ptr, stat_index, row_ok)
    dq = tl.zeros((BLOCK_H * BLOCK_M, BLOCK_D), tl.float32)
    n_lo = tl.cdiv(full_lo - lo, BLOCK_N)            # masked blocks, then unmasked (forward)
    for i in tl.range(0, n_lo + tl.cdiv(hi - full_hi, BLOCK_N), num_stages=1):
        start = tl.where(i < n_lo, lo + i * BLOCK_N, full_hi + (i - n_lo) * BLOCK_N)
        dq = _dq_step(dq, q, do, lse2, delta, k_ptr, v_ptr, b, kv_h, start, seq, stride_kv,
                      head_dim, tokens, first_key, gap_start, gap_end, qk_scale_log2, True,
                      HAS_GAP, DOT_FP32, BLOCK_N, BLOCK_D, INDEX_64)
    if HAS_GAP:                                      # around the skipped blocks (forward)
        skip_lo, skip_hi = _gap_skip(full_lo, full_hi, gap_start, gap_end, row_ok, seq, BLOCK_N)
        n_below = tl.cdiv(skip_lo - full_lo, BLOCK_N)
        for i in range(0, n_below + tl.cdiv(full_hi - skip_hi, BLOCK_N)):
            start = tl.where(i < n_below, full_lo + i * BLOCK_N, skip_hi + (i - n_below) * BLOCK_N)
            dq = _dq_step(dq, q, do, lse2, delta, k_ptr, v_ptr, b, kv_h, start, seq, stride_kv,
                          head_dim, tokens, first_key, gap_start, gap_end, qk_scale_log2, False,
                          True, DOT_FP32, BLOCK_N, BLOCK_D, INDEX_64)
    else:
        for start in range(full_lo, full_hi, BLOCK_N):
            dq = _dq_step(dq, q, do, lse2, delta, k_ptr, v_ptr, b, kv_h, start, seq, stride_kv,
                          head_dim, tokens, first_key, gap_start, gap_end, qk_scale_log2, False,
                          False, DOT_FP32, BLOCK_N, BLOCK_D, INDEX_64)
    dq_offsets, _ = _tile(token_row, heads, stride_dq, head_dim, row_ok, BLOCK_D)
    tl.store(dq_ptr + dq_offsets, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)
