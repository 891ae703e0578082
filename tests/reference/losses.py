"""Float64 references for the loss ops: cross-entropy from logits, and the
lm-head projection followed by per-token log-probabilities / cross-entropy.

Written with torch.log_softmax on float64 tensors, so torch.autograd.grad of
these functions is the oracle for every backward.
"""
from __future__ import annotations

import torch


def reference_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """Row logsumexp of float64 logits [T, V]."""
    return torch.logsumexp(logits.to(torch.float64), dim=-1)


def reference_token_logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor,
                                         ignore_index: int = -100) -> torch.Tensor:
    """log softmax(logits_t)[labels_t] in float64, exactly 0 where labels_t == ignore_index."""
    logp_all = torch.log_softmax(logits.to(torch.float64), dim=-1)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    picked = logp_all.gather(1, safe_labels[:, None])[:, 0]
    return torch.where(valid, picked, torch.zeros_like(picked))


def reference_target_logit(logits: torch.Tensor, labels: torch.Tensor,
                           ignore_index: int = -100) -> torch.Tensor:
    """logits_t[labels_t] in float64, 0 at ignored rows."""
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    picked = logits.to(torch.float64).gather(1, safe_labels[:, None])[:, 0]
    return torch.where(valid, picked, torch.zeros_like(picked))


def reference_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                            ignore_index: int = -100) -> tuple[torch.Tensor, int]:
    """(loss_sum float64 0-dim, n_tokens int): summed -log p(label) over non-ignored rows."""
    logp = reference_token_logprobs_from_logits(logits, labels, ignore_index)
    return -logp.sum(), int((labels != ignore_index).sum())


def reference_softmax_grad_rows(logits: torch.Tensor, labels: torch.Tensor,
                                row_scale: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(softmax(logits_t) - onehot(labels_t)) * row_scale_t in float64, 0 at ignored rows,
    obtained by autograd of sum_t row_scale_t * (-log p_t)."""
    x = logits.detach().to(torch.float64).requires_grad_(True)
    logp = reference_token_logprobs_from_logits(x, labels, ignore_index)
    (grad,) = torch.autograd.grad(-(logp * row_scale.to(torch.float64)).sum(), x)
    return grad


def reference_linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor,
                                    labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """log softmax(hidden @ weight^T)[labels] in float64, 0 at ignored positions."""
    logits = hidden.to(torch.float64) @ weight.to(torch.float64).t()
    return reference_token_logprobs_from_logits(logits, labels, ignore_index)


def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                   labels: torch.Tensor,
                                   ignore_index: int = -100) -> tuple[torch.Tensor, int]:
    """(loss_sum float64 0-dim, n_tokens int) of cross-entropy of hidden @ weight^T."""
    logp = reference_linear_token_logprobs(hidden, weight, labels, ignore_index)
    return -logp.sum(), int((labels != ignore_index).sum())
