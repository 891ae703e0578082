"""fused_linear_cross_entropy and token_logprobs against the float64 reference.

Tolerances come from an error model evaluated on the reference data:
  logit_bound  fp32 dot products of length H: |error| <= H u sum_h |h_th||W_vh| (any order)
  rel_p        error of x_tv - lse_t, i.e. relative error of p_tv = exp(x_tv - lse_t):
               2 logit_bound (x and lse each move by <= logit_bound) + the kernel's own
               fp32 rounding (lse_tolerance and the subtraction, see test_cross_entropy)
  dh_scale     D = max_t,h |g_t| sum_v (p_tv + onehot_tv) |W_vh| >= sum_v |g_t dlogits_tv W_vh|
  dw_scale     B = max_v,h sum_t |g_t| (p_tv + onehot_tv) |h_th|
  dh error <= D (rel_p + u_d + 16 u sqrt(V)) + u_out |dh|, dW likewise with B and T, where
  u_d is the roundoff of the dlogits rows (W's dtype; 0 in fp32), u_out that of the
  returned gradient, and 16 u sqrt(n) covers fp32 sums of n terms (probabilistic bound).

Near 1.0 of the bound ("tolerance used" up to 0.98, on dhidden_small_scale): there dh
is ~1e-7, in fp16's subnormal range, where rounding errs by up to half the subnormal
spacing (2^-25) absolutely; the check allows exactly that (plus the fp32 terms), so a
correct kernel may use nearly all of it and cannot exceed it by chance.
"""
from __future__ import annotations

import math

import pytest
import torch

from csrc_triton.linear_loss import (fused_linear_cross_entropy, linear_cross_entropy_forward,
                                     linear_cross_entropy_forward_backward, token_logprobs,
                                     token_logprobs_backward, token_logprobs_forward)
from tests.helpers import assert_close, quantized
from tests.reference.losses import (reference_linear_cross_entropy,
                                    reference_linear_token_logprobs)
from tests.test_cross_entropy import FP32_U, output_roundoff, random_labels

# a kernel against its float64 reference: also run under the oldest supported triton
# (tests/test_supported_tritons.py)
pytestmark = pytest.mark.kernels

OP_CE = "fused_linear_cross_entropy"
OP_LOGP = "token_logprobs"


def make_inputs(T, H, V, dtype, device="cpu"):
    """hidden ~ N(0, 1), weight ~ N(0, 4/H): logits of std ~2, peaked softmax rows."""
    hidden = torch.randn(T, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * (2 / math.sqrt(H))).to(dtype)
    return hidden, weight


class Reference:
    """Float64 oracle on the rounded inputs: logp [T] and the gradients dh [T, H],
    dW [V, H] of sum_t upstream_t * logp_t (torch autograd of the reference), plus
    the error-model scales (module docstring). Rows are processed in chunks so the
    GPU test at LLaMA-3-8B shapes fits in memory."""

    def __init__(self, hidden, weight, labels, upstream, ignore_index=-100,
                 weight_grad=True, rows_per_chunk=None):
        dtype = hidden.dtype
        T, H = hidden.shape
        V = weight.shape[0]
        h64 = quantized(hidden, dtype)
        w64 = quantized(weight, dtype).requires_grad_(weight_grad)
        up64 = upstream.to(torch.float64)
        self.logp = torch.zeros(T, dtype=torch.float64, device=hidden.device)
        self.dh = torch.zeros(T, H, dtype=torch.float64, device=hidden.device)
        self.dw = (torch.zeros(V, H, dtype=torch.float64, device=hidden.device)
                   if weight_grad else None)
        dw_scale_sum = torch.zeros_like(self.dw) if weight_grad else None
        self.magnitude = self.logit_bound = self.dh_scale = 0.0
        abs_w = w64.detach().abs()
        for rows in torch.arange(T, device=hidden.device).split(rows_per_chunk or T):
            h_c = h64[rows].requires_grad_(True)
            labels_c, g_c = labels[rows], up64[rows]
            logp_c = reference_linear_token_logprobs(h_c, w64, labels_c, ignore_index)
            grads = torch.autograd.grad((logp_c * g_c).sum(), (h_c, w64) if weight_grad else (h_c,))
            self.logp[rows] = logp_c.detach()
            self.dh[rows] = grads[0]
            if weight_grad:
                self.dw += grads[1]
            with torch.no_grad():
                logits = h_c @ w64.t()
                lse = torch.logsumexp(logits, dim=1)
                valid = labels_c != ignore_index
                onehot = torch.zeros_like(logits)
                onehot[valid, labels_c[valid].long()] = 1.0
                row_weight = (g_c.abs() * valid)[:, None]
                weight_of_row = (torch.softmax(logits, dim=1) + onehot) * row_weight
                self.magnitude = max(self.magnitude, float(logits.abs().max()),
                                     float(lse.abs().max()))
                self.logit_bound = max(self.logit_bound,
                                       H * FP32_U * float((h_c.abs() @ abs_w.t()).max()))
                self.dh_scale = max(self.dh_scale, float((weight_of_row @ abs_w).max()))
                if weight_grad:
                    dw_scale_sum += weight_of_row.t() @ h_c.abs()
        self.dw_scale = float(dw_scale_sum.max()) if weight_grad else 0.0
        self.T, self.V = T, V

    @property
    def rel_p(self) -> float:
        # 2 logit_bound + lse_tolerance (4 u magnitude + 1e-6) + 4 u magnitude (x - lse)
        return 2 * self.logit_bound + 8 * FP32_U * self.magnitude + 1e-6

    def dh_atol(self, rows_dtype) -> float:
        return self.dh_scale * (self.rel_p + output_roundoff(rows_dtype)
                                + 16 * FP32_U * math.sqrt(self.V))

    def dw_atol(self, rows_dtype) -> float:
        return self.dw_scale * (self.rel_p + output_roundoff(rows_dtype)
                                + 16 * FP32_U * math.sqrt(self.T))

    def loss_atol(self, n_tokens: int, loss: float) -> float:
        # each token's -logp within rel_p, plus fp32 rounding of the sum
        return n_tokens * self.rel_p + 4 * FP32_U * abs(loss)


def check_fused_autograd(hidden, weight, labels, chunk_bytes, weight_grad, ignore_index=-100):
    dtype = hidden.dtype
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(weight_grad)
    loss_sum, n_tokens = fused_linear_cross_entropy(h, w, labels, ignore_index, chunk_bytes)
    upstream = float(torch.empty(()).uniform_(0.5, 2.0))
    loss_sum.backward(torch.tensor(upstream))

    # loss_sum = -sum_t logp_t, so the per-token upstream of logp is -upstream
    ref = Reference(hidden, weight, labels, torch.full((len(labels),), -upstream),
                    ignore_index, weight_grad)
    ref_loss, ref_count = reference_linear_cross_entropy(quantized(hidden, dtype),
                                                         quantized(weight, dtype), labels,
                                                         ignore_index)
    assert loss_sum.dtype == torch.float32 and n_tokens.dtype == torch.int64
    assert int(n_tokens) == ref_count and not n_tokens.requires_grad
    assert_close(OP_CE, "loss_sum", loss_sum, ref_loss,
                 atol=ref.loss_atol(ref_count, float(ref_loss)), rtol=0.0)  # see Reference
    assert h.grad.dtype == dtype
    # dlogits rounded to W's dtype, dh rounded to hidden's dtype (module docstring)
    assert_close(OP_CE, "dhidden", h.grad, ref.dh, atol=ref.dh_atol(dtype),
                 rtol=output_roundoff(dtype))
    assert torch.all(h.grad[labels == ignore_index] == 0)
    if weight_grad:
        assert w.grad.dtype == dtype
        # accumulated in fp32, then rounded once to W's dtype
        assert_close(OP_CE, "dweight", w.grad, ref.dw, atol=ref.dw_atol(dtype),
                     rtol=output_roundoff(dtype))
    else:
        assert w.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_linear_cross_entropy_several_chunks(dtype):
    T, H, V = 37, 45, 1001
    hidden, weight = make_inputs(T, H, V, dtype)
    labels = random_labels(T, V)
    # 8 rows of fp32 logits per chunk: ~28 valid tokens -> 4 chunks, the last one short
    check_fused_autograd(hidden, weight, labels, chunk_bytes=8 * V * 4, weight_grad=True)


def test_fused_linear_cross_entropy_frozen_weight_one_row_chunks():
    T, H, V = 13, 45, 1001
    hidden, weight = make_inputs(T, H, V, torch.float16)
    # chunk_bytes smaller than one row of logits: one token per chunk
    check_fused_autograd(hidden, weight, random_labels(T, V, ignore_index=-1),
                         chunk_bytes=100, weight_grad=False, ignore_index=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_cross_entropy_forward_backward_low_level(dtype):
    T, H, V = 37, 45, 1001
    hidden, weight = make_inputs(T, H, V, dtype)
    labels = random_labels(T, V)
    n_valid = int((labels != -100).sum())
    grad_scale = 1.0 / n_valid
    loss_sum, n_tokens, dh, dw = linear_cross_entropy_forward_backward(
        hidden, weight, labels, grad_scale, weight_grad=True, chunk_bytes=5 * V * 4)
    ref = Reference(hidden, weight, labels, torch.full((T,), -grad_scale))
    ref_loss, _ = reference_linear_cross_entropy(quantized(hidden, dtype),
                                                 quantized(weight, dtype), labels)
    assert int(n_tokens) == n_valid
    assert_close(OP_CE, "loss_sum_low_level", loss_sum, ref_loss,
                 atol=ref.loss_atol(n_valid, float(ref_loss)), rtol=0.0)  # see Reference
    assert dh.dtype == dtype and dw.dtype == torch.float32
    assert_close(OP_CE, "dhidden_low_level", dh, ref.dh, atol=ref.dh_atol(dtype),
                 rtol=output_roundoff(dtype))  # rounded once to hidden's dtype
    assert_close(OP_CE, "dweight_low_level", dw, ref.dw, atol=ref.dw_atol(dtype),
                 rtol=0.0)  # fp32 output: only the dlogits rounding (in dw_atol)

    _, _, dh_only, no_dw = linear_cross_entropy_forward_backward(
        hidden, weight, labels, grad_scale, weight_grad=False, chunk_bytes=5 * V * 4)
    assert no_dw is None
    assert torch.equal(dh_only, dh), "weight_grad must not change dhidden"


def test_fp16_small_grad_scale_does_not_underflow():
    # grad_scale * softmax ~ 1e-9 would flush to 0 in fp16 dlogits; the power-of-two
    # headroom keeps them normal and the result must meet the same relative bounds
    T, H, V = 19, 45, 1001
    hidden, weight = make_inputs(T, H, V, torch.float16)
    labels = random_labels(T, V)
    grad_scale = 2.0**-20
    _, _, dh, dw = linear_cross_entropy_forward_backward(hidden, weight, labels, grad_scale,
                                                         weight_grad=True)
    ref = Reference(hidden, weight, labels, torch.full((T,), -grad_scale))
    # dh values are ~1e-7 here, fp16 subnormals: add half the subnormal spacing (2^-25)
    assert_close(OP_CE, "dhidden_small_scale", dh, ref.dh,
                 atol=ref.dh_atol(torch.float16) + 2.0**-25, rtol=output_roundoff(torch.float16))
    assert_close(OP_CE, "dweight_small_scale", dw, ref.dw, atol=ref.dw_atol(torch.float16),
                 rtol=0.0)  # fp32 output (see Reference)


def test_exact_accumulation_over_uneven_micro_batches():
    T, H, V = 37, 45, 1001
    hidden, weight = make_inputs(T, H, V, torch.float32)
    labels = random_labels(T, V, ignored_fraction=0.4)
    total = int((labels != -100).sum())
    splits = (6, 20, 11)
    loss_acc = torch.zeros(())
    dh_pieces, dw_acc = [], torch.zeros(V, H)
    for h_i, y_i in zip(hidden.split(splits), labels.split(splits)):
        loss_i, n_i, dh_i, dw_i = linear_cross_entropy_forward_backward(
            h_i, weight, y_i, 1.0 / total, weight_grad=True, chunk_bytes=7 * V * 4)
        assert int(n_i) == int((y_i != -100).sum())
        loss_acc += loss_i / total
        dh_pieces.append(dh_i)
        dw_acc += dw_i
    loss_all, n_all, dh_all, dw_all = linear_cross_entropy_forward_backward(
        hidden, weight, labels, 1.0 / total, weight_grad=True, chunk_bytes=7 * V * 4)
    assert int(n_all) == total

    ref = Reference(hidden, weight, labels, torch.full((T,), -1.0 / total))
    ref_loss, _ = reference_linear_cross_entropy(quantized(hidden, torch.float32),
                                                 quantized(weight, torch.float32), labels)
    # the same per-token fp32 losses grouped differently: a few fp32 roundoffs of the mean
    assert_close(OP_CE, "accumulated_mean", loss_acc, loss_all / total, atol=0.0, rtol=8 * FP32_U)
    assert_close(OP_CE, "accumulated_mean", loss_acc, ref_loss / total,
                 atol=ref.loss_atol(total, float(ref_loss)) / total, rtol=0.0)  # see Reference
    dh_acc = torch.cat(dh_pieces)
    for name, value in (("accumulated_dhidden", dh_acc), ("whole_batch_dhidden", dh_all)):
        assert_close(OP_CE, name, value, ref.dh, atol=ref.dh_atol(torch.float32), rtol=0.0)
    for name, value in (("accumulated_dweight", dw_acc), ("whole_batch_dweight", dw_all)):
        assert_close(OP_CE, name, value, ref.dw, atol=ref.dw_atol(torch.float32), rtol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_loss_only_without_autograd(dtype):
    T, H, V = 23, 45, 1001
    hidden, weight = make_inputs(T, H, V, dtype)
    labels = random_labels(T, V)
    with torch.no_grad():  # evaluation: the loss alone, no gradient work
        loss_sum, n_tokens = fused_linear_cross_entropy(hidden.requires_grad_(True), weight,
                                                        labels, chunk_bytes=4 * V * 4)
    assert not loss_sum.requires_grad
    ref = Reference(hidden.detach(), weight, labels, torch.ones(T), weight_grad=False)
    ref_loss, ref_count = reference_linear_cross_entropy(quantized(hidden.detach(), dtype),
                                                         quantized(weight, dtype), labels)
    assert int(n_tokens) == ref_count
    assert_close(OP_CE, "loss_sum_no_grad", loss_sum, ref_loss,
                 atol=ref.loss_atol(ref_count, float(ref_loss)), rtol=0.0)  # see Reference
    low_level_sum, low_level_count = linear_cross_entropy_forward(hidden.detach(), weight, labels,
                                                                  chunk_bytes=7 * V * 4)
    assert int(low_level_count) == ref_count
    assert_close(OP_CE, "loss_sum_forward_only", low_level_sum, ref_loss,
                 atol=ref.loss_atol(ref_count, float(ref_loss)), rtol=0.0)  # see Reference


def test_all_tokens_ignored_gives_zero_everything():
    T, H, V = 6, 45, 1001
    hidden, weight = make_inputs(T, H, V, torch.float32)
    labels = torch.full((T,), -100)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss_sum, n_tokens = fused_linear_cross_entropy(h, w, labels)
    loss_sum.backward()
    assert float(loss_sum.detach()) == 0.0 and int(n_tokens) == 0
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))

    h.grad = w.grad = None
    logp = token_logprobs(h, w, labels)
    (logp * torch.randn(T)).sum().backward()
    assert torch.equal(logp.detach(), torch.zeros(T))
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_logprobs_autograd_several_chunks(dtype):
    T, H, V = 37, 45, 1001
    hidden, weight = make_inputs(T, H, V, dtype)
    labels = random_labels(T, V)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp = token_logprobs(h, w, labels, chunk_bytes=6 * V * 4)
    upstream = torch.randn(T)  # an arbitrary per-token gradient, as DPO produces
    logp.backward(upstream)

    ref = Reference(hidden, weight, labels, upstream)
    ignored = labels == -100
    assert logp.dtype == torch.float32
    assert torch.all(logp.detach()[ignored] == 0), "ignored positions must be exactly 0"
    assert_close(OP_LOGP, "logp", logp, ref.logp, atol=ref.rel_p, rtol=0.0)  # see Reference
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert torch.all(h.grad[ignored] == 0)
    assert_close(OP_LOGP, "dhidden", h.grad, ref.dh, atol=ref.dh_atol(dtype),
                 rtol=output_roundoff(dtype))  # dlogits and dh each rounded to the dtype
    assert_close(OP_LOGP, "dweight", w.grad, ref.dw, atol=ref.dw_atol(dtype),
                 rtol=output_roundoff(dtype))  # fp32 accumulation, one rounding to W's dtype


def test_token_logprobs_low_level_forward_backward():
    T, H, V = 29, 45, 1001
    hidden, weight = make_inputs(T, H, V, torch.float16)
    labels = random_labels(T, V)
    logp, lse = token_logprobs_forward(hidden, weight, labels, chunk_bytes=4 * V * 4)
    upstream = torch.randn(T)
    dh, dw = token_logprobs_backward(upstream, hidden, weight, labels, lse, weight_grad=True,
                                     chunk_bytes=9 * V * 4)  # other chunks than the forward's
    ref = Reference(hidden, weight, labels, upstream)
    valid = labels != -100
    logits64 = quantized(hidden, torch.float16) @ quantized(weight, torch.float16).t()
    ref_lse = torch.where(valid, torch.logsumexp(logits64, dim=1),
                          torch.zeros(T, dtype=torch.float64))
    # lse: logit_bound from the projection plus the kernel's lse_tolerance (in rel_p)
    assert_close(OP_LOGP, "lse", lse, ref_lse, atol=ref.rel_p, rtol=0.0)
    # see Reference
    assert_close(OP_LOGP, "logp_low_level", logp, ref.logp, atol=ref.rel_p, rtol=0.0)
    assert dh.dtype == torch.float16 and dw.dtype == torch.float32
    assert_close(OP_LOGP, "dhidden_low_level", dh, ref.dh, atol=ref.dh_atol(torch.float16),
                 rtol=output_roundoff(torch.float16))  # rounded once to hidden's dtype
    assert_close(OP_LOGP, "dweight_low_level", dw, ref.dw, atol=ref.dw_atol(torch.float16),
                 rtol=0.0)  # fp32 output
    # without the weight gradient, dhidden is the same bits: same chunks, so the same
    # matmul shapes (other chunk sizes may let BLAS sum in another order)
    dh_only, no_dw = token_logprobs_backward(upstream, hidden, weight, labels, lse,
                                             chunk_bytes=9 * V * 4)
    assert no_dw is None and torch.equal(dh_only, dh)


@pytest.mark.parametrize("V", [128256, 128257])
def test_token_logprobs_llama3_vocabulary(V):
    T, H = 4, 8
    hidden, weight = make_inputs(T, H, V, torch.float32)
    labels = torch.tensor([0, -100, torch.randint(0, V, ()).item(), V - 1])
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp = token_logprobs(h, w, labels)
    upstream = torch.randn(T)
    logp.backward(upstream)
    ref = Reference(hidden, weight, labels, upstream)
    assert float(logp.detach()[1]) == 0.0
    assert_close(OP_LOGP, "logp_llama3_vocab", logp, ref.logp, atol=ref.rel_p, rtol=0.0)
    assert_close(OP_LOGP, "dhidden_llama3_vocab", h.grad, ref.dh,
                 atol=ref.dh_atol(torch.float32), rtol=0.0)  # fp32 throughout (see Reference)
    assert_close(OP_LOGP, "dweight_llama3_vocab", w.grad, ref.dw,
                 atol=ref.dw_atol(torch.float32), rtol=0.0)


def test_linear_losses_reject_bad_arguments():
    T, H, V = 4, 6, 10
    hidden, weight = make_inputs(T, H, V, torch.float32)
    labels = torch.tensor([0, 1, -100, 9])
    for fn in (fused_linear_cross_entropy, token_logprobs, token_logprobs_forward,
               linear_cross_entropy_forward):
        with pytest.raises(ValueError, match=r"labels\[1\] = 10 is outside the vocabulary"):
            fn(hidden, weight, torch.tensor([0, 10, 2, 3]))
        with pytest.raises(ValueError, match="match hidden's last dimension"):
            fn(hidden, torch.randn(V, H + 1), labels)
        with pytest.raises(ValueError, match="'weight' has dtype"):
            fn(hidden, weight.half(), labels)
        with pytest.raises(ValueError, match="'hidden' has dtype"):
            fn(hidden.to(torch.int64), weight, labels)
        with pytest.raises(ValueError, match="'labels' has dtype"):
            fn(hidden, weight, labels.float())
        with pytest.raises(ValueError, match="'labels' has shape"):
            fn(hidden, weight, labels[:3])
        with pytest.raises(ValueError, match="'hidden' has 3 dims"):
            fn(hidden[None], weight, labels)
        with pytest.raises(ValueError, match="'weight' must be contiguous"):
            fn(hidden, torch.randn(H, V).t(), labels)
        with pytest.raises(ValueError, match="chunk_bytes must be a positive int"):
            fn(hidden, weight, labels, -100, 0)
    fb = linear_cross_entropy_forward_backward
    with pytest.raises(ValueError, match="grad_scale must be finite"):
        fb(hidden, weight, labels, float("nan"))
    with pytest.raises(ValueError, match="grad_scale must be a Python float"):
        fb(hidden, weight, labels, torch.tensor(1.0))
    logp, lse = token_logprobs_forward(hidden, weight, labels)
    with pytest.raises(ValueError, match="'dlogp' has dtype"):
        token_logprobs_backward(torch.ones(T, dtype=torch.float64), hidden, weight, labels, lse)
    with pytest.raises(ValueError, match="'lse' has shape"):
        token_logprobs_backward(torch.ones(T), hidden, weight, labels, lse[:2])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_counted_targets_give_the_same_bits_without_reading_the_device(backend):
    """num_targets (counted on the host, as the model's batch_facts do) replaces the
    labels check and the nonzero: the same rows in the same order, so the same bits,
    and not one host sync (bench.host_syncs counts them; without it there are some)."""
    from bench.host_syncs import HostSyncCounter
    import csrc_torch
    import csrc_triton.linear_loss as triton_side
    ops = triton_side if backend == "triton" else csrc_torch
    T, H, V = 23, 12, 37
    hidden, weight = make_inputs(T, H, V, torch.float32)
    labels = random_labels(T, V)
    labels[T // 2] = -100       # at least one ignored row, whatever the draw (0.75^21 of draws had none)
    n = int((labels != -100).sum())
    assert 0 < n < T
    upstream = torch.randn(T)

    def run(**hint):
        loss, count, dh, dw = ops.linear_cross_entropy_forward_backward(
            hidden, weight, labels, 0.5, weight_grad=True, chunk_bytes=5 * V * 4, **hint)
        eval_loss, _ = ops.linear_cross_entropy_forward(hidden, weight, labels, **hint)
        logp, lse = ops.token_logprobs_forward(hidden, weight, labels, chunk_bytes=7 * V * 4, **hint)
        dh2, dw2 = ops.token_logprobs_backward(upstream, hidden, weight, labels, lse,
                                               weight_grad=True, **hint)
        return [loss, count, dh, dw, eval_loss, logp, lse, dh2, dw2]

    plain = run()
    counter = HostSyncCounter()
    with counter:
        counted = run(num_targets=n)
    assert counter.syncs == [], counter.syncs
    for i, (a, b) in enumerate(zip(plain, counted)):
        assert torch.equal(a, b), i
    with HostSyncCounter() as seen:
        run()
    assert {s.what for s in seen.syncs} >= {"nonzero", "Tensor.__bool__"}
    for bad in (True, -1, T + 1, 2.0):
        with pytest.raises(ValueError, match="num_targets must be an int"):
            ops.linear_cross_entropy_forward(hidden, weight, labels, num_targets=bad)
    with pytest.raises(RuntimeError, match="num_targets does not match"):
        ops.linear_cross_entropy_forward(hidden, weight, labels, num_targets=n - 1)


@pytest.mark.gpu
@pytest.mark.parametrize("T,weight_grad", [(8192, False), (4096, True)])
def test_fused_linear_cross_entropy_bf16_llama3_8b_shape_on_gpu(T, weight_grad):
    H, V = 4096, 128256
    hidden, weight = make_inputs(T, H, V, torch.bfloat16, device="cuda")
    labels = random_labels(T, V).cuda()
    n_valid = int((labels != -100).sum())
    loss_sum, n_tokens, dh, dw = linear_cross_entropy_forward_backward(
        hidden, weight, labels, 1.0 / n_valid, weight_grad=weight_grad)
    ref = Reference(hidden, weight, labels, torch.full((T,), -1.0 / n_valid, device="cuda"),
                    weight_grad=weight_grad, rows_per_chunk=256)
    ref_loss = -ref.logp.sum()
    assert int(n_tokens) == n_valid
    assert_close(OP_CE, "loss_sum_bf16", loss_sum, ref_loss,
                 atol=ref.loss_atol(n_valid, float(ref_loss)), rtol=0.0)  # see Reference
    assert_close(OP_CE, "dhidden_bf16", dh, ref.dh, atol=ref.dh_atol(torch.bfloat16),
                 rtol=output_roundoff(torch.bfloat16))  # bf16 dlogits and bf16 dh
    if weight_grad:
        assert_close(OP_CE, "dweight_bf16", dw, ref.dw, atol=ref.dw_atol(torch.bfloat16),
                     rtol=0.0)  # fp32 accumulation of bf16 dlogits products


@pytest.mark.gpu
def test_token_logprobs_bf16_llama3_8b_shape_on_gpu():
    T, H, V = 4096, 4096, 128256
    hidden, weight = make_inputs(T, H, V, torch.bfloat16, device="cuda")
    labels = random_labels(T, V).cuda()
    h = hidden.clone().requires_grad_(True)
    logp = token_logprobs(h, weight, labels)
    upstream = torch.randn(T, device="cuda")
    logp.backward(upstream)
    ref = Reference(hidden, weight, labels, upstream, weight_grad=False, rows_per_chunk=256)
    assert_close(OP_LOGP, "logp_bf16", logp, ref.logp, atol=ref.rel_p, rtol=0.0)  # see Reference
    assert_close(OP_LOGP, "dhidden_bf16", h.grad, ref.dh, atol=ref.dh_atol(torch.bfloat16),
                 rtol=output_roundoff(torch.bfloat16))  # bf16 dlogits and bf16 dh

