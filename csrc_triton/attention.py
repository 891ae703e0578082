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

The kernels, with the math of the forward and the backward (online softmax, P
recomputed from the saved lse, the softmax Jacobian), their tiles and precision:
attention_kernels. Here: the tile sizes, the argument checks, the launchers and the
autograd.Function.

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

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_same_device, check_tensor
from ._runtime import DOT_IN_FP32, INTERPRETING, new_output, record_launch
from .attention_kernels import (_attention_delta_kernel, _attention_dkdv_kernel,
                                _attention_dq_kernel, _attention_forward_kernel)

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
