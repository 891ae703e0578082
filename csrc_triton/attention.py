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
j <= i < key_end[j]). Without segment ids every row is one causal document. A
sliding window W (``document_bounds(segment_ids, window=W)``, Mistral's) narrows
both: i - W < j, i.e. first_key[i] >= i - W + 1 and key_end[j] <= j + W.

Bounds may also carry a gap per query, (first_key, key_end, gap_start, gap_end):
query i sees key j iff first_key[i] <= j <= i and not gap_start[i] <= j < gap_end[i]
(empty where gap_start == gap_end, else inside [first_key[i], i]). That is a DPO
pair packed with its prompt once, [prompt | chosen | rejected]: the rejected
answer's queries skip the chosen keys. The queries that see key j are then
[j, key_end[j]) minus those whose gap holds j (key_end may end before such queries,
e.g. a chosen key's at the chosen answer's end, and the backward walks less).

Layout: each token's heads x D contiguous, tokens any distance apart (q, k, v may be
column slices of the fused q/k/v projection's output; k and v share a token stride).
The backward can write dq, dk, dv into caller-given views (``into``: slices of one
[tokens, (Hq + 2 Hkv) D] buffer, the input gradient of that fused projection).

The kernels, with the math of the forward and the backward (online softmax, P
recomputed from the saved lse, the softmax Jacobian), their tiles and precision:
attention_kernels; the GPU tile configurations and their pruning: attention_configs.
Here: the argument checks, the launchers (autotuned on a GPU, fixed tiles under the
interpreter) and the autograd.Function.

Public:
  flash_attention(q, k, v, segment_ids=None, window=None, *, bounds=None) -> out
                                                              autograd Function
  document_bounds(segment_ids, window=None) -> (first_key, key_end)   int32 [B, S] each
  check_gap(bounds)                             reads a gap's values (a GPU caller's once)
Low level (used by the model's hand-written backward):
  flash_attention_forward(q, k, v, bounds) -> (out, lse)      lse fp32 [B, Hq, S]
  flash_attention_backward(d_out, q, k, v, out, lse, bounds, into=None) -> (dq, dk, dv)
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton

from .checks import (FLOAT_DTYPES, INDEX_DTYPES, check_same_device, check_tensor,
                      check_token_rows, wide_index)
from ._runtime import DOT_IN_FP32, INTERPRETING, MAX_INT32_NUMEL, new_output, record_launch
from .attention_configs import AttentionBlocks, gpu_configs, head_dim_class
from .attention_kernels import (_attention_delta_kernel, _attention_dkdv_kernel,
                                _attention_dq_kernel, _attention_forward_kernel)
from .autotune_policy import autotune
from .records import OpRecord

__all__ = ["AttentionBlocks", "check_gap", "document_bounds", "flash_attention",
           "flash_attention_forward", "flash_attention_backward"]

_OP = "flash_attention"
MAX_HEAD_DIM = 256
# token rows (B x S) are indexed in int32 inside the kernels; offsets are 64-bit when needed
MAX_TOKENS = MAX_INT32_NUMEL
_MAX_GRID_Y = 65535             # CUDA's limit on grid axis 1 (batch rows x kv heads)
_LOG2E = 1.4426950408889634
# head vectors per program of the Delta preprocessing (memory-bound; the interpreter
# pays per program, so it takes many)
_DELTA_ROWS = 1024 if INTERPRETING else 32
_KERNELS = {"forward": _attention_forward_kernel, "dkdv": _attention_dkdv_kernel,
            "dq": _attention_dq_kernel}
# what a tuned choice depends on (plus every tensor's dtype, which triton adds itself)
AUTOTUNE_KEY = ["seq_bucket", "n_q_heads", "n_kv_heads", "head_dim", "HAS_BOUNDS", "HAS_GAP"]
_tuned: dict = {}
# None, (first_key, key_end) or (first_key, key_end, gap_start, gap_end): int32 [B, S] each
Bounds = Optional[Tuple[torch.Tensor, ...]]


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


def tuned_kernel(kind: str, block_d: int):
    """triton.autotune of one kernel over attention_configs.gpu_configs(kind, block_d)."""
    key = (kind, head_dim_class(block_d))
    if key not in _tuned:
        configs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n,
                                  "BLOCK_H": c.block_h},
                                 num_warps=c.num_warps, num_stages=c.num_stages)
                   for c in gpu_configs(kind, block_d)]
        _tuned[key] = autotune(_KERNELS[kind], configs, key=AUTOTUNE_KEY)
    return _tuned[key]


def _launch(kind: str, grid, args: dict, blocks: Optional[AttentionBlocks], seq: int,
            group: int, block_d: int) -> None:
    """Launch kernel ``kind``: with ``blocks`` (a test's override) or the interpreter's
    tiles as given, else autotuned. ``grid(block_m, block_n, block_h)`` -> the grid."""
    record_launch(f"_attention_{kind}_kernel")
    if blocks is None and not INTERPRETING:
        tuned_kernel(kind, block_d)[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"],
                                                      meta["BLOCK_H"])](**args)
        return
    blocks = blocks or _interpreter_blocks(seq, group)
    _KERNELS[kind][grid(blocks.block_m, blocks.block_n, blocks.block_h)](
        **args, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_H=blocks.block_h,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages)


# ---------------------------------------------------------------- launchers

def document_bounds(segment_ids: torch.Tensor, window: Optional[int] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(first_key, key_end), int32 [B, S], from segment ids [B, S] (-1 = padding):
    first_key[i] = first index of i's run of equal ids (i + 1 for padding: sees nothing);
    key_end[j] = one past the last index of j's run (j for padding: seen by nobody).
    ``window`` W (Mistral's ``sliding_window``, as transformers masks it: key j is seen
    by query i iff i - W < j <= i, so W keys counting the query itself) narrows both:
    first_key[i] = max(run start, i - W + 1), key_end[j] = min(run end, j + W).
    O(S) torch ops, once per batch; the model shares them between its layers."""
    check_tensor(_OP, "segment_ids", segment_ids, dtypes=INDEX_DTYPES, ndim=2)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ValueError(f"{_OP}: argument 'window' must be a positive int (keys per query, "
                         f"the query itself included) or None, got {window!r}")
    batch, seq = segment_ids.shape
    index = torch.arange(seq, device=segment_ids.device).expand(batch, seq)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, index, 0).cummax(dim=1).values
    end = torch.where(ends, index + 1, seq).flip(1).cummin(dim=1).values.flip(1)
    if window is not None:
        first = torch.maximum(first, index - (window - 1))
        end = torch.minimum(end, index + window)
    padding = segment_ids < 0
    first_key = torch.where(padding, index + 1, first).to(torch.int32).contiguous()
    key_end = torch.where(padding, index, end).to(torch.int32).contiguous()
    return first_key, key_end


def _check_heads(name: str, t, dtypes, shape=None) -> None:
    check_tensor(_OP, name, t, dtypes=dtypes, ndim=4, shape=shape, contiguous=False,
                 max_numel=None)
    check_token_rows(_OP, name, t)


def _same_stride(names: Tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> int:
    stride = check_token_rows(_OP, names[0], a)
    if a.shape[0] * a.shape[1] > 1 and check_token_rows(_OP, names[1], b) != stride:
        raise ValueError(f"{_OP}: '{names[0]}' and '{names[1]}' must share a token stride "
                         f"(strides {a.stride()} and {b.stride()})")
    return stride


def check_qkv(q, k, v, q_name="q"):
    """Validate q/k/v (token rows, see the module docstring); returns (B, S, Hq, Hkv, D)."""
    _check_heads(q_name, q, FLOAT_DTYPES)
    batch, seq, n_q_heads, head_dim = q.shape
    _check_heads("k", k, (q.dtype,), (batch, seq, None, head_dim))
    _check_heads("v", v, (q.dtype,), tuple(k.shape))
    _same_stride(("k", "v"), k, v)
    n_kv_heads = k.shape[2]
    if n_kv_heads == 0 or n_q_heads % n_kv_heads:
        raise ValueError(f"{_OP}: the query heads of '{q_name}' ({n_q_heads}) must be a multiple "
                         f"of the kv heads of 'k' ({n_kv_heads})")
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{_OP}: head dim (last dim of '{q_name}', {head_dim}) must be in "
                         f"[1, {MAX_HEAD_DIM}]")
    if batch * seq > MAX_TOKENS:
        raise ValueError(f"{_OP}: '{q_name}' has {batch} x {seq} token rows, more than the "
                         f"{MAX_TOKENS} the kernels index")
    if not INTERPRETING and batch * n_kv_heads > _MAX_GRID_Y:
        raise ValueError(f"{_OP}: {batch} rows x {n_kv_heads} kv heads = {batch * n_kv_heads} "
                         f"programs on grid axis 1, more than CUDA's {_MAX_GRID_Y}")
    check_same_device(_OP, **{q_name: q, "k": k, "v": v})
    return batch, seq, n_q_heads, n_kv_heads, head_dim


_BOUND_NAMES = ("bounds[0] (first_key)", "bounds[1] (key_end)", "bounds[2] (gap_start)",
                "bounds[3] (gap_end)")


def check_bounds(bounds, batch, seq, device):
    """``bounds``: None, (first_key, key_end) or (first_key, key_end, gap_start, gap_end),
    int32 [B, S] each on q's device. On the host (CPU tensors) the gap's values are
    checked too (check_gap); on a GPU that would be a read back per call, so there a
    caller that builds gaps checks them once with check_gap."""
    if bounds is None:
        return
    if not (isinstance(bounds, tuple) and len(bounds) in (2, 4)):
        raise ValueError(f"{_OP}: argument 'bounds' must be (first_key, key_end) from "
                         "document_bounds, (first_key, key_end, gap_start, gap_end), or None")
    for name, t in zip(_BOUND_NAMES, bounds):
        check_tensor(_OP, name, t, dtypes=(torch.int32,), shape=(batch, seq))
        if t.device != device:
            raise ValueError(f"{_OP}: argument '{name}' is on {t.device}; q is on {device}")
    if len(bounds) == 4 and device.type == "cpu":
        check_gap(bounds)


def check_gap(bounds) -> None:
    """The gap [gap_start[i], gap_end[i]) of every query i is empty (gap_start == gap_end)
    or inside its keys [first_key[i], i]; reads the values (one reduction and, on a
    failure, the first bad query)."""
    first_key, _, gap_start, gap_end = bounds
    index = torch.arange(first_key.shape[1], device=first_key.device)
    bad = (gap_start > gap_end) | ((gap_start < gap_end)
                                   & ((gap_start < first_key) | (gap_end > index + 1)))
    if bool(bad.any()):
        b, i = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"{_OP}: the gap of query {i} of row {b}, [gap_start, gap_end) = "
            f"[{int(gap_start[b, i])}, {int(gap_end[b, i])}), must be empty (gap_start == "
            f"gap_end) or inside its keys [first_key, i] = [{int(first_key[b, i])}, {i}]")


def _query_grid(batch: int, seq: int, n_kv_heads: int, group: int):
    """Forward / dQ grid: query blocks x (batch rows x kv heads x head tiles of the group)."""
    return lambda block_m, block_n, block_h: (
        triton.cdiv(seq, block_m), batch * n_kv_heads * triton.cdiv(group, block_h))


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    return DOT_IN_FP32 or dtype == torch.float32


def _common(q, k, head_dim, bounds):
    """Scalar and constexpr arguments every kernel takes."""
    batch, seq, n_q_heads, _ = q.shape
    n_kv_heads = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim)
    return dict(seq=seq, n_q_heads=n_q_heads, n_kv_heads=n_kv_heads,
                group=n_q_heads // n_kv_heads, head_dim=head_dim, qk_scale_log2=scale * _LOG2E,
                seq_bucket=triton.next_power_of_2(max(seq, 1)), HAS_BOUNDS=bounds is not None,
                HAS_GAP=bounds is not None and len(bounds) == 4,
                # without a gap its pointers are q, never read
                gap_start_ptr=bounds[2] if bounds is not None and len(bounds) == 4 else q,
                gap_end_ptr=bounds[3] if bounds is not None and len(bounds) == 4 else q,
                DOT_FP32=_dot_in_fp32(q.dtype),
                BLOCK_D=max(16, triton.next_power_of_2(head_dim))), scale


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            bounds: Bounds = None,
                            *, _blocks_override: Optional[AttentionBlocks] = None):
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] (one dtype, token rows), bounds from
    document_bounds (None: one causal document per row) -> (out [B, S, Hq, D] in q's
    dtype, contiguous, lse fp32 [B, Hq, S], natural log, -inf for rows that see nothing)."""
    batch, seq, n_q_heads, n_kv_heads, head_dim = check_qkv(q, k, v)
    check_bounds(bounds, batch, seq, q.device)
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((batch, n_q_heads, seq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    args, _ = _common(q, k, head_dim, bounds)
    args.update(q_ptr=q, k_ptr=k, v_ptr=v, out_ptr=out, lse_ptr=lse,
                first_key_ptr=bounds[0] if bounds is not None else q,   # unused without bounds
                stride_q=check_token_rows(_OP, "q", q), stride_kv=check_token_rows(_OP, "k", k),
                stride_o=n_q_heads * head_dim, INDEX_64=wide_index(q, k, v, out, lse))
    _launch("forward", _query_grid(batch, seq, n_kv_heads, args["group"]), args,
            _blocks_override, seq, args["group"], args["BLOCK_D"])
    return out, lse


def check_backward_args(d_out, q, k, v, out, lse, bounds):
    """The checks of flash_attention_backward (shared with csrc_torch's); returns
    (B, S, Hq, Hkv, D)."""
    batch, seq, n_q_heads, n_kv_heads, head_dim = check_qkv(q, k, v)
    check_bounds(bounds, batch, seq, q.device)
    _check_heads("d_out", d_out, (q.dtype,), tuple(q.shape))
    _check_heads("out", out, (q.dtype,), tuple(q.shape))
    _same_stride(("out", "d_out"), out, d_out)
    check_tensor(_OP, "lse", lse, dtypes=(torch.float32,), shape=(batch, n_q_heads, seq),
                 max_numel=None)
    check_same_device(_OP, q=q, d_out=d_out, out=out, lse=lse)
    return batch, seq, n_q_heads, n_kv_heads, head_dim


def check_into(into, q, k):
    """``into`` = (dq, dk, dv) views to write the gradients into (q's and k's shapes and
    dtype, token rows, dk and dv sharing a token stride), or None: new tensors."""
    if into is None:
        return (new_output(q.shape, q.dtype, q.device), new_output(k.shape, k.dtype, k.device),
                new_output(k.shape, k.dtype, k.device))
    if not isinstance(into, (tuple, list)) or len(into) != 3:
        raise ValueError(f"{_OP}: argument 'into' must be (dq, dk, dv) or None")
    for name, t, like in zip(("into[0]", "into[1]", "into[2]"), into, (q, k, k)):
        _check_heads(name, t, (q.dtype,), tuple(like.shape))
        check_same_device(_OP, q=q, **{name: t})
    _same_stride(("into[1]", "into[2]"), into[1], into[2])
    return tuple(into)


def flash_attention_backward(d_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                             bounds: Bounds = None,
                             *, into=None, _blocks_override: Optional[AttentionBlocks] = None):
    """Gradients (dq, dk, dv) of flash_attention_forward given dL/d(out), from its
    saved out and lse; dk/dv of a kv head are summed over its query heads. Written into
    ``into`` = (dq, dk, dv) when given (see check_into), else new contiguous tensors."""
    batch, seq, n_q_heads, n_kv_heads, head_dim = check_backward_args(d_out, q, k, v, out, lse,
                                                                       bounds)
    dq, dk, dv = check_into(into, q, k)
    if q.numel() == 0:
        return dq, dk, dv
    args, scale = _common(q, k, head_dim, bounds)
    group, block_d = args.pop("group"), args["BLOCK_D"]
    first_key, key_end = bounds[:2] if bounds is not None else (q, q)
    stride_o = check_token_rows(_OP, "out", out)
    delta = new_output((batch, n_q_heads, seq), torch.float32, q.device)
    wide = wide_index(q, k, v, d_out, out, lse, dq, dk, dv)
    n_rows = batch * seq * n_q_heads
    record_launch("_attention_delta_kernel")
    _attention_delta_kernel[(triton.cdiv(n_rows, _DELTA_ROWS),)](
        out, d_out, delta, n_rows, seq, n_q_heads, head_dim, stride_o, BLOCK_ROWS=_DELTA_ROWS,
        BLOCK_D=block_d, INDEX_64=wide)

    shared = dict(args, group=group, q_ptr=q, k_ptr=k, v_ptr=v, d_out_ptr=d_out, lse_ptr=lse,
                  delta_ptr=delta, first_key_ptr=first_key, scale=scale,
                  stride_q=check_token_rows(_OP, "q", q), stride_kv=check_token_rows(_OP, "k", k),
                  stride_o=stride_o, INDEX_64=wide)
    _launch("dkdv", lambda block_m, block_n, block_h: (triton.cdiv(seq, block_n),
                                                       batch * n_kv_heads),
            dict(shared, dk_ptr=dk, dv_ptr=dv, key_end_ptr=key_end,
                 stride_dkv=check_token_rows(_OP, "into[1]", dk)),
            _blocks_override, seq, group, block_d)
    _launch("dq", _query_grid(batch, seq, n_kv_heads, group),
            dict(shared, dq_ptr=dq, stride_dq=check_token_rows(_OP, "into[0]", dq)),
            _blocks_override, seq, group, block_d)
    return dq, dk, dv


def _bounds_for(q: torch.Tensor, segment_ids: Optional[torch.Tensor], window: Optional[int],
                bounds: Bounds) -> Bounds:
    if bounds is not None:
        if segment_ids is not None or window is not None:
            raise ValueError(f"{_OP}: give either 'bounds' or 'segment_ids' (and 'window'), "
                             "not both")
        return bounds
    if segment_ids is None:
        if window is None:
            return None
        segment_ids = torch.zeros(q.shape[:2], dtype=torch.int32, device=q.device)
    check_tensor(_OP, "segment_ids", segment_ids, dtypes=INDEX_DTYPES, shape=tuple(q.shape[:2]))
    check_same_device(_OP, q=q, segment_ids=segment_ids)
    return document_bounds(segment_ids, window)


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_ids, window=None, bounds=None):
        bounds = _bounds_for(q, segment_ids, window, bounds)
        out, lse = flash_attention_forward(q, k, v, bounds)
        ctx.bounds = bounds
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(d_out.contiguous(), q, k, v, out, lse, ctx.bounds)
        return dq, dk, dv, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    segment_ids: Optional[torch.Tensor] = None, window: Optional[int] = None,
                    *, bounds: Bounds = None) -> torch.Tensor:
    """Causal attention of q [B, S, Hq, D] over k/v [B, S, Hkv, D] within the documents
    of ``segment_ids`` [B, S] (-1 = padding, whose rows come out 0; None = one document
    per row), within a sliding ``window`` of keys when given, or over explicit
    ``bounds`` (see check_bounds: a gap per query), softmax scale 1/sqrt(D).
    Differentiable in q, k and v."""
    check_qkv(q, k, v)
    return FlashAttentionFunction.apply(q, k, v, segment_ids, window, bounds)


RECORD = OpRecord(
    "flash_attention", (document_bounds, flash_attention_forward, flash_attention_backward),
    torch_mirror="csrc_torch.attention", reference="tests.reference.attention",
    parity="tests.test_torch_backend:flash_attention_parity",
    bench="bench.ops_attention:flash_attention_bench",
    compile_specs="tests.sm90_attention:attention_specs")
