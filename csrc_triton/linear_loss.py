"""The lm-head projection fused with its loss, never materializing [T x V] logits.

For hidden h [T, H], lm-head weight W [V, H] and labels y [T]:
  logits_t = h_t W^T                                    (fp32, one token chunk at a time)
  logp_t   = logits_{t,y_t} - logsumexp(logits_t)       (0 where y_t == ignore_index)
  loss_sum = -sum_t logp_t,  n_tokens = #{t : y_t != ignore_index}

Tokens are cut into chunks whose fp32 logits fit in ``chunk_bytes``. For each
chunk: logits = h_c @ W^T (torch.mm: cuBLAS on the GPU, fp32 output), the
Triton row kernels of cross_entropy.py give logsumexp and target logit, and the
gradient rows dlogits = (softmax - onehot) * scale are written over the fp32
logits (fp32 weights) or into one reused [chunk x V] buffer of W's dtype
(fp16/bf16 weights, so the two backward products run on the tensor cores);
then dh_c = dlogits @ W and dW += dlogits^T @ h_c. Ignored tokens are dropped
before the projection (they cost no matmul) and get a zero gradient.

Public (autograd Functions):
  fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100,
                             chunk_bytes=DEFAULT_CHUNK_BYTES) -> (loss_sum, n_tokens)
      loss_sum fp32 0-dim, n_tokens int64 0-dim. Gradient for hidden, and for
      weight only when weight.requires_grad (the QLoRA lm_head is frozen).
      The gradients are computed during the forward (one pass over the chunks)
      and scaled by the upstream gradient in backward.
  token_logprobs(hidden, weight, labels, ignore_index=-100,
                 chunk_bytes=DEFAULT_CHUNK_BYTES) -> logp fp32 [T]
      log softmax(h W^T)[label], exactly 0 at ignored positions; backward for
      any per-token upstream gradient recomputes each chunk's logits.
Low level (the model's hand-written backward):
  linear_cross_entropy_forward(hidden, weight, labels, ignore_index=-100,
      chunk_bytes=DEFAULT_CHUNK_BYTES) -> (loss_sum, n_tokens)      evaluation, no gradients
  linear_cross_entropy_forward_backward(hidden, weight, labels, grad_scale,
      ignore_index=-100, weight_grad=False, chunk_bytes=DEFAULT_CHUNK_BYTES)
      -> (loss_sum, n_tokens, dhidden, dweight or None)
      gradients of grad_scale * loss_sum, computed in the same pass as the loss.
  token_logprobs_forward(hidden, weight, labels, ignore_index=-100,
      chunk_bytes=DEFAULT_CHUNK_BYTES) -> (logp fp32 [T], lse fp32 [T]; 0 at ignored rows)
  token_logprobs_backward(dlogp, hidden, weight, labels, lse, ignore_index=-100,
      weight_grad=False, chunk_bytes=DEFAULT_CHUNK_BYTES) -> (dhidden, dweight or None)
      dh_t = dlogp_t * (onehot(y_t) - softmax_t) @ W.
  Each also takes num_targets=None: the number of labels that are not ignore_index,
  counted (and the labels checked) on the host by a caller that knows them; with it
  the launcher reads nothing back from the device (target_rows).

dtypes: hidden and weight share one of fp32 / fp16 / bf16. loss and logp are
fp32; dhidden has hidden's dtype; the low-level dweight is fp32 (accumulated
over chunks in fp32), the autograd Functions hand it back in weight's dtype.

Half-precision gradient rows: dlogits is rounded to W's dtype for the matmuls.
So that fp16 cannot overflow or flush small probabilities to zero, each
chunk's row scales are multiplied by a power of two that brings the largest to
[2^14, 2^15) (|dlogits| <= 2^15 < 65504), and the fp32 matmul results are
multiplied back by its inverse.
"""
from __future__ import annotations

import torch

from .checks import FLOAT_DTYPES, INDEX_DTYPES, check_same_device, check_tensor
from ._runtime import MAX_INT32_NUMEL, new_output
from .cross_entropy import (_lse_rows_unchecked, _softmax_grad_rows_unchecked,
                            check_ignore_index, check_labels_in_range)
from .linear_loss_matmul import mm_fp32 as _mm_fp32   # fp32 results (see its docstring)
from .records import OpRecord

# 256 MiB of fp32 logits per chunk: 523 tokens at V = 128,256, enough rows for
# the projection GEMM to run near peak while staying small next to an 8B model.
DEFAULT_CHUNK_BYTES = 256 * 2**20

# Largest power of two a half-precision gradient row scale is brought up to.
_HALF_HEADROOM_EXPONENT = 15


def _half_headroom(row_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down): powers of two with max|row_scale * up| in [2^14, 2^15) and
    down = 1 / up, as fp32 0-dim device tensors (no host synchronization)."""
    _, exponent = torch.frexp(row_scale.abs().amax())
    shift = (_HALF_HEADROOM_EXPONENT - exponent).clamp(-126, 126)  # stay a finite fp32
    one = torch.ones((), dtype=torch.float32, device=row_scale.device)
    return torch.ldexp(one, shift), torch.ldexp(one, -shift)


# ----------------------------------------------------------------------------
# argument checks


def check_loss_args(op, hidden, weight, labels, ignore_index, chunk_bytes,
                  num_targets=None) -> tuple[int, int, int]:
    # [T, H] itself only meets torch.mm (64-bit); the kernels see [chunk, V] logits
    check_tensor(op, "hidden", hidden, dtypes=FLOAT_DTYPES, ndim=2, max_numel=None)
    T, H = hidden.shape
    check_tensor(op, "weight", weight, dtypes=(hidden.dtype,), ndim=2)
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)}; expected (V, {H}) "
                         f"to match hidden's last dimension {H}")
    if V < 1:
        raise ValueError(f"{op}: weight has an empty vocabulary dimension")
    check_tensor(op, "labels", labels, dtypes=INDEX_DTYPES, shape=(T,))
    check_same_device(op, hidden=hidden, weight=weight, labels=labels)
    check_ignore_index(op, ignore_index)
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"{op}: chunk_bytes must be a positive int, got {chunk_bytes!r}")
    if num_targets is None:
        check_labels_in_range(op, labels, V, ignore_index)      # one device read
    elif isinstance(num_targets, bool) or not isinstance(num_targets, int) or not 0 <= num_targets <= T:
        raise ValueError(f"{op}: num_targets must be an int in [0, {T}], got {num_targets!r}")
    return T, H, V


def target_rows(labels: torch.Tensor, ignore_index: int, num_targets=None) -> torch.Tensor:
    """int64 [N]: the indices of the labels that are not ignore_index, in order.

    Without ``num_targets`` that is a nonzero, whose size the host must wait for
    (a device sync). A caller that counted the targets on the host (and checked
    that each lies in the vocabulary: the model's batch_facts) passes the count:
    a stable sort of the ignored flags puts the kept indices first, in order, and
    the first num_targets of them are taken without the host waiting. A count
    that does not match the labels fails a device-side assertion."""
    kept = labels != ignore_index
    if num_targets is None:
        return torch.nonzero(kept).squeeze(1)
    torch._assert_async(kept.sum() == num_targets,
                        "linear_loss: num_targets does not match the labels that are not ignore_index")
    return torch.sort((~kept).to(torch.uint8), stable=True).indices[:num_targets]


def check_scalar(op, name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{op}: {name} must be a Python float, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: {name} must be finite, got {value!r}")
    return float(value)


def chunk_rows(V: int, chunk_bytes: int) -> int:
    """Tokens per chunk: fp32 logits under chunk_bytes, at least 1, and a
    multiple of 16 (tensor-core friendly) when there is room for 16."""
    rows = max(1, chunk_bytes // (4 * V))
    rows = min(rows, MAX_INT32_NUMEL // V)
    return rows - rows % 16 if rows >= 16 else rows


# ----------------------------------------------------------------------------
# the chunk loop


def _gradient_rows_into(logits, labels_c, lse_c, row_scale_c, ignore_index, half_buffer):
    """Gradient rows (softmax - onehot) * row_scale of one chunk.

    Returns (dlogits, down): dlogits overwrites the fp32 logits when there is no
    half_buffer (down is None); otherwise it is written, scaled up by a power of
    two, into the first rows of half_buffer, and down undoes that scale.
    """
    if half_buffer is None:
        return _softmax_grad_rows_unchecked(logits, labels_c, lse_c, row_scale_c,
                                            ignore_index, out=logits), None
    up, down = _half_headroom(row_scale_c)
    dlogits = half_buffer[: logits.shape[0]]
    _softmax_grad_rows_unchecked(logits, labels_c, lse_c, row_scale_c * up, ignore_index,
                                 out=dlogits)
    return dlogits, down


def _accumulate_grads(dlogits, down, weight, h_c, rows_c, dhidden, dweight):
    """dhidden[rows_c] = dlogits @ W and dweight += dlogits^T @ h_c (fp32 products)."""
    if dhidden is not None:
        dh_c = _mm_fp32(dlogits, weight)
        if down is not None:
            dh_c.mul_(down)
        dhidden.index_copy_(0, rows_c, dh_c.to(dhidden.dtype))
    if dweight is not None:
        dw_c = _mm_fp32(dlogits.t(), h_c)
        if down is not None:
            dw_c.mul_(down)
        dweight.add_(dw_c)


def _chunked_pass(hidden, weight, labels, ignore_index, chunk_bytes, *, row_scale=None,
                  saved_lse=None, hidden_grad=False, weight_grad=False, num_targets=None):
    """One pass over the non-ignored tokens, chunk by chunk.

    Returns (rows, lse, target, dhidden, dweight). rows int64 [N] are the
    non-ignored token indices, lse and target fp32 [N] belong to them (target
    is None when saved_lse is given: token_logprobs' backward reuses the
    forward's lse). When row_scale (fp32 [T]) is given, the gradients of
    sum_t row_scale_t * (lse_t - target_t) are accumulated into dhidden [T, H]
    (hidden's dtype, 0 at ignored rows) and dweight fp32 [V, H]; each is None
    when not asked for. ``num_targets``: see target_rows.
    """
    T, H = hidden.shape
    V = weight.shape[0]
    rows = target_rows(labels, ignore_index, num_targets)
    n = rows.numel()
    want_grads = row_scale is not None and (hidden_grad or weight_grad)
    dhidden = torch.zeros_like(hidden) if want_grads and hidden_grad else None
    dweight = (torch.zeros((V, H), dtype=torch.float32, device=hidden.device)
               if want_grads and weight_grad else None)
    if saved_lse is not None:
        lse, target = saved_lse[rows], None
    else:
        lse = new_output((n,), torch.float32, hidden.device)
        target = new_output((n,), torch.float32, hidden.device)

    chunk = chunk_rows(V, chunk_bytes)
    half_buffer = None
    if want_grads and weight.dtype != torch.float32 and n > 0:
        half_buffer = new_output((min(chunk, n), V), weight.dtype, hidden.device)
    weight_t = weight.t()
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows_c = rows[start:stop]
        h_c = hidden.index_select(0, rows_c)
        labels_c = labels.index_select(0, rows_c)
        logits = _mm_fp32(h_c, weight_t).contiguous()             # fp32 [c, V]
        if saved_lse is None:
            lse_c, target_c = _lse_rows_unchecked(logits, labels_c, ignore_index)
            lse[start:stop] = lse_c
            target[start:stop] = target_c
        else:
            lse_c = lse[start:stop]
        if want_grads:
            dlogits, down = _gradient_rows_into(logits, labels_c, lse_c, row_scale[rows_c],
                                                ignore_index, half_buffer)
            _accumulate_grads(dlogits, down, weight, h_c, rows_c, dhidden, dweight)
        del logits
    return rows, lse, target, dhidden, dweight


# ----------------------------------------------------------------------------
# low-level entry points


def linear_cross_entropy_forward_backward(hidden: torch.Tensor, weight: torch.Tensor,
                                          labels: torch.Tensor, grad_scale: float,
                                          ignore_index: int = -100, weight_grad: bool = False,
                                          chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                                          num_targets=None):
    """(loss_sum fp32 0-dim, n_tokens int64 0-dim, dhidden [T, H] in hidden's
    dtype, dweight fp32 [V, H] or None): loss and the gradients of
    grad_scale * loss_sum, in one pass over the token chunks. ``num_targets``
    (counted and checked on the host, see target_rows): no device reads."""
    op = "linear_cross_entropy_forward_backward"
    T, _, _ = check_loss_args(op, hidden, weight, labels, ignore_index, chunk_bytes, num_targets)
    grad_scale = check_scalar(op, "grad_scale", grad_scale)
    return _fused_unchecked(hidden, weight, labels, ignore_index, chunk_bytes,
                            grad_scale=grad_scale, hidden_grad=True, weight_grad=bool(weight_grad),
                            num_targets=num_targets)


def linear_cross_entropy_forward(hidden: torch.Tensor, weight: torch.Tensor,
                                 labels: torch.Tensor, ignore_index: int = -100,
                                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, num_targets=None):
    """(loss_sum fp32 0-dim, n_tokens int64 0-dim) alone, for evaluation: no
    gradient rows and none of the two backward matmuls per chunk."""
    check_loss_args("linear_cross_entropy_forward", hidden, weight, labels, ignore_index,
                  chunk_bytes, num_targets)
    loss_sum, n_tokens, _, _ = _fused_unchecked(hidden, weight, labels, ignore_index,
                                                chunk_bytes, grad_scale=None, hidden_grad=False,
                                                weight_grad=False, num_targets=num_targets)
    return loss_sum, n_tokens


def _fused_unchecked(hidden, weight, labels, ignore_index, chunk_bytes, *, grad_scale,
                     hidden_grad, weight_grad, num_targets=None):
    T = hidden.shape[0]
    row_scale = None
    if grad_scale is not None:
        row_scale = torch.full((T,), grad_scale, dtype=torch.float32, device=hidden.device)
    rows, lse, target, dhidden, dweight = _chunked_pass(
        hidden, weight, labels, ignore_index, chunk_bytes, row_scale=row_scale,
        hidden_grad=hidden_grad, weight_grad=weight_grad, num_targets=num_targets)
    loss_sum = (lse - target).sum()
    n_tokens = torch.tensor(rows.numel(), dtype=torch.int64, device=hidden.device)
    return loss_sum, n_tokens, dhidden, dweight


def token_logprobs_forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           ignore_index: int = -100, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                           num_targets=None):
    """(logp fp32 [T], lse fp32 [T]): log softmax(h W^T)[label] and the row
    logsumexp, both exactly 0 at ignored positions (their lse is not computed)."""
    check_loss_args("token_logprobs_forward", hidden, weight, labels, ignore_index, chunk_bytes,
                  num_targets)
    return _token_logprobs_forward_unchecked(hidden, weight, labels, ignore_index, chunk_bytes,
                                             num_targets)


def _token_logprobs_forward_unchecked(hidden, weight, labels, ignore_index, chunk_bytes,
                                      num_targets=None):
    rows, lse_rows, target_logits, _, _ = _chunked_pass(hidden, weight, labels, ignore_index,
                                                        chunk_bytes, num_targets=num_targets)
    return scatter_token_logprobs(hidden.shape[0], rows, lse_rows, target_logits)


def scatter_token_logprobs(n_tokens: int, rows, lse_rows, target_rows):
    """(logp, lse) fp32 [n_tokens] from the per-row results of the kept ``rows``
    (logp = target logit - lse), exactly 0 at every other (ignored) position."""
    logp = torch.zeros((n_tokens,), dtype=torch.float32, device=lse_rows.device)
    lse = torch.zeros((n_tokens,), dtype=torch.float32, device=lse_rows.device)
    logp.index_copy_(0, rows, target_rows - lse_rows)
    lse.index_copy_(0, rows, lse_rows)
    return logp, lse


def check_token_logprobs_backward_args(dlogp, hidden, weight, labels, lse, ignore_index,
                                       chunk_bytes, num_targets=None) -> None:
    """The checks of token_logprobs_backward (shared with csrc_torch's)."""
    op = "token_logprobs_backward"
    T, _, _ = check_loss_args(op, hidden, weight, labels, ignore_index, chunk_bytes, num_targets)
    check_tensor(op, "dlogp", dlogp, dtypes=(torch.float32,), shape=(T,))
    check_tensor(op, "lse", lse, dtypes=(torch.float32,), shape=(T,))
    check_same_device(op, dlogp=dlogp, lse=lse, hidden=hidden)


def token_logprobs_backward(dlogp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                            labels: torch.Tensor, lse: torch.Tensor, ignore_index: int = -100,
                            weight_grad: bool = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                            num_targets=None):
    """(dhidden [T, H] in hidden's dtype, dweight fp32 [V, H] or None) for the
    upstream gradient dlogp fp32 [T] of token_logprobs; lse is the forward's.

    d logp_t / d logits_tv = [v == y_t] - softmax_tv, so the gradient rows are
    the cross-entropy rows with row scale -dlogp_t (ignored rows: 0)."""
    check_token_logprobs_backward_args(dlogp, hidden, weight, labels, lse, ignore_index,
                                       chunk_bytes, num_targets)
    return _token_logprobs_backward_unchecked(dlogp, hidden, weight, labels, lse, ignore_index,
                                              True, bool(weight_grad), chunk_bytes, num_targets)


def _token_logprobs_backward_unchecked(dlogp, hidden, weight, labels, lse, ignore_index,
                                       hidden_grad, weight_grad, chunk_bytes, num_targets=None):
    _, _, _, dhidden, dweight = _chunked_pass(
        hidden, weight, labels, ignore_index, chunk_bytes, row_scale=-dlogp, saved_lse=lse,
        hidden_grad=hidden_grad, weight_grad=weight_grad, num_targets=num_targets)
    return dhidden, dweight


# ----------------------------------------------------------------------------
# autograd


class _FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_bytes):
        hidden_grad, weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss_sum, n_tokens, dhidden, dweight = _fused_unchecked(
            hidden, weight, labels, ignore_index, chunk_bytes,
            grad_scale=1.0 if (hidden_grad or weight_grad) else None,
            hidden_grad=hidden_grad, weight_grad=weight_grad)
        ctx.save_for_backward(dhidden, dweight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(n_tokens)
        return loss_sum, n_tokens

    @staticmethod
    def backward(ctx, grad_loss_sum, _grad_n_tokens):
        dhidden, dweight = ctx.saved_tensors
        g = grad_loss_sum.to(torch.float32)
        dh = None if dhidden is None else (dhidden.float() * g).to(dhidden.dtype)
        dw = None if dweight is None else (dweight * g).to(ctx.weight_dtype)
        return dh, dw, None, None, None


class _TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_bytes):
        logp, lse = _token_logprobs_forward_unchecked(hidden, weight, labels, ignore_index,
                                                      chunk_bytes)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.chunk_bytes = ignore_index, chunk_bytes
        return logp

    @staticmethod
    def backward(ctx, dlogp):
        hidden, weight, labels, lse = ctx.saved_tensors
        hidden_grad, weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dhidden, dweight = _token_logprobs_backward_unchecked(
            dlogp.to(torch.float32).contiguous(), hidden, weight, labels, lse,
            ctx.ignore_index, hidden_grad, weight_grad, ctx.chunk_bytes)
        dw = None if dweight is None else dweight.to(weight.dtype)
        return dhidden, dw, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = -100,
                               chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """(loss_sum fp32 0-dim, n_tokens int64 0-dim) of softmax cross-entropy of
    hidden [T, H] @ weight[V, H]^T against labels [T], without [T x V] logits."""
    check_loss_args("fused_linear_cross_entropy", hidden, weight, labels, ignore_index, chunk_bytes)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        # No graph will be built (e.g. evaluation under torch.no_grad, where the
        # Function would still see needs_input_grad): compute the loss only.
        loss_sum, n_tokens, _, _ = _fused_unchecked(hidden, weight, labels, ignore_index,
                                                    chunk_bytes, grad_scale=None,
                                                    hidden_grad=False, weight_grad=False)
        return loss_sum, n_tokens
    return _FusedLinearCrossEntropyFunction.apply(hidden, weight, labels, ignore_index,
                                                  chunk_bytes)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = -100, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """log softmax(hidden @ weight^T)[labels] as fp32 [T], exactly 0 at ignored
    positions; differentiable in hidden (and weight when it requires grad)."""
    check_loss_args("token_logprobs", hidden, weight, labels, ignore_index, chunk_bytes)
    return _TokenLogprobsFunction.apply(hidden, weight, labels, ignore_index, chunk_bytes)


RECORD = OpRecord(
    "linear_loss", (linear_cross_entropy_forward, linear_cross_entropy_forward_backward,
                    token_logprobs_forward, token_logprobs_backward),
    torch_mirror="csrc_torch.linear_loss", reference="tests.reference.losses",
    parity="tests.test_torch_backend:linear_loss_parity", bench="bench.ops_loss:linear_loss_bench")
