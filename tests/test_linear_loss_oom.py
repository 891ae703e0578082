"""linear_loss._mm_fp32, the lm-head's fp32-output matmul: a CUDA out-of-memory is not
taken for a torch without out_dtype. A CPU tensor that answers is_cuda = True reaches
the cuBLAS branch; torch.mm is replaced by one that raises what a GPU would."""
from __future__ import annotations

import pytest
import torch


class _LooksLikeCuda(torch.Tensor):
    """A CPU tensor that answers is_cuda = True: reaches _mm_fp32's cuBLAS branch on a CPU."""

    @property
    def is_cuda(self):
        return True


def _half_operands():
    a = torch.randn(5, 8).to(torch.bfloat16).as_subclass(_LooksLikeCuda)
    b = torch.randn(8, 3).to(torch.bfloat16).as_subclass(_LooksLikeCuda)
    return a, b


def test_out_of_memory_in_the_fp32_output_matmul_propagates(monkeypatch):
    """A CUDA OOM inside torch.mm(out_dtype=float32) is an OOM, not 'out_dtype is
    unavailable': it reaches the caller (a batch search needs to see it) and the
    lm-head stays on the fast path for the rest of the process."""
    from csrc_triton import linear_loss
    monkeypatch.setattr(linear_loss, "_cuda_out_dtype_works", True)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(torch, "mm", out_of_memory)
    a, b = _half_operands()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        linear_loss._mm_fp32(a, b)
    assert linear_loss._cuda_out_dtype_works, "one OOM moved the lm-head to fp32 copies"


def test_a_torch_without_out_dtype_falls_back_to_fp32_operands(monkeypatch):
    """The case the fallback exists for: torch.mm without out_dtype (TypeError) gives
    the same fp32 product from upcast operands, with a warning, from then on."""
    from csrc_triton import linear_loss
    monkeypatch.setattr(linear_loss, "_cuda_out_dtype_works", True)
    calls = []

    def no_out_dtype(*args, **kwargs):
        calls.append(kwargs)
        raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")
    monkeypatch.setattr(torch, "mm", no_out_dtype)
    a, b = _half_operands()
    with pytest.warns(UserWarning, match="out_dtype=float32"):
        product = linear_loss._mm_fp32(a, b)
    assert product.dtype == torch.float32 and not linear_loss._cuda_out_dtype_works
    plain_a, plain_b = a.as_subclass(torch.Tensor), b.as_subclass(torch.Tensor)
    assert torch.equal(product.as_subclass(torch.Tensor), plain_a.float() @ plain_b.float())
    linear_loss._mm_fp32(a, b)                      # no second try of out_dtype
    assert len(calls) == 1
