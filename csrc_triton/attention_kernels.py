"""The flash attention kernels (launched by attention): the forward, the Delta
preprocessing, dK/dV and dQ, and their @triton.jit tile helpers. Shapes and who sees
whom (first_key / key_end from segment ids): the attention docstring.

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

Backward, from the saved lse (P is recomputed, never stored):
    P_ij = exp(s_ij - lse_i)  (0 where not visible),   O = P V
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

# ---------------------------------------------------------------- tile helpers

@triton.jit
def _tile(token_row, head, stride, head_dim, row_ok, BLOCK_D: tl.constexpr):
    """Offsets and mask of a [rows, BLOCK_D] tile: row r is head ``head`` (per row, or one
    for all) of token row token_row[r] = b S + t, token rows ``stride`` elements apart
    (pad lanes d >= D and rows not row_ok masked)."""
    dims = tl.arange(0, BLOCK_D)
    offsets = (token_row * stride + head * head_dim)[:, None] + dims[None, :]
    return offsets, row_ok[:, None] & (dims < head_dim)[None, :]


@triton.jit
def _token_rows(b, tokens, seq, INDEX_64: tl.constexpr):
    """b S + tokens, in int64 when INDEX_64 (before any stride multiplies it)."""
    rows = b * seq + tokens
    if INDEX_64:
        rows = rows.to(tl.int64)
    return rows


@triton.jit
def _query_rows(b, kv_h, g0, tokens0, seq, n_q_heads, group, first_key_ptr,
                HAS_BOUNDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
                INDEX_64: tl.constexpr):
    """The rows of a query tile: BLOCK_M tokens from tokens0 for each of the query heads
    g0 .. g0 + BLOCK_H - 1 of kv head kv_h. Returns (tokens, token rows, heads, lse/Delta
    index, row_ok, first_key); rows past the sequence or the group see nothing
    (first_key = token + 1)."""
    r = tl.arange(0, BLOCK_H * BLOCK_M)
    g = g0 + r // BLOCK_M
    tokens = tokens0 + r % BLOCK_M
    heads = kv_h * group + g
    row_ok = (tokens < seq) & (g < group)
    if HAS_BOUNDS:
        first = tl.load(first_key_ptr + b * seq + tokens, mask=row_ok, other=0)
    else:
        first = tl.zeros_like(tokens)
    first_key = tl.where(row_ok, first, tokens + 1)
    stat_row = b * n_q_heads + heads
    if INDEX_64:
        stat_row = stat_row.to(tl.int64)
    return (tokens, _token_rows(b, tokens, seq, INDEX_64), heads, stat_row * seq + tokens,
            row_ok, first_key)


@triton.jit
def _unmasked_range(lo, hi, first_seen, last_seen, BLOCK: tl.constexpr):
    """[a, b), lo <= a <= b <= hi, the blocks of BLOCK between lo and hi that start at or
    after ``first_seen`` and end at or before ``last_seen`` (inclusive): the ones seen
    whole. [lo, a) and [b, hi) keep their masks."""
    a = tl.minimum(tl.maximum(tl.cdiv(first_seen, BLOCK) * BLOCK, lo), hi)
    b = tl.minimum(tl.maximum(((last_seen + 1) // BLOCK) * BLOCK, a), hi)
    return a, b


@triton.jit
def _query_tile(first_key_ptr, seq, n_q_heads, n_kv_heads, group, HAS_BOUNDS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                INDEX_64: tl.constexpr):
    """The query tile of a forward / dQ program. Grid axis 0: query blocks; axis 1: batch
    rows x kv heads x ceil(group / BLOCK_H) head tiles. Returns (b, kv head, and
    _query_rows' values, then lo, a, b, hi): the visible keys of the tile lie in
    [min first_key, last token], so only the key blocks from lo (rounded down to
    BLOCK_N) to hi are walked, the rest skipped; [a, b) are seen whole by every row
    (at or after the largest first_key, at or before the tile's first token)."""
    pid_m = tl.program_id(0)
    head_tiles = tl.cdiv(group, BLOCK_H)
    pid = tl.program_id(1)
    b = pid // (n_kv_heads * head_tiles)
    rest = pid % (n_kv_heads * head_tiles)
    kv_h = rest // head_tiles
    tokens, token_row, heads, stat_index, row_ok, first_key = _query_rows(
        b, kv_h, (rest % head_tiles) * BLOCK_H, pid_m * BLOCK_M, seq, n_q_heads, group,
        first_key_ptr, HAS_BOUNDS, BLOCK_M, BLOCK_H, INDEX_64)
    lo = (tl.min(first_key, axis=0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum((pid_m + 1) * BLOCK_M, seq)
    full_lo, full_hi = _unmasked_range(lo, hi, tl.max(tl.where(row_ok, first_key, 0), axis=0),
                                       pid_m * BLOCK_M, BLOCK_N)
    return (b, kv_h, tokens, token_row, heads, stat_index, row_ok, first_key,
            lo, full_lo, full_hi, hi)


@triton.jit
def _key_tile(b, kv_h, start, seq, stride, head_dim, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, INDEX_64: tl.constexpr):
    """(key indices, offsets, mask) of BLOCK_N keys from ``start`` of kv head kv_h."""
    cols = start + tl.arange(0, BLOCK_N)
    offsets, mask = _tile(_token_rows(b, cols, seq, INDEX_64), kv_h, stride, head_dim,
                          cols < seq, BLOCK_D)
    return cols, offsets, mask


@triton.jit
def _scores(a, b, DOT_FP32: tl.constexpr):
    """a @ b^T with fp32 accumulation (IEEE fp32 operands when DOT_FP32)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    return tl.dot(a, tl.trans(b))


@triton.jit
def _accumulate(acc, a, b, DOT_FP32: tl.constexpr):
    """acc + a @ b; ``a`` (fp32 probabilities or score gradients) is rounded to b's dtype."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def _visible(tokens, cols, first_key):
    """[rows, cols] mask: query token i sees key j iff first_key[i] <= j <= i."""
    return (cols[None, :] >= first_key[:, None]) & (cols[None, :] <= tokens[:, None])


@triton.jit
def _row_statistics(lse_ptr, delta_ptr, stat_index, row_ok):
    """(lse in base 2, Delta) of query rows; an empty row's -inf lse becomes 0 (its P is
    masked to 0 anyway) so that no inf enters the arithmetic."""
    lse = tl.load(lse_ptr + stat_index, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    return lse2, tl.load(delta_ptr + stat_index, mask=row_ok, other=0.0)


@triton.jit
def _probabilities(q, k, tokens, cols, first_key, lse2, qk_scale_log2, MASKED: tl.constexpr,
                   DOT_FP32: tl.constexpr):
    """P = 2^(s - lse) on visible pairs, 0 elsewhere (s in base-2 units), recomputed;
    without MASKED every pair of the block is visible."""
    p = tl.exp2(_scores(q, k, DOT_FP32) * qk_scale_log2 - lse2[:, None])
    if MASKED:
        p = tl.where(_visible(tokens, cols, first_key), p, 0.0)
    return p


# ---------------------------------------------------------------- forward

@triton.jit
def _forward_step(acc, m_i, l_i, q, k_ptr, v_ptr, b, kv_h, start, seq, stride_kv, head_dim,
                  tokens, first_key, qk_scale_log2, MASKED: tl.constexpr,
                  DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  INDEX_64: tl.constexpr):
    """One key block of the online softmax (see _attention_forward_kernel)."""
    cols, kv_offsets, kv_mask = _key_tile(b, kv_h, start, seq, stride_kv, head_dim, BLOCK_N,
                                          BLOCK_D, INDEX_64)
    k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
    s = _scores(q, k, DOT_FP32) * qk_scale_log2
    if MASKED:
        s = tl.where(_visible(tokens, cols, first_key), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MASKED:
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
                              seq, n_q_heads, n_kv_heads, group, head_dim, qk_scale_log2,
                              stride_q, stride_kv, stride_o, seq_bucket,
                              HAS_BOUNDS: tl.constexpr, DOT_FP32: tl.constexpr,
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
    (_query_tile). ``seq_bucket`` (next power of two of seq) only keys the autotuner.
    """
    (b, kv_h, tokens, token_row, heads, stat_index, row_ok, first_key,
     lo, full_lo, full_hi, hi) = _query_tile(first_key_ptr, seq, n_q_heads, n_kv_heads, group,
                                             HAS_BOUNDS, BLOCK_M, BLOCK_N, BLOCK_H, INDEX_64)
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
                                      stride_kv, head_dim, tokens, first_key, qk_scale_log2,
                                      True, DOT_FP32, BLOCK_N, BLOCK_D, INDEX_64)
    for start in range(full_lo, full_hi, BLOCK_N):
        acc, m_i, l_i = _forward_step(acc, m_i, l_i, q, k_ptr, v_ptr, b, kv_h, start, seq,
                                      stride_kv, head_dim, tokens, first_key, qk_scale_log2,
                                      False, DOT_FP32, BLOCK_N, BLOCK_D, INDEX_64)
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
def _dkdv_step(dk, dv, k, v, q_ptr, d_out_ptr, lse_ptr, delta_ptr, first_key_ptr, b, kv_h, g0,
               start, cols, seq, n_q_heads, group, head_dim, qk_scale_log2, stride_q, stride_o,
               MASKED: tl.constexpr, HAS_BOUNDS: tl.constexpr, DOT_FP32: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
               INDEX_64: tl.constexpr):
    """One query tile's contribution to a key block's dK, dV (see _attention_dkdv_kernel)."""
    tokens, token_row, heads, stat_index, row_ok, first_key = _query_rows(
        b, kv_h, g0, start, seq, n_q_heads, group, first_key_ptr, HAS_BOUNDS, BLOCK_M, BLOCK_H,
        INDEX_64)
    q_offsets, q_mask = _tile(token_row, heads, stride_q, head_dim, row_ok, BLOCK_D)
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)
    do_offsets, _ = _tile(token_row, heads, stride_o, head_dim, row_ok, BLOCK_D)
    do = tl.load(d_out_ptr + do_offsets, mask=q_mask, other=0.0)
    lse2, delta = _row_statistics(lse_ptr, delta_ptr, stat_index, row_ok)
    p = _probabilities(q, k, tokens, cols, first_key, lse2, qk_scale_log2, MASKED, DOT_FP32)
    dv = _accumulate(dv, tl.trans(p), do, DOT_FP32)
    ds = p * (_scores(do, v, DOT_FP32) - delta[:, None])
    dk = _accumulate(dk, tl.trans(ds), q, DOT_FP32)
    return dk, dv


@triton.jit
def _attention_dkdv_kernel(q_ptr, k_ptr, v_ptr, d_out_ptr, lse_ptr, delta_ptr,
                           dk_ptr, dv_ptr, first_key_ptr, key_end_ptr,
                           seq, n_q_heads, n_kv_heads, group, head_dim, qk_scale_log2, scale,
                           stride_q, stride_kv, stride_o, stride_dkv, seq_bucket,
                           HAS_BOUNDS: tl.constexpr, DOT_FP32: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                           INDEX_64: tl.constexpr):
    """dK, dV of one key block of one kv head, summed over the group's query heads:
      dV_j = sum_h sum_i P_ij dO_i,    dK_j = c sum_h sum_i dS_ij Q_i,
    over the query tiles that can see the key block: from the block's first key
    (causal) to max key_end of its keys (the end of the last key's document). The
    query tiles from the diagonal to the end of the first key's document (key_end of
    it) see every key of the block: no mask there."""
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
                            b, kv_h, (it % head_tiles) * BLOCK_H, start, cols, seq, n_q_heads,
                            group, head_dim, qk_scale_log2, stride_q, stride_o, True,
                            HAS_BOUNDS, DOT_FP32, BLOCK_M, BLOCK_D, BLOCK_H, INDEX_64)
    for it in range(0, (full_hi - full_lo) // BLOCK_M * head_tiles):
        dk, dv = _dkdv_step(dk, dv, k, v, q_ptr, d_out_ptr, lse_ptr, delta_ptr, first_key_ptr,
                            b, kv_h, (it % head_tiles) * BLOCK_H,
                            full_lo + (it // head_tiles) * BLOCK_M, cols, seq, n_q_heads,
                            group, head_dim, qk_scale_log2, stride_q, stride_o, False,
                            HAS_BOUNDS, DOT_FP32, BLOCK_M, BLOCK_D, BLOCK_H, INDEX_64)
    out_offsets, _ = _tile(_token_rows(b, cols, seq, INDEX_64), kv_h, stride_dkv, head_dim,
                           cols < seq, BLOCK_D)
    tl.store(dk_ptr + out_offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_offsets, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_ptr, v_ptr, b, kv_h, start, seq, stride_kv, head_dim,
             tokens, first_key, qk_scale_log2, MASKED: tl.constexpr, DOT_FP32: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INDEX_64: tl.constexpr):
    """One key block's contribution to a query tile's dQ (see _attention_dq_kernel)."""
    cols, kv_offsets, kv_mask = _key_tile(b, kv_h, start, seq, stride_kv, head_dim, BLOCK_N,
                                          BLOCK_D, INDEX_64)
    k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
    p = _probabilities(q, k, tokens, cols, first_key, lse2, qk_scale_log2, MASKED, DOT_FP32)
    ds = p * (_scores(do, v, DOT_FP32) - delta[:, None])
    return _accumulate(dq, ds, k, DOT_FP32)


@triton.jit
def _attention_dq_kernel(q_ptr, k_ptr, v_ptr, d_out_ptr, lse_ptr, delta_ptr, dq_ptr,
                         first_key_ptr, seq, n_q_heads, n_kv_heads, group, head_dim,
                         qk_scale_log2, scale, stride_q, stride_kv, stride_o, stride_dq,
                         seq_bucket, HAS_BOUNDS: tl.constexpr, DOT_FP32: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_H: tl.constexpr, INDEX_64: tl.constexpr):
    """dQ_i = c sum_j dS_ij K_j for one query tile, over the same visible key blocks as
    the forward, masked on the same ones."""
    (b, kv_h, tokens, token_row, heads, stat_index, row_ok, first_key,
     lo, full_lo, full_hi, hi) = _query_tile(first_key_ptr, seq, n_q_heads, n_kv_heads, group,
                                             HAS_BOUNDS, BLOCK_M, BLOCK_N, BLOCK_H, INDEX_64)
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
                      head_dim, tokens, first_key, qk_scale_log2, True, DOT_FP32, BLOCK_N,
                      BLOCK_D, INDEX_64)
    for start in range(full_lo, full_hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse2, delta, k_ptr, v_ptr, b, kv_h, start, seq, stride_kv,
                      head_dim, tokens, first_key, qk_scale_log2, False, DOT_FP32, BLOCK_N,
                      BLOCK_D, INDEX_64)
    dq_offsets, _ = _tile(token_row, heads, stride_dq, head_dim, row_ok, BLOCK_D)
    tl.store(dq_ptr + dq_offsets, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)
