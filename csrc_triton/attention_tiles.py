"""The flash attention kernels' tile helpers (@triton.jit, inlined into the kernels of
attention_kernels, whose docstring has the math): which rows a query tile holds and
which key blocks it walks, the visibility masks (documents, windows, the gap), the
dots and the recomputed probabilities."""
from __future__ import annotations

import triton
import triton.language as tl


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
def _query_rows(b, kv_h, g0, tokens0, seq, n_q_heads, group, first_key_ptr, gap_start_ptr,
                gap_end_ptr, HAS_BOUNDS: tl.constexpr, HAS_GAP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, INDEX_64: tl.constexpr):
    """The rows of a query tile: BLOCK_M tokens from tokens0 for each of the query heads
    g0 .. g0 + BLOCK_H - 1 of kv head kv_h. Returns (tokens, token rows, heads, lse/Delta
    index, row_ok, first_key, gap_start, gap_end); rows past the sequence or the group
    see nothing (first_key = token + 1) and have an empty gap (0, 0); without HAS_GAP
    the gap is a placeholder nobody reads."""
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
    if HAS_GAP:
        gap_start = tl.load(gap_start_ptr + b * seq + tokens, mask=row_ok, other=0)
        gap_end = tl.load(gap_end_ptr + b * seq + tokens, mask=row_ok, other=0)
    else:
        gap_start = tokens
        gap_end = tokens
    stat_row = b * n_q_heads + heads
    if INDEX_64:
        stat_row = stat_row.to(tl.int64)
    return (tokens, _token_rows(b, tokens, seq, INDEX_64), heads, stat_row * seq + tokens,
            row_ok, first_key, gap_start, gap_end)


@triton.jit
def _unmasked_range(lo, hi, first_seen, last_seen, BLOCK: tl.constexpr):
    """[a, b), lo <= a <= b <= hi, the blocks of BLOCK between lo and hi that start at or
    after ``first_seen`` and end at or before ``last_seen`` (inclusive): the ones seen
    whole. [lo, a) and [b, hi) keep their masks."""
    a = tl.minimum(tl.maximum(tl.cdiv(first_seen, BLOCK) * BLOCK, lo), hi)
    b = tl.minimum(tl.maximum(((last_seen + 1) // BLOCK) * BLOCK, a), hi)
    return a, b


@triton.jit
def _query_tile(first_key_ptr, gap_start_ptr, gap_end_ptr, seq, n_q_heads, n_kv_heads, group,
                HAS_BOUNDS: tl.constexpr, HAS_GAP: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, INDEX_64: tl.constexpr):
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
    tokens, token_row, heads, stat_index, row_ok, first_key, gap_start, gap_end = _query_rows(
        b, kv_h, (rest % head_tiles) * BLOCK_H, pid_m * BLOCK_M, seq, n_q_heads, group,
        first_key_ptr, gap_start_ptr, gap_end_ptr, HAS_BOUNDS, HAS_GAP, BLOCK_M, BLOCK_H,
        INDEX_64)
    lo = (tl.min(first_key, axis=0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum((pid_m + 1) * BLOCK_M, seq)
    full_lo, full_hi = _unmasked_range(lo, hi, tl.max(tl.where(row_ok, first_key, 0), axis=0),
                                       pid_m * BLOCK_M, BLOCK_N)
    return (b, kv_h, tokens, token_row, heads, stat_index, row_ok, first_key, gap_start,
            gap_end, lo, full_lo, full_hi, hi)


@triton.jit
def _gap_skip(full_lo, full_hi, gap_start, gap_end, row_ok, seq, BLOCK: tl.constexpr):
    """[a, b), full_lo <= a <= b <= full_hi: the blocks of BLOCK in [full_lo, full_hi)
    that lie inside every row's gap (seen by no row of the tile, so skipped; empty as
    soon as one row has an empty gap)."""
    inside_from = tl.max(tl.where(row_ok, gap_start, 0), axis=0)
    inside_to = tl.min(tl.where(row_ok, gap_end, seq), axis=0)
    a = tl.minimum(tl.maximum(tl.cdiv(inside_from, BLOCK) * BLOCK, full_lo), full_hi)
    b = tl.minimum(tl.maximum((inside_to // BLOCK) * BLOCK, a), full_hi)
    return a, b


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
def _outside_gap(cols, gap_start, gap_end):
    """[rows, cols] mask: key j is not in query row r's gap [gap_start[r], gap_end[r])."""
    return (cols[None, :] < gap_start[:, None]) | (cols[None, :] >= gap_end[:, None])


@triton.jit
def _row_statistics(lse_ptr, delta_ptr, stat_index, row_ok):
    """(lse in base 2, Delta) of query rows; an empty row's -inf lse becomes 0 (its P is
    masked to 0 anyway) so that no inf enters the arithmetic."""
    lse = tl.load(lse_ptr + stat_index, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    return lse2, tl.load(delta_ptr + stat_index, mask=row_ok, other=0.0)


@triton.jit
def _probabilities(q, k, tokens, cols, first_key, gap_start, gap_end, lse2, qk_scale_log2,
                   MASKED: tl.constexpr, HAS_GAP: tl.constexpr, DOT_FP32: tl.constexpr):
    """P = 2^(s - lse) on visible pairs, 0 elsewhere (s in base-2 units), recomputed;
    without MASKED every pair of the block is causal and in its document (the gap, with
    HAS_GAP, is masked in every block)."""
    p = tl.exp2(_scores(q, k, DOT_FP32) * qk_scale_log2 - lse2[:, None])
    if MASKED:
        p = tl.where(_visible(tokens, cols, first_key), p, 0.0)
    if HAS_GAP:
        p = tl.where(_outside_gap(cols, gap_start, gap_end), p, 0.0)
    return p
