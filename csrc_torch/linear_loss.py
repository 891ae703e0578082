"""The lm-head projection fused with its loss, in torch, chunk by chunk over tokens.

Same launchers, checks and return conventions as csrc_triton.linear_loss (see its
docstring): for each chunk of non-ignored tokens, logits = h_c W^T in fp32,
lse = logsumexp(logits), target = logits[label]; gradient rows
(softmax - onehot) * row_scale stay in fp32 (no half-precision rounding of the
rows, unlike the GPU path), dh_c = dlogits W and dW += dlogits^T h_c in fp32.
"""
from __future__ import annotations

import torch

from csrc_triton._runtime import new_output
from csrc_triton.linear_loss import (DEFAULT_CHUNK_BYTES, check_loss_args, check_scalar, chunk_rows,
                                     check_token_logprobs_backward_args, scatter_token_logprobs,
                                     target_rows)


def _chunked_pass(hidden, weight, labels, ignore_index, chunk_bytes, *, row_scale=None,
                  saved_lse=None, weight_grad=False, num_targets=None):
    """(rows, lse, target, dhidden, dweight) over the non-ignored rows; gradients of
    sum_t row_scale_t * (lse_t - target_t) when row_scale is given (target is None
    when saved_lse is given). ``num_targets``: see csrc_triton.linear_loss.target_rows."""
    T, H = hidden.shape
    V = weight.shape[0]
    rows = target_rows(labels, ignore_index, num_targets)
    n = rows.numel()
    w32 = weight.float()
    dhidden = torch.zeros_like(hidden) if row_scale is not None else None
    dweight = (torch.zeros((V, H), dtype=torch.float32, device=hidden.device)
               if row_scale is not None and weight_grad else None)
    lse = new_output((n,), torch.float32, hidden.device)
    target = None if saved_lse is not None else new_output((n,), torch.float32, hidden.device)
    chunk = chunk_rows(V, chunk_bytes)
    for start in range(0, n, chunk):
        rows_c = rows[start:start + chunk]
        h_c = hidden.index_select(0, rows_c).float()
        labels_c = labels.index_select(0, rows_c).long()
        logits = h_c @ w32.t()
        if saved_lse is None:
            lse_c = torch.logsumexp(logits, dim=1)
            target[start:start + chunk] = logits.gather(1, labels_c[:, None]).squeeze(1)
        else:
            lse_c = saved_lse.index_select(0, rows_c)
        lse[start:start + chunk] = lse_c
        if row_scale is not None:
            dlogits = logits.sub_(lse_c[:, None]).exp_()                      # softmax
            dlogits.scatter_add_(1, labels_c[:, None],
                                 -torch.ones_like(lse_c)[:, None])            # - onehot
            dlogits.mul_(row_scale.index_select(0, rows_c)[:, None])
            dhidden.index_copy_(0, rows_c, (dlogits @ w32).to(hidden.dtype))
            if dweight is not None:
                dweight.add_(dlogits.t() @ h_c)
        del logits
    return rows, lse, target, dhidden, dweight


def _loss_and_count(rows, lse, target, hidden):
    n_tokens = torch.tensor(rows.numel(), dtype=torch.int64, device=hidden.device)
    return (lse - target).sum(), n_tokens


def linear_cross_entropy_forward_backward(hidden: torch.Tensor, weight: torch.Tensor,
                                          labels: torch.Tensor, grad_scale: float,
                                          ignore_index: int = -100, weight_grad: bool = False,
                                          chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                                          num_targets=None):
    """(loss_sum fp32 0-dim, n_tokens int64 0-dim, dhidden in hidden's dtype, dweight
    fp32 or None): the loss and the gradients of grad_scale * loss_sum."""
    op = "linear_cross_entropy_forward_backward"
    T, _, _ = check_loss_args(op, hidden, weight, labels, ignore_index, chunk_bytes, num_targets)
    grad_scale = check_scalar(op, "grad_scale", grad_scale)
    row_scale = torch.full((T,), grad_scale, dtype=torch.float32, device=hidden.device)
    rows, lse, target, dhidden, dweight = _chunked_pass(
        hidden, weight, labels, ignore_index, chunk_bytes, row_scale=row_scale,
        weight_grad=bool(weight_grad), num_targets=num_targets)
    loss_sum, n_tokens = _loss_and_count(rows, lse, target, hidden)
    return loss_sum, n_tokens, dhidden, dweight


def linear_cross_entropy_forward(hidden: torch.Tensor, weight: torch.Tensor,
                                 labels: torch.Tensor, ignore_index: int = -100,
                                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, num_targets=None):
    """(loss_sum fp32 0-dim, n_tokens int64 0-dim), no gradients."""
    check_loss_args("linear_cross_entropy_forward", hidden, weight, labels, ignore_index,
                  chunk_bytes, num_targets)
    rows, lse, target, _, _ = _chunked_pass(hidden, weight, labels, ignore_index, chunk_bytes,
                                            num_targets=num_targets)
    return _loss_and_count(rows, lse, target, hidden)


def token_logprobs_forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           ignore_index: int = -100, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                           num_targets=None):
    """(logp fp32 [T], lse fp32 [T]), both exactly 0 at ignored positions."""
    check_loss_args("token_logprobs_forward", hidden, weight, labels, ignore_index, chunk_bytes,
                  num_targets)
    rows, lse_rows, target_logits, _, _ = _chunked_pass(hidden, weight, labels, ignore_index,
                                                        chunk_bytes, num_targets=num_targets)
    return scatter_token_logprobs(hidden.shape[0], rows, lse_rows, target_logits)


def token_logprobs_backward(dlogp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                            labels: torch.Tensor, lse: torch.Tensor, ignore_index: int = -100,
                            weight_grad: bool = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                            num_targets=None):
    """(dhidden in hidden's dtype, dweight fp32 or None) for the upstream dlogp fp32 [T];
    the gradient rows are the cross-entropy rows with row scale -dlogp."""
    check_token_logprobs_backward_args(dlogp, hidden, weight, labels, lse, ignore_index,
                                       chunk_bytes, num_targets)
    _, _, _, dhidden, dweight = _chunked_pass(hidden, weight, labels, ignore_index, chunk_bytes,
                                              row_scale=-dlogp, saved_lse=lse,
                                              weight_grad=bool(weight_grad),
                                              num_targets=num_targets)
    return dhidden, dweight
