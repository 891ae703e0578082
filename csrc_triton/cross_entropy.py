"""Cross-entropy over a vocabulary row, with an online logsumexp.

For logits x [T, V] and integer labels y [T]:
  lse_t    = log sum_v exp(x_tv)                 (one pass over V, running max)
  loss_t   = lse_t - x_{t, y_t}                  (0 where y_t == ignore_index)
  dx_tv    = (softmax(x_t)_v - [v == y_t]) * s_t (s_t: an upstream factor per row)

Public:
  cross_entropy_op(logits, labels, ignore_index=-100) -> (loss_sum, n_tokens)
      autograd Function, differentiable in loss_sum (fp32 0-dim); n_tokens is
      an int64 0-dim count of the rows whose label is not ignore_index. The sum
      and the count (not the mean) are returned so a trainer can normalize
      exactly across gradient-accumulation micro-batches.
Low level (reused by linear_loss.py and the model):
  cross_entropy_rows(logits, labels, ignore_index=-100, *, block_v=None)
      -> (lse fp32 [T], target_logit fp32 [T])
      lse is computed for every row, ignored rows included; target_logit is 0
      at ignored rows.
  softmax_grad_rows(logits, labels, lse, row_scale, ignore_index=-100, *, out=None,
                    block_v=None) -> out
      out_tv = (exp(x_tv - lse_t) - [v == y_t]) * row_scale_t, 0 at ignored rows.
      out=None allocates a tensor of logits' dtype; out=logits overwrites the
      logits in place (each element is read before it is written, by the same
      program); out may also have another float dtype (e.g. fp32 logits, bf16
      gradient for a half-precision matmul).
  softmax_grad_rows_(logits, labels, lse, row_scale, ignore_index=-100) -> logits
      the in-place form.

Every kernel upcasts its tiles to fp32; logits may be fp32, fp16 or bf16 and V
any size (LLaMA-3: 128,256). A label outside [0, V) that is not ignore_index is
a ValueError (checked on the host, which synchronizes with the device once).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import FLOAT_DTYPES, INDEX_DTYPES, check_same_device, check_tensor
from ._runtime import INTERPRETING, new_output, record_launch
from .records import OpRecord

_OP = "cross_entropy"

# Vocabulary tile per loop iteration. The interpreter pays per operation, not
# per element, so it takes the largest tile (LLaMA-3's 128,256 in 2 steps); a
# GPU program keeps a 4096-wide fp32 tile in registers across 8 warps.
_MAX_BLOCK_V = 65536 if INTERPRETING else 4096
_NUM_WARPS = 8
# Rows per program: one on a GPU (a row's tile already fills the SM's threads);
# in the interpreter as many as fit a ~1M-element tile, since each program and
# each operation costs a fixed Python overhead (measured: one program per row
# made the lm-head loss most of a tiny model's CPU training step).
_INTERPRETER_TILE_ELEMENTS = 2**20


def _pick_block_t(T: int, BLOCK_V: int) -> int:
    if not INTERPRETING:
        return 1
    return max(1, min(triton.next_power_of_2(T), _INTERPRETER_TILE_ELEMENTS // BLOCK_V))


@triton.jit
def _lse_rows_kernel(logits_ptr, labels_ptr, lse_ptr, target_ptr, T, V, ignore_index,
                     BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    """Program p handles rows t in [p*BLOCK_T, (p+1)*BLOCK_T) of logits [T, V]
    (row-major, contiguous); on a GPU BLOCK_T is 1, the interpreter takes many
    rows at once because it pays per operation, not per element.

    Online logsumexp over vocabulary tiles x_k (Milakov & Gimelshein 2018):
      m_k = max(m_{k-1}, max(x_k))
      s_k = s_{k-1} * exp(m_{k-1} - m_k) + sum(exp(x_k - m_k))
      lse = m_K + log(s_K)
    with m_0 = -inf, s_0 = 0 (exp(-inf - m_1) = 0 rescales the empty sum).
    Masked lanes load -inf and add exp(-inf) = 0. Rows past T re-read row T-1
    (so no lane computes -inf - -inf) and are not stored.
    target_t = x_{t, y_t}, or 0 when y_t == ignore_index (lse is still stored).
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = rows < T
    safe_rows = tl.minimum(rows, T - 1).to(tl.int64)
    row_ptrs = logits_ptr + safe_rows * V
    offsets = tl.arange(0, BLOCK_V)

    running_max = tl.full([BLOCK_T], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        x = tl.load(row_ptrs[:, None] + cols[None, :], mask=(cols < V)[None, :],
                    other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        running_sum = (running_sum * tl.exp(running_max - new_max)
                       + tl.sum(tl.exp(x - new_max[:, None]), axis=1))
        running_max = new_max
    tl.store(lse_ptr + rows, running_max + tl.log(running_sum), mask=in_range)

    label = tl.load(labels_ptr + safe_rows)
    ignored = label == ignore_index
    safe_label = tl.where(ignored, 0, label)
    target = tl.load(row_ptrs + safe_label).to(tl.float32)
    tl.store(target_ptr + rows, tl.where(ignored, 0.0, target), mask=in_range)


@triton.jit
def _softmax_grad_rows_kernel(logits_ptr, out_ptr, labels_ptr, lse_ptr, row_scale_ptr,
                              T, V, ignore_index, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    """Rows as in _lse_rows_kernel: out_tv = (p_tv - [v == y_t]) * s_t, p_tv = exp(x_tv - lse_t).

    Derivation: loss_t = lse_t - x_{t,y_t}, d lse_t / d x_tv = exp(x_tv - lse_t) = p_tv,
    d x_{t,y_t} / d x_tv = [v == y_t]; so d(s_t * loss_t)/d x_tv = s_t * (p_tv - [v == y_t]).
    (The same kernel gives d log p_{t,y_t} / d x_tv = [v == y_t] - p_tv with s_t = -g_t.)
    Rows with y_t == ignore_index are written with 0 (whatever lse_t holds there).
    out_ptr may equal logits_ptr: every element is loaded before it is stored,
    by the same program and lane, so the update is safe in place.
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = rows < T
    safe_rows = tl.minimum(rows, T - 1).to(tl.int64)
    label = tl.load(labels_ptr + safe_rows)
    ignored = label == ignore_index
    lse = tl.load(lse_ptr + safe_rows)
    scale = tl.load(row_scale_ptr + safe_rows)
    in_rows = logits_ptr + safe_rows * V
    out_rows = out_ptr + safe_rows * V
    offsets = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        mask = in_range[:, None] & (cols < V)[None, :]
        x = tl.load(in_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        prob = tl.exp(x - lse[:, None])
        onehot = tl.where(cols[None, :] == label[:, None], 1.0, 0.0)
        grad = tl.where(ignored[:, None], 0.0, (prob - onehot) * scale[:, None])
        tl.store(out_rows[:, None] + cols[None, :], grad.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# launchers


def _pick_block_v(op: str, V: int, block_v) -> int:
    if block_v is None:
        return max(16, min(_MAX_BLOCK_V, triton.next_power_of_2(V)))
    if not isinstance(block_v, int) or block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"{op}: block_v must be a power of two >= 16, got {block_v!r}")
    return block_v


def check_ignore_index(op: str, ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"{op}: ignore_index must be a Python int, got {ignore_index!r}")
    return ignore_index


def check_labels_in_range(op: str, labels: torch.Tensor, V: int, ignore_index: int) -> None:
    """Every label not equal to ignore_index must index a vocabulary entry: a
    label outside [0, V) would make a kernel read outside its row."""
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"{op}: labels[{first}] = {int(labels[first])} is outside the "
                         f"vocabulary [0, {V}) and is not ignore_index ({ignore_index})")


def _check_logits_and_labels(op: str, logits, labels, ignore_index) -> tuple[int, int]:
    check_tensor(op, "logits", logits, dtypes=FLOAT_DTYPES, ndim=2)
    T, V = logits.shape
    if V < 1:
        raise ValueError(f"{op}: logits has an empty vocabulary dimension "
                         f"(shape {tuple(logits.shape)})")
    check_tensor(op, "labels", labels, dtypes=INDEX_DTYPES, shape=(T,))
    check_same_device(op, logits=logits, labels=labels)
    check_ignore_index(op, ignore_index)
    check_labels_in_range(op, labels, V, ignore_index)
    return T, V


def _lse_rows_unchecked(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                        block_v=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cross_entropy_rows without argument checks (callers have validated)."""
    T, V = logits.shape
    lse = new_output((T,), torch.float32, logits.device)
    target = new_output((T,), torch.float32, logits.device)
    if T > 0:
        BLOCK_V = _pick_block_v(_OP, V, block_v)
        BLOCK_T = _pick_block_t(T, BLOCK_V)
        record_launch("_lse_rows_kernel")
        _lse_rows_kernel[(triton.cdiv(T, BLOCK_T),)](logits, labels, lse, target, T, V, ignore_index,
                                                     BLOCK_T=BLOCK_T, BLOCK_V=BLOCK_V,
                                                     num_warps=_NUM_WARPS)
    return lse, target


def _softmax_grad_rows_unchecked(logits, labels, lse, row_scale, ignore_index, out,
                                 block_v=None) -> torch.Tensor:
    """softmax_grad_rows without argument checks (callers have validated)."""
    T, V = logits.shape
    if out is None:
        out = new_output((T, V), logits.dtype, logits.device)
    if T > 0:
        BLOCK_V = _pick_block_v(_OP, V, block_v)
        BLOCK_T = _pick_block_t(T, BLOCK_V)
        record_launch("_softmax_grad_rows_kernel")
        _softmax_grad_rows_kernel[(triton.cdiv(T, BLOCK_T),)](
            logits, out, labels, lse, row_scale, T, V, ignore_index,
            BLOCK_T=BLOCK_T, BLOCK_V=BLOCK_V, num_warps=_NUM_WARPS)
    return out


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                       *, block_v=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row logsumexp and target logit of logits [T, V] (see module docstring).

    block_v (a power of two >= 16) overrides the vocabulary tile; tests use a
    small one to make the online logsumexp run over many tiles.
    """
    op = "cross_entropy_rows"
    _check_logits_and_labels(op, logits, labels, ignore_index)
    _pick_block_v(op, logits.shape[1], block_v)
    return _lse_rows_unchecked(logits, labels, ignore_index, block_v)


def softmax_grad_rows(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                      row_scale: torch.Tensor, ignore_index: int = -100, *,
                      out=None, block_v=None) -> torch.Tensor:
    """(softmax(logits) - onehot(labels)) * row_scale[:, None], 0 at ignored rows.

    lse and row_scale are fp32 [T]; out (optional) is a contiguous float [T, V]
    tensor on the same device, possibly logits itself.
    """
    op = "softmax_grad_rows"
    T, V = _check_logits_and_labels(op, logits, labels, ignore_index)
    check_tensor(op, "lse", lse, dtypes=(torch.float32,), shape=(T,))
    check_tensor(op, "row_scale", row_scale, dtypes=(torch.float32,), shape=(T,))
    if out is not None:
        check_tensor(op, "out", out, dtypes=FLOAT_DTYPES, shape=(T, V))
    check_same_device(op, logits=logits, lse=lse, row_scale=row_scale, out=out)
    _pick_block_v(op, V, block_v)
    return _softmax_grad_rows_unchecked(logits, labels, lse, row_scale, ignore_index, out,
                                        block_v)


def softmax_grad_rows_(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                       row_scale: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """In-place softmax_grad_rows: the logits become the gradient rows."""
    return softmax_grad_rows(logits, labels, lse, row_scale, ignore_index, out=logits)


def loss_sum_and_count(lse: torch.Tensor, target: torch.Tensor, labels: torch.Tensor,
                       ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sum over non-ignored rows of (lse - target) in fp32, and their count (int64)."""
    valid = labels != ignore_index
    per_row = torch.where(valid, lse - target, torch.zeros_like(lse))
    return per_row.sum(), valid.sum()


# ----------------------------------------------------------------------------
# autograd


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        lse, target = _lse_rows_unchecked(logits, labels, ignore_index)
        loss_sum, n_tokens = loss_sum_and_count(lse, target, labels, ignore_index)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(n_tokens)
        return loss_sum, n_tokens

    @staticmethod
    def backward(ctx, grad_loss_sum, _grad_n_tokens):
        logits, labels, lse = ctx.saved_tensors
        if grad_loss_sum is None or not ctx.needs_input_grad[0]:
            return None, None, None
        row_scale = grad_loss_sum.to(torch.float32).expand(logits.shape[0]).contiguous()
        grad = _softmax_grad_rows_unchecked(logits, labels, lse, row_scale,
                                            ctx.ignore_index, out=None)
        return grad, None, None


def cross_entropy_op(logits: torch.Tensor, labels: torch.Tensor,
                  ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum fp32 0-dim, n_tokens int64 0-dim) of logits [T, V] against labels [T].

    loss_sum = sum over rows with labels != ignore_index of -log softmax(logits_t)[labels_t];
    differentiable with respect to logits (the gradient has logits' dtype).
    """
    _check_logits_and_labels(_OP, logits, labels, ignore_index)
    return _CrossEntropyFunction.apply(logits, labels, ignore_index)


# Triton only: the model's losses run through linear_loss, whose mirror covers them.
RECORD = OpRecord(
    "cross_entropy", (cross_entropy_rows, softmax_grad_rows), reference="tests.reference.losses",
    bench="bench.ops_loss:cross_entropy_bench", compile_specs="tests.sm90_compile:cross_entropy_specs")
