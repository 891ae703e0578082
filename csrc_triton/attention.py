"""Flash attention for packed documents with grouped-query heads, forward and backward.

Shapes (the model's layout, no transposes): q [B, S, Hq, D], k and v [B, S, Hkv, D],
Hq a multiple of Hkv; query head h reads kv head h // (Hq / Hkv) (GQA by indexing:
K and V are never repeated in memory). D is any head dim up to 256; tiles are padded
to the next power of two (at least 16) and the pad lanes are masked.

Who sees whom. ``segment_ids`` [B, S] (int32/int64) numbers the documents of a packed
row; -1 is padding. A document is a contiguous run of equal ids (the batch contract
of anita_core.data.packing). Query i sees key j iff

    first_key[i] <= j <= i,     first_key[i] = index of the first token of i's run,

and a padding query sees nothing (first_key[i] = i + 1): its output is 0 and its
log-sum-exp is -inf; padding keys are seen only by padding queries, i.e. by nobody.
The launchers turn segment ids into two int32 vectors once (``document_bounds``):
first_key (per query) and key_end (per key: the queries that see key j are
j <= i < key_end[j]). Without segment ids every row is one causal document.

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

All arithmetic is fp32: on a GPU fp16/bf16 tiles go straight to tl.dot (tensor
cores, fp32 accumulation; P and dS are rounded to the input dtype for their dot,
as every flash attention does); fp32 inputs and the interpreter use IEEE fp32 dots.

Public:
  flash_attention(q, k, v, segment_ids=None) -> out           autograd Function
  document_bounds(segment_ids) -> (first_key, key_end)        int32 [B, S] each
Low level (used by the model's hand-written backward):
  flash_attention_forward(q, k, v, bounds) -> (out, lse)      lse fp32 [B, Hq, S]
  flash_attention_backward(d_out, q, k, v, out, lse, bounds) -> (dq, dk, dv)
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_same_device, check_tensor
from ._runtime import DOT_IN_FP32, INTERPRETING, new_output, record_launch

_OP = "flash_attention"
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
# head vectors per program of the Delta preprocessing (memory-bound; the interpreter
# pays per program, so it takes many)
_DELTA_ROWS = 1024 if INTERPRETING else 32


class AttentionBlocks(NamedTuple):
    """Tile sizes and launch options of the kernels. A query tile holds BLOCK_M tokens of
    each of BLOCK_H query heads that share one kv head (BLOCK_H * BLOCK_M rows); dkdv
    walks BLOCK_N keys against such query tiles."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    block_h: int = 1


def gpu_blocks(kind: str, block_d: int) -> AttentionBlocks:
    """Fixed GPU configurations per kernel and padded head dim (no autotuning, so the
    Hopper compile check, tests/test_hopper_compile.py via tests/sm90_compile.py, sees exactly what runs).
    Dot dims >= 64 so that bf16 dots become wgmma (HGMMA) on sm_90. At D = 256 the
    backward's 64-row tiles spill (dK + dV accumulators alone are 128 registers per
    thread at 8 warps), so its query tile drops to 32 rows: no spills, but the dots
    with 32 rows run on mma.sync (HMMA)."""
    if kind == "forward":
        if block_d <= 64:
            return AttentionBlocks(128, 64, 4, 3)
        if block_d <= 128:
            return AttentionBlocks(128, 64, 8, 3)
        return AttentionBlocks(64, 64, 8, 2)
    if kind in ("dkdv", "dq"):
        if block_d <= 128:
            return AttentionBlocks(64, 64, 8 if block_d > 64 else 4, 2)
        return AttentionBlocks(32, 64, 8, 1)
    raise ValueError(f"gpu_blocks: unknown kernel kind {kind!r}")


def _interpreter_blocks(seq: int, group: int) -> AttentionBlocks:
    # The interpreter pays per program and per operation, and NumPy runs a 256 x 256
    # tile almost as fast as a 16 x 16 one: one tile covers a short sequence whole
    # (a 1024-token training step of the tiny model, one core: 5.6 s with 128-tiles,
    # 3.9 s with 256).
    # A tile also stacks every query head of a kv group (up to 1024 rows), so the tiny
    # model's attention is one program per (batch row, kv head).
    block = min(256, max(16, triton.next_power_of_2(seq)))
    block_h = min(triton.next_power_of_2(group), max(1, 1024 // block))
    return AttentionBlocks(block, block, 4, 1, block_h)


# ---------------------------------------------------------------- kernels

@triton.jit
def _tile(row_index, row_ok, head_dim, BLOCK_D: tl.constexpr):
    """Offsets and mask of a [rows, BLOCK_D] tile of a contiguous [B, S, H, D] tensor,
    row r being the head vector number row_index[r] = (b S + token) H + head (pad
    lanes d >= D and rows not row_ok masked)."""
    dims = tl.arange(0, BLOCK_D)
    offsets = row_index[:, None] * head_dim + dims[None, :]
    return offsets, row_ok[:, None] & (dims < head_dim)[None, :]


@triton.jit
def _query_rows(b, kv_h, g0, tokens0, seq, n_q_heads, group, first_key_ptr,
                HAS_BOUNDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """The rows of a query tile: BLOCK_M tokens from tokens0 for each of the query heads
    g0 .. g0 + BLOCK_H - 1 of kv head kv_h. Returns (tokens, q row index, lse/Delta
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
    return (tokens, (b * seq + tokens) * n_q_heads + heads, (b * n_q_heads + heads) * seq + tokens,
            row_ok, first_key)


@triton.jit
def _query_tile(first_key_ptr, seq, n_q_heads, n_kv_heads, group, HAS_BOUNDS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """The query tile of a forward / dQ program. Grid axis 0: query blocks; axis 1: batch
    rows x kv heads x ceil(group / BLOCK_H) head tiles. Returns (b, kv head, and
    _query_rows' tokens, q row index, lse/Delta index, row_ok, first_key, then lo, hi):
    the visible keys of the tile lie in [min first_key, last token], so only the key
    blocks from lo (rounded down to BLOCK_N) to hi are walked, the rest skipped."""
    pid_m = tl.program_id(0)
    head_tiles = tl.cdiv(group, BLOCK_H)
    pid = tl.program_id(1)
    b = pid // (n_kv_heads * head_tiles)
    rest = pid % (n_kv_heads * head_tiles)
    kv_h = rest // head_tiles
    tokens, q_index, stat_index, row_ok, first_key = _query_rows(
        b, kv_h, (rest % head_tiles) * BLOCK_H, pid_m * BLOCK_M, seq, n_q_heads, group,
        first_key_ptr, HAS_BOUNDS, BLOCK_M, BLOCK_H)
    lo = (tl.min(first_key, axis=0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum((pid_m + 1) * BLOCK_M, seq)
    return b, kv_h, tokens, q_index, stat_index, row_ok, first_key, lo, hi


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
def _probabilities(q, k, tokens, cols, first_key, lse2, qk_scale_log2, DOT_FP32: tl.constexpr):
    """P = 2^(s - lse) on visible pairs, 0 elsewhere (s in base-2 units), recomputed."""
    s = _scores(q, k, DOT_FP32) * qk_scale_log2
    return tl.where(_visible(tokens, cols, first_key), tl.exp2(s - lse2[:, None]), 0.0)


@triton.jit
def _attention_forward_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, first_key_ptr,
                              seq, n_q_heads, n_kv_heads, group, head_dim, qk_scale_log2,
                              HAS_BOUNDS: tl.constexpr, DOT_FP32: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """One query tile (BLOCK_M tokens x BLOCK_H query heads of one kv head): online
    softmax over the visible key blocks, which it reads once for all its heads.

    Scores are kept in base-2 units (qk_scale_log2 = log2(e) / sqrt(D)):
      m_new = max(m, rowmax s),  alpha = 2^(m - m_new),  p = 2^(s - m_new)
      l = l alpha + rowsum p,    acc = acc alpha + p V
    A row that has seen no key yet keeps m = -inf; it subtracts 0 instead of m_new
    so that -inf - -inf never makes a NaN. At the end o = acc / l and
    lse = (m + log2 l) ln 2; a row with l = 0 (padding) writes o = 0, lse = -inf.
    Only the key blocks that can be visible are walked (_query_tile).
    """
    b, kv_h, tokens, q_index, stat_index, row_ok, first_key, lo, hi = _query_tile(
        first_key_ptr, seq, n_q_heads, n_kv_heads, group, HAS_BOUNDS, BLOCK_M, BLOCK_N, BLOCK_H)
    q_offsets, q_mask = _tile(q_index, row_ok, head_dim, BLOCK_D)
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)
    m_i = tl.full((BLOCK_H * BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H * BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_H * BLOCK_M, BLOCK_D), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kv_offsets, kv_mask = _tile((b * seq + cols) * n_kv_heads + kv_h, cols < seq, head_dim,
                                    BLOCK_D)
        k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
        s = _scores(q, k, DOT_FP32) * qk_scale_log2
        s = tl.where(_visible(tokens, cols, first_key), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
        acc = _accumulate(acc * alpha[:, None], p, v, DOT_FP32)
        m_i = m_new
    seen = l_i > 0.0
    l_div = tl.where(seen, l_i, 1.0)
    out = acc / l_div[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_div)) * 0.6931471805599453, float("-inf"))
    tl.store(out_ptr + q_offsets, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(lse_ptr + stat_index, lse, mask=row_ok)


@triton.jit
def _attention_delta_kernel(out_ptr, d_out_ptr, delta_ptr, n_rows, seq, n_q_heads, head_dim,
                            BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Delta = sum_d dO_d O_d of BLOCK_ROWS head vectors (row r = (b S + t) Hq + h), written
    to fp32 [B, Hq, S]: the rowsum(P * dP) of the softmax backward."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    offsets, mask = _tile(rows, row_ok, head_dim, BLOCK_D)
    o = tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(d_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    token_row = rows // n_q_heads                      # b S + t
    stat_index = ((token_row // seq) * n_q_heads + rows % n_q_heads) * seq + token_row % seq
    tl.store(delta_ptr + stat_index, tl.sum(o * do, axis=1), mask=row_ok)


@triton.jit
def _attention_dkdv_kernel(q_ptr, k_ptr, v_ptr, d_out_ptr, lse_ptr, delta_ptr,
                           dk_ptr, dv_ptr, first_key_ptr, key_end_ptr,
                           seq, n_q_heads, n_kv_heads, group, head_dim, qk_scale_log2, scale,
                           HAS_BOUNDS: tl.constexpr, DOT_FP32: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """dK, dV of one key block of one kv head, summed over the group's query heads:
      dV_j = sum_h sum_i P_ij dO_i,    dK_j = c sum_h sum_i dS_ij Q_i,
    over the query tiles that can see the key block: from the block's first key
    (causal) to max key_end of its keys (the end of the last key's document)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    kv_h = pid_bh % n_kv_heads
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kv_offsets, kv_mask = _tile((b * seq + cols) * n_kv_heads + kv_h, cols < seq, head_dim, BLOCK_D)
    k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
    if HAS_BOUNDS:
        key_end = tl.load(key_end_ptr + b * seq + cols, mask=cols < seq, other=0)
    else:
        key_end = tl.where(cols < seq, seq, 0)
    lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    hi = tl.minimum(tl.max(key_end, axis=0), seq)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for g0 in range(0, group, BLOCK_H):
        for start in range(lo, hi, BLOCK_M):
            tokens, q_index, stat_index, row_ok, first_key = _query_rows(
                b, kv_h, g0, start, seq, n_q_heads, group, first_key_ptr, HAS_BOUNDS,
                BLOCK_M, BLOCK_H)
            q_offsets, q_mask = _tile(q_index, row_ok, head_dim, BLOCK_D)
            q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)
            do = tl.load(d_out_ptr + q_offsets, mask=q_mask, other=0.0)
            lse2, delta = _row_statistics(lse_ptr, delta_ptr, stat_index, row_ok)
            p = _probabilities(q, k, tokens, cols, first_key, lse2, qk_scale_log2, DOT_FP32)
            dv = _accumulate(dv, tl.trans(p), do, DOT_FP32)
            ds = p * (_scores(do, v, DOT_FP32) - delta[:, None])
            dk = _accumulate(dk, tl.trans(ds), q, DOT_FP32)
    tl.store(dk_ptr + kv_offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_offsets, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_dq_kernel(q_ptr, k_ptr, v_ptr, d_out_ptr, lse_ptr, delta_ptr, dq_ptr,
                         first_key_ptr, seq, n_q_heads, n_kv_heads, group, head_dim,
                         qk_scale_log2, scale,
                         HAS_BOUNDS: tl.constexpr, DOT_FP32: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_H: tl.constexpr):
    """dQ_i = c sum_j dS_ij K_j for one query tile, over the same visible key blocks as
    the forward."""
    b, kv_h, tokens, q_index, stat_index, row_ok, first_key, lo, hi = _query_tile(
        first_key_ptr, seq, n_q_heads, n_kv_heads, group, HAS_BOUNDS, BLOCK_M, BLOCK_N, BLOCK_H)
    q_offsets, q_mask = _tile(q_index, row_ok, head_dim, BLOCK_D)
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)
    do = tl.load(d_out_ptr + q_offsets, mask=q_mask, other=0.0)
    lse2, delta = _row_statistics(lse_ptr, delta_ptr, stat_index, row_ok)
    dq = tl.zeros((BLOCK_H * BLOCK_M, BLOCK_D), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kv_offsets, kv_mask = _tile((b * seq + cols) * n_kv_heads + kv_h, cols < seq, head_dim,
                                    BLOCK_D)
        k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
        p = _probabilities(q, k, tokens, cols, first_key, lse2, qk_scale_log2, DOT_FP32)
        ds = p * (_scores(do, v, DOT_FP32) - delta[:, None])
        dq = _accumulate(dq, ds, k, DOT_FP32)
    tl.store(dq_ptr + q_offsets, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------- launchers

def document_bounds(segment_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(first_key, key_end), int32 [B, S], from segment ids [B, S] (-1 = padding):
    first_key[i] = first index of i's run of equal ids (i + 1 for padding: sees nothing);
    key_end[j] = one past the last index of j's run (j for padding: seen by nobody).
    O(S) torch ops, once per batch; the model shares them between its layers."""
    check_tensor(_OP, "segment_ids", segment_ids, dtypes=INDEX_DTYPES, ndim=2)
    batch, seq = segment_ids.shape
    index = torch.arange(seq, device=segment_ids.device).expand(batch, seq)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, index, 0).cummax(dim=1).values
    end = torch.where(ends, index + 1, seq).flip(1).cummin(dim=1).values.flip(1)
    padding = segment_ids < 0
    first_key = torch.where(padding, index + 1, first).to(torch.int32).contiguous()
    key_end = torch.where(padding, index, end).to(torch.int32).contiguous()
    return first_key, key_end


def check_qkv(q, k, v, q_name="q"):
    """Validate q/k/v; returns (B, S, Hq, Hkv, D)."""
    check_tensor(_OP, q_name, q, dtypes=FLOAT_DTYPES, ndim=4)
    batch, seq, n_q_heads, head_dim = q.shape
    check_tensor(_OP, "k", k, dtypes=(q.dtype,), shape=(batch, seq, None, head_dim))
    check_tensor(_OP, "v", v, dtypes=(q.dtype,), shape=tuple(k.shape))
    n_kv_heads = k.shape[2]
    if n_kv_heads == 0 or n_q_heads % n_kv_heads:
        raise ValueError(f"{_OP}: the query heads of '{q_name}' ({n_q_heads}) must be a multiple "
                         f"of the kv heads of 'k' ({n_kv_heads})")
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{_OP}: head dim (last dim of '{q_name}', {head_dim}) must be in "
                         f"[1, {MAX_HEAD_DIM}]")
    check_same_device(_OP, **{q_name: q, "k": k, "v": v})
    return batch, seq, n_q_heads, n_kv_heads, head_dim


def check_bounds(bounds, batch, seq, device):
    if bounds is None:
        return
    if not (isinstance(bounds, tuple) and len(bounds) == 2):
        raise ValueError(f"{_OP}: argument 'bounds' must be the (first_key, key_end) pair "
                         "from document_bounds, or None")
    for name, t in zip(("bounds[0] (first_key)", "bounds[1] (key_end)"), bounds):
        check_tensor(_OP, name, t, dtypes=(torch.int32,), shape=(batch, seq))
        if t.device != device:
            raise ValueError(f"{_OP}: argument '{name}' is on {t.device}; q is on {device}")


def _blocks(kind: str, seq: int, group: int, block_d: int) -> AttentionBlocks:
    return _interpreter_blocks(seq, group) if INTERPRETING else gpu_blocks(kind, block_d)


def _query_grid(blocks: AttentionBlocks, batch: int, seq: int, n_kv_heads: int, group: int):
    """Forward / dQ grid: query blocks x (batch rows x kv heads x head tiles of the group)."""
    return (triton.cdiv(seq, blocks.block_m), batch * n_kv_heads * triton.cdiv(group, blocks.block_h))


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    return DOT_IN_FP32 or dtype == torch.float32


def _common(q, k, head_dim):
    """Scalar and constexpr arguments every kernel takes."""
    batch, seq, n_q_heads, _ = q.shape
    n_kv_heads = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim)
    return dict(seq=seq, n_q_heads=n_q_heads, n_kv_heads=n_kv_heads,
                group=n_q_heads // n_kv_heads, head_dim=head_dim,
                qk_scale_log2=scale * _LOG2E), scale


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            bounds: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                            *, _blocks_override: Optional[AttentionBlocks] = None):
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] (one dtype, contiguous), bounds from
    document_bounds (None: one causal document per row) -> (out [B, S, Hq, D] in q's
    dtype, lse fp32 [B, Hq, S], natural log, -inf for rows that see nothing)."""
    batch, seq, n_q_heads, _, head_dim = check_qkv(q, k, v)
    check_bounds(bounds, batch, seq, q.device)
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((batch, n_q_heads, seq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    block_d = max(16, triton.next_power_of_2(head_dim))
    args, _ = _common(q, k, head_dim)
    blocks = _blocks_override or _blocks("forward", seq, args["group"], block_d)
    first_key = bounds[0] if bounds is not None else q      # unused when HAS_BOUNDS is off
    record_launch("_attention_forward_kernel")
    _attention_forward_kernel[_query_grid(blocks, batch, seq, k.shape[2], args["group"])](
        q, k, v, out, lse, first_key, **args, HAS_BOUNDS=bounds is not None,
        DOT_FP32=_dot_in_fp32(q.dtype), BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
        BLOCK_D=block_d, BLOCK_H=blocks.block_h, num_warps=blocks.num_warps,
        num_stages=blocks.num_stages)
    return out, lse


def check_backward_args(d_out, q, k, v, out, lse, bounds):
    """The checks of flash_attention_backward (shared with csrc_torch's); returns
    (B, S, Hq, Hkv, D)."""
    batch, seq, n_q_heads, n_kv_heads, head_dim = check_qkv(q, k, v)
    check_bounds(bounds, batch, seq, q.device)
    check_tensor(_OP, "d_out", d_out, dtypes=(q.dtype,), shape=tuple(q.shape))
    check_tensor(_OP, "out", out, dtypes=(q.dtype,), shape=tuple(q.shape))
    check_tensor(_OP, "lse", lse, dtypes=(torch.float32,), shape=(batch, n_q_heads, seq))
    check_same_device(_OP, q=q, d_out=d_out, out=out, lse=lse)
    return batch, seq, n_q_heads, n_kv_heads, head_dim


def flash_attention_backward(d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                             bounds: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                             *, _blocks_override: Optional[AttentionBlocks] = None):
    """Gradients (dq, dk, dv) of flash_attention_forward given dL/d(out), from its
    saved out and lse; dk/dv of a kv head are summed over its query heads."""
    batch, seq, n_q_heads, n_kv_heads, head_dim = check_backward_args(d_out, q, k, v, out, lse,
                                                                       bounds)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    if q.numel() == 0:
        return dq, dk, dv
    block_d = max(16, triton.next_power_of_2(head_dim))
    args, scale = _common(q, k, head_dim)
    has_bounds = bounds is not None
    first_key, key_end = bounds if has_bounds else (q, q)
    dot_fp32 = _dot_in_fp32(q.dtype)

    delta = new_output((batch, n_q_heads, seq), torch.float32, q.device)
    n_rows = batch * seq * n_q_heads
    delta_rows = _DELTA_ROWS
    record_launch("_attention_delta_kernel")
    _attention_delta_kernel[(triton.cdiv(n_rows, delta_rows),)](
        out, d_out, delta, n_rows, seq, n_q_heads, head_dim, BLOCK_ROWS=delta_rows, BLOCK_D=block_d)

    group = args["group"]
    blocks = _blocks_override or _blocks("dkdv", seq, group, block_d)
    record_launch("_attention_dkdv_kernel")
    _attention_dkdv_kernel[(triton.cdiv(seq, blocks.block_n), batch * n_kv_heads)](
        q, k, v, d_out, lse, delta, dk, dv, first_key, key_end, **args, scale=scale,
        HAS_BOUNDS=has_bounds, DOT_FP32=dot_fp32, BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n, BLOCK_D=block_d, BLOCK_H=blocks.block_h,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages)

    blocks = _blocks_override or _blocks("dq", seq, group, block_d)
    record_launch("_attention_dq_kernel")
    _attention_dq_kernel[_query_grid(blocks, batch, seq, n_kv_heads, group)](
        q, k, v, d_out, lse, delta, dq, first_key, **args, scale=scale,
        HAS_BOUNDS=has_bounds, DOT_FP32=dot_fp32, BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n, BLOCK_D=block_d, BLOCK_H=blocks.block_h,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    return dq, dk, dv


def _bounds_for(q: torch.Tensor, segment_ids: Optional[torch.Tensor]):
    if segment_ids is None:
        return None
    check_tensor(_OP, "segment_ids", segment_ids, dtypes=INDEX_DTYPES, shape=tuple(q.shape[:2]))
    check_same_device(_OP, q=q, segment_ids=segment_ids)
    return document_bounds(segment_ids)


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_ids):
        bounds = _bounds_for(q, segment_ids)
        out, lse = flash_attention_forward(q, k, v, bounds)
        ctx.bounds = bounds
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(d_out.contiguous(), q, k, v, out, lse, ctx.bounds)
        return dq, dk, dv, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of q [B, S, Hq, D] over k/v [B, S, Hkv, D] within the documents
    of ``segment_ids`` [B, S] (-1 = padding, whose rows come out 0; None = one document
    per row), softmax scale 1/sqrt(D). Differentiable in q, k and v."""
    check_qkv(q, k, v)
    return FlashAttentionFunction.apply(q, k, v, segment_ids)
