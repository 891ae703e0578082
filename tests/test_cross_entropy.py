"""cross_entropy and its row kernels against the float64 reference (tests/reference/losses.py)."""
from __future__ import annotations

import pytest
import torch

from csrc_triton.cross_entropy import (cross_entropy_op, cross_entropy_rows, softmax_grad_rows,
                                       softmax_grad_rows_)
from tests.helpers import assert_close, quantized
from tests.reference.losses import (reference_cross_entropy, reference_logsumexp,
                                    reference_softmax_grad_rows, reference_target_logit)

# a kernel against its float64 reference: also run under the oldest supported triton
# (tests/test_supported_tritons.py)
pytestmark = pytest.mark.kernels

OP = "cross_entropy"
FP32_U = 2.0**-24  # unit roundoff of fp32


def random_labels(T: int, V: int, ignore_index: int = -100, ignored_fraction: float = 0.25):
    """Labels in [0, V) with about ignored_fraction of them set to ignore_index;
    the first two valid rows hit the vocabulary's ends (0 and V - 1)."""
    labels = torch.randint(0, V, (T,))
    labels[torch.rand(T) < ignored_fraction] = ignore_index
    labels[0], labels[-1] = 0, V - 1
    return labels


def output_roundoff(dtype: torch.dtype) -> float:
    """Half an ulp at 1: the relative error of rounding an fp32 result to dtype.

    This term is exact, not slack: rounding a value just above a power of two to
    fp16 errs by up to eps/2 of it. Where the output rounding dominates (fp16
    gradients), a check uses up to ~0.92 of its bound ("tolerance used" of
    cross_entropy's dlogits and softmax_grad_rows: 0.85 to 0.92 over four full runs
    with fresh seeds, 2026-12-01; it nears the output rounding's share of the bound
    when an element lands just above a power of two) and cannot pass 1.0 by chance,
    because every other term is a worst-case bound of the fp32 arithmetic before it."""
    return torch.finfo(dtype).eps / 2 if dtype != torch.float32 else 0.0


def lse_tolerance(ref_logits: torch.Tensor, ref_lse: torch.Tensor) -> float:
    """Absolute error allowed on an fp32 online logsumexp: x - max and max + log(s)
    each round to within an ulp of the largest magnitude involved (4 roundoffs,
    with slack), and the fp32 tree sum of <= 2^17 terms of size <= 1 plus its log
    add ~17 roundoffs of O(1), covered by 1e-6."""
    magnitude = max(float(ref_logits.abs().max()), float(ref_lse.abs().max()))
    return 4 * FP32_U * magnitude + 1e-6


def grad_rtol(ref_logits: torch.Tensor, ref_lse: torch.Tensor, dtype: torch.dtype) -> float:
    """Relative error allowed on (softmax - onehot) * s: p = exp(x - lse) turns the
    absolute rounding error of x - lse in fp32 (<= 2 ulp of max(|x|, |lse|)) and the
    lse error into a relative error of p; then the result is rounded to dtype."""
    magnitude = max(float(ref_logits.abs().max()), float(ref_lse.abs().max()))
    return 4 * FP32_U * magnitude + lse_tolerance(ref_logits, ref_lse) + output_roundoff(dtype)


def grad_atol(dtype: torch.dtype, scale: float) -> float:
    """Absolute floor: half the smallest subnormal spacing of dtype (values that
    underflow), and 1e-6 * |s| for the onehot entries p - 1 computed in fp32."""
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2 + 1e-6 * scale


def check_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """Forward and autograd backward of cross_entropy vs the float64 reference."""
    dtype = logits.dtype
    logits = logits.detach().requires_grad_(True)
    loss_sum, n_tokens = cross_entropy_op(logits, labels, ignore_index)
    upstream = float(torch.empty(()).uniform_(0.5, 2.0))
    loss_sum.backward(torch.tensor(upstream))

    ref_logits = quantized(logits.detach(), dtype).requires_grad_(True)
    ref_loss, ref_count = reference_cross_entropy(ref_logits, labels, ignore_index)
    (ref_grad,) = torch.autograd.grad(ref_loss * upstream, ref_logits)
    ref_lse = reference_logsumexp(ref_logits.detach())

    assert loss_sum.dtype == torch.float32 and loss_sum.dim() == 0
    assert n_tokens.dtype == torch.int64 and n_tokens.dim() == 0 and not n_tokens.requires_grad
    assert int(n_tokens) == ref_count
    valid = labels != ignore_index
    # every row's loss is within lse_tolerance, plus fp32 rounding of the row sum
    loss_atol = (int(valid.sum()) * lse_tolerance(ref_logits.detach(), ref_lse)
                 + 4 * FP32_U * abs(float(ref_loss.detach())))
    assert_close(OP, "loss_sum", loss_sum, ref_loss, atol=loss_atol, rtol=0.0)
    assert logits.grad.dtype == dtype
    # see grad_rtol / grad_atol: fp32 exp rounding, then one rounding to the logits' dtype
    assert_close(OP, "dlogits", logits.grad, ref_grad, atol=grad_atol(dtype, upstream),
                 rtol=grad_rtol(ref_logits.detach(), ref_lse, dtype))
    assert torch.all(logits.grad[~valid] == 0), "ignored rows must get exactly zero gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_entropy_odd_shape_matches_reference(dtype):
    T, V = 37, 1001
    logits = (torch.randn(T, V) * 4).to(dtype)
    check_cross_entropy(logits, random_labels(T, V))


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
def test_cross_entropy_custom_ignore_index_and_label_dtypes(label_dtype):
    T, V = 19, 333
    labels = random_labels(T, V, ignore_index=-1).to(label_dtype)
    check_cross_entropy(torch.randn(T, V) * 3, labels, ignore_index=-1)


@pytest.mark.parametrize("V,dtype", [(128256, torch.float32), (128257, torch.float32),
                                     (128257, torch.float16)])
def test_cross_entropy_llama3_vocabulary(V, dtype):
    T = 3
    logits = (torch.randn(T, V) * 4).to(dtype)
    labels = torch.tensor([0, torch.randint(0, V, ()).item(), V - 1])
    check_cross_entropy(logits, labels)


def test_cross_entropy_large_logits_do_not_overflow():
    # |logits| up to ~4000: exp() of them overflows fp32; the running max must not
    T, V = 7, 257
    check_cross_entropy(torch.randn(T, V) * 1000, random_labels(T, V))


def test_cross_entropy_all_ignored_gives_zero_everything():
    T, V = 5, 77
    logits = torch.randn(T, V).requires_grad_(True)
    labels = torch.full((T,), -100)
    loss_sum, n_tokens = cross_entropy_op(logits, labels)
    loss_sum.backward()
    assert float(loss_sum.detach()) == 0.0 and int(n_tokens) == 0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_cross_entropy_exact_accumulation_over_uneven_micro_batches():
    T, V = 37, 211
    logits = torch.randn(T, V) * 3
    labels = random_labels(T, V, ignored_fraction=0.4)
    whole = logits.clone().requires_grad_(True)
    whole_sum, whole_count = cross_entropy_op(whole, labels)
    (whole_sum / whole_count).backward()

    pieces = logits.clone().requires_grad_(True)
    splits = (5, 17, 15)
    outputs = [cross_entropy_op(chunk, lab) for chunk, lab in
               zip(pieces.split(splits), labels.split(splits))]
    total = sum(int(n) for _, n in outputs)
    assert total == int(whole_count)
    accumulated = torch.zeros(())
    for loss_sum, _ in outputs:  # what the trainer does: each micro-batch / global count
        (loss_sum / total).backward()
        accumulated += loss_sum.detach() / total

    ref_logits = quantized(logits, torch.float32).requires_grad_(True)
    ref_loss, ref_count = reference_cross_entropy(ref_logits, labels)
    (ref_grad,) = torch.autograd.grad(ref_loss / ref_count, ref_logits)
    # same fp32 row losses, summed in a different grouping: a few fp32 roundoffs of the mean
    assert_close(OP, "accumulated_mean", accumulated, whole_sum.detach() / whole_count,
                 atol=0.0, rtol=8 * FP32_U)
    ref_lse = reference_logsumexp(ref_logits.detach())
    mean_atol = lse_tolerance(ref_logits.detach(), ref_lse)  # the per-row loss error bound
    assert_close(OP, "accumulated_mean", accumulated, ref_loss / ref_count,
                 atol=mean_atol, rtol=0.0)
    # each row's gradient is produced by the same kernel with the same scale: bit-identical
    assert torch.equal(pieces.grad, whole.grad)
    # grad_atol / grad_rtol with the upstream scale 1 / count
    assert_close(OP, "accumulated_dlogits", pieces.grad, ref_grad,
                 atol=grad_atol(torch.float32, 1.0 / ref_count),
                 rtol=grad_rtol(ref_logits.detach(), ref_lse, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_row_kernels_over_many_vocabulary_tiles(dtype):
    # block_v=64 makes the online logsumexp rescale 16 times, with a ragged last tile
    T, V = 11, 1001
    logits = (torch.randn(T, V) * 4).to(dtype)
    labels = random_labels(T, V)
    lse, target = cross_entropy_rows(logits, labels, block_v=64)
    ref_logits = quantized(logits, dtype)
    ref_lse = reference_logsumexp(ref_logits)
    # see lse_tolerance
    assert_close(OP, "lse", lse, ref_lse, atol=lse_tolerance(ref_logits, ref_lse), rtol=0.0)
    # the target logit is a load and an exact upcast
    assert_close(OP, "target_logit", target, reference_target_logit(ref_logits, labels),
                 atol=0.0, rtol=0.0)

    row_scale = torch.randn(T)
    ref_grad = reference_softmax_grad_rows(ref_logits, labels, row_scale)
    scale = float(row_scale.abs().max())
    rtol = grad_rtol(ref_logits, ref_lse, dtype)  # see grad_rtol / grad_atol
    grad = softmax_grad_rows(logits, labels, lse, row_scale, block_v=64)
    assert grad.dtype == dtype and grad.data_ptr() != logits.data_ptr()
    assert_close(OP, "softmax_grad_rows", grad, ref_grad, atol=grad_atol(dtype, scale), rtol=rtol)

    into_fp16 = torch.empty(T, V, dtype=torch.float16)
    softmax_grad_rows(logits, labels, lse, row_scale, out=into_fp16, block_v=64)
    assert_close(OP, "softmax_grad_rows_fp16_out", into_fp16, ref_grad,
                 atol=grad_atol(torch.float16, scale),
                 rtol=rtol - output_roundoff(dtype) + output_roundoff(torch.float16))

    in_place = logits.clone()
    pointer = in_place.data_ptr()
    returned = softmax_grad_rows_(in_place, labels, lse, row_scale)
    assert returned.data_ptr() == pointer, "softmax_grad_rows_ must write over the logits"
    assert_close(OP, "softmax_grad_rows_in_place", in_place, ref_grad,
                 atol=grad_atol(dtype, scale), rtol=rtol)


def test_cross_entropy_rejects_bad_arguments():
    logits = torch.randn(4, 10)
    labels = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"labels\[2\] = 10 is outside the vocabulary"):
        cross_entropy_op(logits, torch.tensor([0, 1, 10, 3]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cross_entropy_op(logits, torch.tensor([0, -1, 2, 3]))  # -1 is not the ignore_index
    with pytest.raises(ValueError, match="'logits' has dtype"):
        cross_entropy_op(logits.to(torch.int32), labels)
    with pytest.raises(ValueError, match="'labels' has dtype"):
        cross_entropy_op(logits, labels.float())
    with pytest.raises(ValueError, match="'labels' has shape"):
        cross_entropy_op(logits, labels[:3])
    with pytest.raises(ValueError, match="'logits' has 1 dims"):
        cross_entropy_op(logits[0], labels[:1])
    with pytest.raises(ValueError, match="must be contiguous"):
        cross_entropy_op(torch.randn(10, 4).t(), labels)
    with pytest.raises(ValueError, match="ignore_index must be a Python int"):
        cross_entropy_op(logits, labels, ignore_index=-100.0)
    with pytest.raises(ValueError, match="block_v must be a power of two"):
        cross_entropy_rows(logits, labels, block_v=100)
    lse, _ = cross_entropy_rows(logits, labels)
    with pytest.raises(ValueError, match="'lse' has dtype"):
        softmax_grad_rows(logits, labels, lse.double(), torch.ones(4))
    with pytest.raises(ValueError, match="'row_scale' has shape"):
        softmax_grad_rows(logits, labels, lse, torch.ones(5))
    with pytest.raises(ValueError, match="'out' has shape"):
        softmax_grad_rows(logits, labels, lse, torch.ones(4), out=torch.empty(4, 11))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [4096])
def test_cross_entropy_bf16_llama3_8b_shape_on_gpu(T):
    V = 128256
    logits = (torch.randn(T, V, device="cuda") * 4).to(torch.bfloat16).requires_grad_(True)
    labels = random_labels(T, V).cuda()
    loss_sum, n_tokens = cross_entropy_op(logits, labels)
    loss_sum.backward()
    assert int(n_tokens) == int((labels != -100).sum())
    ref_total = torch.zeros((), dtype=torch.float64, device="cuda")
    for rows in torch.arange(T, device="cuda").split(512):
        ref_logits = quantized(logits.detach()[rows], torch.bfloat16).requires_grad_(True)
        ref_loss, _ = reference_cross_entropy(ref_logits, labels[rows])
        (ref_grad,) = torch.autograd.grad(ref_loss, ref_logits)
        ref_lse = reference_logsumexp(ref_logits.detach())
        ref_total += ref_loss.detach()
        # fp32 exp rounding, then one bf16 rounding (see grad_rtol / grad_atol)
        assert_close(OP, "dlogits_bf16", logits.grad[rows], ref_grad,
                     atol=grad_atol(torch.bfloat16, 1.0),
                     rtol=grad_rtol(ref_logits.detach(), ref_lse, torch.bfloat16))
    # every row's loss is within lse_tolerance (|logits|, |lse| < 40 here), plus the fp32 sum
    assert_close(OP, "loss_sum_bf16", loss_sum, ref_total,
                 atol=T * (4 * FP32_U * 40 + 1e-6) + 4 * FP32_U * float(ref_total), rtol=0.0)
