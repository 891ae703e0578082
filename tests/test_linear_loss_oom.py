"""linear_loss_matmul.mm_fp32, the lm-head's fp32-output matmul: only an "out_dtype is
unsupported" error moves the process to upcast operands; an out-of-memory, an illegal
memory access or any other error reaches the caller and changes nothing. The upcast
path copies at most one block of an operand to fp32 (never the whole lm-head weight),
as much as ``upcast_bytes`` says, which the memory planner counts.

A CPU tensor that answers is_cuda = True reaches the cuBLAS branch on a CPU; torch.mm
is replaced by one that raises what a GPU (or an older torch) would."""
from __future__ import annotations

import pytest
import torch

from csrc_triton import linear_loss_matmul as mm
from tests.test_memory_plan import LiveDeviceBytes


class _LooksLikeCuda(torch.Tensor):
    """A CPU tensor that answers is_cuda = True: reaches mm_fp32's cuBLAS branch on a CPU."""

    @property
    def is_cuda(self):
        return True


def _half_operands():
    a = torch.randn(5, 8).to(torch.bfloat16).as_subclass(_LooksLikeCuda)
    b = torch.randn(8, 3).to(torch.bfloat16).as_subclass(_LooksLikeCuda)
    return a, b


def _raising(monkeypatch, err):
    calls = []

    def mm_that_raises(*args, **kwargs):
        calls.append(kwargs)
        raise err
    monkeypatch.setattr(torch, "mm", mm_that_raises)
    return calls


# what a GPU raises when the call itself fails: it must reach the caller
FAILURES = [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors "
                 "might be asynchronously reported at some other API call"),
    RuntimeError("CUDA error: unspecified launch failure"),
    RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, "
                 "opb, m, n, k, &falpha, a, CUDA_R_16BF, lda, b, CUDA_R_16BF, ldb, &fbeta, c, "
                 "CUDA_R_32F, ldc, compute_type, CUBLAS_GEMM_DEFAULT_TENSOR_OP)`"),
    TypeError("mm(): argument 'input' (position 1) must be Tensor, not NoneType"),
]


@pytest.mark.parametrize("err", FAILURES, ids=lambda e: str(e)[:24])
@pytest.mark.parametrize("known", [None, True])
def test_a_failing_fp32_output_matmul_propagates_and_changes_nothing(monkeypatch, err, known):
    """An OOM (a batch search needs to see it), an illegal memory access, a launch or
    cuBLAS failure: the caller gets the error, and the lm-head stays on out_dtype."""
    monkeypatch.setattr(mm, "_cuda_out_dtype_works", known)
    calls = _raising(monkeypatch, err)
    a, b = _half_operands()
    with pytest.raises(type(err)) as raised:
        mm.mm_fp32(a, b)
    assert raised.value is err and len(calls) == 1
    assert mm._cuda_out_dtype_works is known, "the error moved the lm-head to fp32 copies"


UNSUPPORTED = [
    TypeError("mm() got an unexpected keyword argument 'out_dtype'"),
    TypeError("mm() received an invalid combination of arguments - got (Tensor, Tensor, "
              "out_dtype=torch.dtype), but expected one of: (Tensor input, Tensor mat2, *, "
              "Tensor out = None)"),
    NotImplementedError("Could not run 'aten::mm.dtype' with arguments from the 'CUDA' backend."),
    RuntimeError("out_dtype must be the same as input dtype or fp32 for fp16/bf16 inputs"),
]


@pytest.mark.parametrize("err", UNSUPPORTED, ids=lambda e: type(e).__name__ + str(e)[:16])
def test_an_unsupported_out_dtype_falls_back_to_fp32_operands(monkeypatch, err):
    """The cases the fallback exists for (a torch without out_dtype, a build without the
    kernel, cuBLAS' dtype check) give the same fp32 product from upcast operands, with a
    warning, from then on."""
    monkeypatch.setattr(mm, "_cuda_out_dtype_works", None)
    calls = _raising(monkeypatch, err)
    a, b = _half_operands()
    with pytest.warns(UserWarning, match="out_dtype=float32"):
        product = mm.mm_fp32(a, b)
    assert product.dtype == torch.float32 and mm._cuda_out_dtype_works is False
    plain_a, plain_b = a.as_subclass(torch.Tensor), b.as_subclass(torch.Tensor)
    assert torch.equal(product.as_subclass(torch.Tensor), plain_a.float() @ plain_b.float())
    mm.mm_fp32(a, b)                                # no second try of out_dtype
    assert len(calls) == 1
    assert mm.upcasts(torch.device("cuda"), torch.bfloat16)      # and the planner counts it


def test_the_real_cpu_error_for_out_dtype_is_taken_for_unsupported():
    """This torch's own answer on a CPU (no aten::mm.dtype kernel there) is recognized."""
    a, b = torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(3, 2, dtype=torch.bfloat16)
    try:
        torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError) as err:
        assert mm.out_dtype_unsupported(err), err
    else:
        pytest.skip("this torch computes mm(out_dtype=float32) on a CPU")


def test_upcasts_says_when_the_planner_must_count_the_copies(monkeypatch):
    assert not mm.upcasts(torch.device("cpu"), torch.float32)
    assert mm.upcasts(torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(mm, "_cuda_out_dtype_works", True)
    assert not mm.upcasts(torch.device("cuda"), torch.bfloat16)
    assert not mm.upcasts(torch.device("cuda"), torch.float32)


@pytest.mark.parametrize("M, K, N, axis", [
    (6, 40, 1000, "N"),         # logits = h_c @ W^T: cut along the vocabulary (columns)
    (6, 1000, 40, "K"),         # dh_c = dlogits @ W: partial products over the vocabulary
    (1000, 6, 40, "M"),         # dW_c = dlogits^T @ h_c: rows of the vocabulary
    (4, 16, 30, None),          # small: one piece
])
def test_the_upcast_copies_one_block_at_a_time_as_counted(monkeypatch, M, K, N, axis):
    """With a block limit far below the large operand, the fp32 copies alive beside the
    result are exactly upcast_bytes (what the planner adds to the loss's peak), never a
    whole fp32 copy of the large operand; the product is the one-piece fp32 product up
    to the order of its fp32 sums (cut along K: |error| <= 2 K u_fp32 sum_k |a_ik b_kj|;
    along M or N every element is computed whole)."""
    monkeypatch.setattr(mm, "UPCAST_BLOCK_BYTES", 4096)
    assert mm._blocks(M, K, N)[0] == axis
    g = torch.Generator().manual_seed(M + K + N)
    a = torch.randn(M, K, generator=g).to(torch.bfloat16)
    b = torch.randn(N, K, generator=g).to(torch.bfloat16).t()       # like weight.t()
    tracker = LiveDeviceBytes()
    with tracker:
        product = mm.mm_fp32(a, b)
    assert tracker.peak == M * N * 4 + mm.upcast_bytes(M, K, N)
    if axis is not None:
        assert mm.upcast_bytes(M, K, N) < max(M * K, K * N) * 4
    reference = a.double() @ b.double()
    bound = 2 * K * torch.finfo(torch.float32).eps / 2 * (a.double().abs() @ b.double().abs())
    assert product.dtype == torch.float32
    assert ((product.double() - reference).abs() <= bound).all()
