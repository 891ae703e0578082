"""RMSNorm kernels against the float64 oracle, torch autograd and transformers' LlamaRMSNorm."""
from __future__ import annotations

import pytest
import torch

from csrc_triton.rms_norm import rms_norm_backward, rms_norm_forward, rms_norm_op
from tests.helpers import assert_close, quantized
from tests.reference.rms_norm import reference_rms_norm, reference_rms_norm_backward

# a kernel against its float64 reference: also run under the oldest supported triton
# (tests/test_supported_tritons.py)
pytestmark = pytest.mark.kernels

OP = "rms_norm"
EPS = 1e-5

# Tolerances per dtype, for outputs of size O(1..10):
#  fp32: a handful of fp32 roundings (2^-24 ~ 6e-8 relative each) of terms up to
#        ~10, plus the mean over H; 1e-5 is ~10x the worst error seen (~1e-6).
#  fp16: the kernel computes in fp32 and rounds once; rtol 1e-3 ~ one fp16 ulp
#        (2^-10) covers that half-ulp rounding; atol 1e-5 covers fp16 subnormal
#        outputs (spacing 6e-8) and fp32 cancellation in dx.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5),
             torch.float16: dict(atol=1e-5, rtol=1e-3)}
# rstd is fp32 in every case: sum of squares + sqrt + divide, a few fp32 ulps.
RSTD_TOLERANCE = dict(atol=0.0, rtol=1e-6)


def dw_tolerance(dtype: torch.dtype, n_rows: int) -> dict:
    # dw sums n_rows fp32 terms of size O(1): the summation error grows with the row
    # count, ~1e-7 per term in the worst case; fp16 adds the final half-ulp rounding.
    return dict(atol=1e-6 * n_rows, rtol=TOLERANCE[dtype]["rtol"])


def make_inputs(shape, dtype, weight_dtype=None):
    x = (torch.randn(shape) * 2).to(dtype)
    # Weights near 1 as in trained norms, but far enough from 1 to matter.
    weight = (1 + 0.5 * torch.randn(shape[-1])).to(weight_dtype or dtype)
    dy = torch.randn(shape).to(dtype)
    return x, weight, dy


# Odd sizes: H not a power of two; with the interpreter's tiles, (150, 1000) gives
# several dw programs that each walk two blocks of 16 rows, the last block partial.
# (1, 7) is a single short row. A tiny H (1..3) is avoided on purpose: rows with a
# small rms there make dx's cancellation error rstd times larger than atol allows.
SHAPES = [(37, 99), (300, 37), (1, 7), (150, 1000)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_against_float64(shape, dtype):
    x, weight, dy = make_inputs(shape, dtype)
    y, rstd = rms_norm_forward(x, weight, EPS)
    x64, w64, dy64 = quantized(x, dtype), quantized(weight, dtype), quantized(dy, dtype)
    assert y.dtype == dtype and rstd.dtype == torch.float32
    assert_close(OP, "y", y, reference_rms_norm(x64, w64, EPS), **TOLERANCE[dtype])
    reference_rstd = 1 / torch.sqrt((x64 * x64).mean(-1) + EPS)
    assert_close(OP, "rstd", rstd, reference_rstd, **RSTD_TOLERANCE)

    dx_ref, dw_ref = reference_rms_norm_backward(dy64, x64, w64, EPS)
    dx, dw = rms_norm_backward(dy, x, weight, rstd, True)
    assert dx.dtype == dtype and dw.dtype == dtype
    assert_close(OP, "dx", dx, dx_ref, **TOLERANCE[dtype])
    assert_close(OP, "dw", dw, dw_ref, **dw_tolerance(dtype, shape[0]))

    dx_frozen, dw_frozen = rms_norm_backward(dy, x, weight, rstd, False)
    assert dw_frozen is None
    assert_close(OP, "dx (frozen weight)", dx_frozen, dx_ref, **TOLERANCE[dtype])


def test_mixed_precision_fp16_input_fp32_weight():
    x, weight, dy = make_inputs((37, 99), torch.float16, weight_dtype=torch.float32)
    y, rstd = rms_norm_forward(x, weight, EPS)
    assert y.dtype == torch.float16
    x64, dy64 = quantized(x, torch.float16), quantized(dy, torch.float16)
    w64 = weight.double()
    assert_close(OP, "y (fp16 x, fp32 w)", y, reference_rms_norm(x64, w64, EPS),
                 **TOLERANCE[torch.float16])
    dx, dw = rms_norm_backward(dy, x, weight, rstd, True)
    dx_ref, dw_ref = reference_rms_norm_backward(dy64, x64, w64, EPS)
    assert dw.dtype == torch.float32
    assert_close(OP, "dx (fp16 x, fp32 w)", dx, dx_ref, **TOLERANCE[torch.float16])
    # dw stays fp32 here: only the summation error applies.
    assert_close(OP, "dw (fp16 x, fp32 w)", dw, dw_ref, **dw_tolerance(torch.float32, 37))


def test_reference_backward_matches_autograd_of_reference():
    """The oracle's closed-form backward against float64 autograd of its forward."""
    x = torch.randn(7, 99, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(99, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(7, 99, dtype=torch.float64)
    dx_auto, dw_auto = torch.autograd.grad(reference_rms_norm(x, weight, EPS), (x, weight), dy)
    dx, dw = reference_rms_norm_backward(dy, x.detach(), weight.detach(), EPS)
    # Both float64 with O(1) values: only float64 rounding (1e-16) separates them.
    assert_close("rms_norm_reference", "dx", dx, dx_auto, atol=1e-12, rtol=1e-12)
    assert_close("rms_norm_reference", "dw", dw, dw_auto, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("weight_trainable", [True, False])
def test_autograd_function_against_torch_autograd(dtype, weight_trainable):
    shape = (2, 19, 99)  # 3-D input: the Function flattens the leading dims
    x, weight, dy = make_inputs(shape, dtype)
    x.requires_grad_(True)
    weight.requires_grad_(weight_trainable)
    x64 = quantized(x, dtype).requires_grad_(True)
    w64 = quantized(weight, dtype).requires_grad_(weight_trainable)

    y = rms_norm_op(x, weight, EPS)
    y_ref = reference_rms_norm(x64, w64, EPS)
    assert_close(OP, "autograd y", y, y_ref, **TOLERANCE[dtype])
    inputs, inputs_ref = ((x, weight), (x64, w64)) if weight_trainable else ((x,), (x64,))
    grads = torch.autograd.grad(y, inputs, dy)
    grads_ref = torch.autograd.grad(y_ref, inputs_ref, quantized(dy, dtype))
    assert_close(OP, "autograd dx", grads[0], grads_ref[0], **TOLERANCE[dtype])
    if weight_trainable:
        assert_close(OP, "autograd dw", grads[1], grads_ref[1],
                     **dw_tolerance(dtype, shape[0] * shape[1]))


def test_autograd_accepts_non_contiguous_incoming_gradient():
    # .sum() hands backward an expanded (stride 0) gradient of ones.
    x = torch.randn(37, 99, requires_grad=True)
    weight = torch.randn(99)
    rms_norm_op(x, weight, EPS).sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    reference_rms_norm(x64, weight.double(), EPS).sum().backward()
    assert_close(OP, "dx from sum()", x.grad, x64.grad, **TOLERANCE[torch.float32])


def test_matches_transformers_llama_rms_norm_fp32():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(3, 11, 99) * 3
    hf = LlamaRMSNorm(99, eps=EPS)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.5 * torch.randn(99))
    # Both compute in fp32; only rounding order differs (HF: torch's reductions).
    assert_close(OP, "vs LlamaRMSNorm fp32", rms_norm_op(x, hf.weight.detach(), EPS), hf(x),
                 **TOLERANCE[torch.float32])


def test_rows_of_a_wider_buffer():
    """x and dy as column slices (row stride > H) of wider buffers: bitwise what
    contiguous copies give; the outputs are contiguous."""
    x = torch.randn(13, 100)[:, 10:74].to(torch.float16)
    dy = torch.randn(13, 80)[:, :64].to(torch.float16)
    w = torch.randn(64)
    y, rstd = rms_norm_forward(x, w, EPS)
    want_y, want_rstd = rms_norm_forward(x.contiguous(), w, EPS)
    assert y.is_contiguous() and torch.equal(y, want_y) and torch.equal(rstd, want_rstd)
    dx, _ = rms_norm_backward(dy, x, w, rstd, False)
    assert torch.equal(dx, rms_norm_backward(dy.contiguous(), x.contiguous(), w, rstd, False)[0])


# Qwen3's q_norm / k_norm: an RMSNorm with weight [head_dim] on every head of q and of k
# (before RoPE), i.e. this kernel on rows = tokens x heads of width head_dim. The weight
# is a base weight, frozen under QLoRA: the backward runs with weight_grad=False (the
# kernel's WEIGHT_GRAD constexpr off: no dw partials are written nor summed, and the
# rows are not grouped per dw program). (tokens, heads, head_dim): 40 is not a power of
# two (masked lanes in a 64-wide tile), 64 and 128 are the usual head_dims (Qwen3: 128).
HEAD_SHAPES = [(7, 5, 40), (3, 4, 64), (2, 3, 128)]
QWEN3_EPS = 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("tokens,heads,head_dim", HEAD_SHAPES)
def test_per_head_qk_norm_against_float64(tokens, heads, head_dim, backend, dtype):
    import csrc_torch
    forward, backward = ((rms_norm_forward, rms_norm_backward) if backend == "triton" else
                         (csrc_torch.rms_norm_forward, csrc_torch.rms_norm_backward))
    x, weight, dy = make_inputs((tokens * heads, head_dim), dtype)
    x64, w64, dy64 = quantized(x, dtype), quantized(weight, dtype), quantized(dy, dtype)
    y, rstd = forward(x, weight, QWEN3_EPS)
    assert_close(OP, "qk-norm y", y, reference_rms_norm(x64, w64, QWEN3_EPS), **TOLERANCE[dtype])
    assert_close(OP, "qk-norm rstd", rstd, 1 / torch.sqrt((x64 * x64).mean(-1) + QWEN3_EPS),
                 **RSTD_TOLERANCE)
    dx_ref, _ = reference_rms_norm_backward(dy64, x64, w64, QWEN3_EPS)
    dx, dw = backward(dy, x, weight, rstd, False)
    assert dw is None and dx.dtype == dtype
    assert_close(OP, "qk-norm dx", dx, dx_ref, **TOLERANCE[dtype])

    # the autograd Function on the [tokens, heads, head_dim] view, weight frozen
    x3 = x.view(tokens, heads, head_dim).clone().requires_grad_()
    if backend == "triton":
        y3 = rms_norm_op(x3, weight, QWEN3_EPS)
        (dx3,) = torch.autograd.grad(y3, x3, dy.view(tokens, heads, head_dim))
        assert torch.equal(y3.reshape(-1, head_dim), y) and torch.equal(dx3.reshape(-1, head_dim), dx)


def test_per_head_qk_norm_matches_transformers_qwen3_rms_norm_fp32():
    """Against transformers' Qwen3RMSNorm on [batch, seq, heads, head_dim] (how Qwen3Attention
    applies q_norm), forward and dX with the weight frozen, fp32: both compute in fp32 and
    differ only in rounding order, so the fp32 tolerance holds."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    for head_dim in (40, 128):
        x = torch.randn(2, 5, 4, head_dim) * 3
        dy = torch.randn(2, 5, 4, head_dim)
        hf = Qwen3RMSNorm(head_dim, eps=QWEN3_EPS).requires_grad_(False)
        with torch.no_grad():
            hf.weight.copy_(1 + 0.5 * torch.randn(head_dim))
        x_ours, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_hf = rms_norm_op(x_ours, hf.weight, QWEN3_EPS), hf(x_hf)
        assert_close(OP, f"vs Qwen3RMSNorm y (head_dim {head_dim})", y_ours, y_hf,
                     **TOLERANCE[torch.float32])
        (dx_ours,) = torch.autograd.grad(y_ours, x_ours, dy)
        (dx_hf,) = torch.autograd.grad(y_hf, x_hf, dy)
        assert_close(OP, f"vs Qwen3RMSNorm dx (head_dim {head_dim})", dx_ours, dx_hf,
                     **TOLERANCE[torch.float32])


def test_bad_arguments_raise_value_error():
    x = torch.randn(5, 8)
    w = torch.randn(8)
    y, rstd = rms_norm_forward(x, w, EPS)
    dy = torch.randn(5, 8)
    with pytest.raises(ValueError, match="'weight'.*shape"):
        rms_norm_forward(x, torch.randn(7), EPS)
    with pytest.raises(ValueError, match="'x2d'.*dtype"):
        rms_norm_forward(x.to(torch.int32), w, EPS)
    with pytest.raises(ValueError, match="'x2d'.*dims"):
        rms_norm_forward(x.view(5, 2, 4), w, EPS)
    with pytest.raises(ValueError, match="'x2d'.*contiguous"):
        rms_norm_forward(torch.randn(8, 5).t(), w, EPS)
    with pytest.raises(ValueError, match="'x2d'.*empty"):
        rms_norm_forward(torch.randn(5, 0), torch.randn(0), EPS)
    with pytest.raises(ValueError, match="'eps'"):
        rms_norm_forward(x, w, -1.0)
    with pytest.raises(ValueError, match="'eps'"):
        rms_norm_forward(x, w, float("nan"))
    with pytest.raises(ValueError, match="'weight'.*meta"):
        rms_norm_forward(x, w.to("meta"), EPS)
    with pytest.raises(ValueError, match="'dy2d'.*shape"):
        rms_norm_backward(torch.randn(5, 7), x, w, rstd, False)
    with pytest.raises(ValueError, match="'rstd'.*dtype"):
        rms_norm_backward(dy, x, w, rstd.double(), False)
    with pytest.raises(ValueError, match="'rstd'.*shape"):
        rms_norm_backward(dy, x, w, rstd[:4], False)
    with pytest.raises(ValueError, match="'weight_grad'"):
        rms_norm_backward(dy, x, w, rstd, 1)
    with pytest.raises(ValueError, match="'x'"):
        rms_norm_op(torch.tensor(1.0), torch.randn(1))
    with pytest.raises(ValueError, match="'weight'.*shape"):
        rms_norm_op(torch.randn(2, 3, 8), torch.randn(3))


# ---------------------------------------------------------------- GPU only

def _bf16_parity(device, n_rows, hidden):
    dtype = torch.bfloat16
    x = (torch.randn(n_rows, hidden, device=device) * 2).to(dtype)
    weight = (1 + 0.5 * torch.randn(hidden, device=device)).to(dtype)
    dy = torch.randn(n_rows, hidden, device=device).to(dtype)
    x64, w64, dy64 = quantized(x, dtype), quantized(weight, dtype), quantized(dy, dtype)
    y, rstd = rms_norm_forward(x, weight, EPS)
    dx, dw = rms_norm_backward(dy, x, weight, rstd, True)
    dx_ref, dw_ref = reference_rms_norm_backward(dy64, x64, w64, EPS)
    # bf16 keeps 8 significant bits: rtol 2^-7 is one ulp, over the half-ulp rounding
    # of a result computed in fp32; atol covers fp32 cancellation in dx.
    bf16 = dict(atol=1e-5, rtol=2**-7)
    assert_close(OP, "bf16 y", y, reference_rms_norm(x64, w64, EPS), **bf16)
    assert_close(OP, "bf16 dx", dx, dx_ref, **bf16)
    assert_close(OP, "bf16 dw", dw, dw_ref, **dict(bf16, atol=1e-6 * n_rows))

    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    hf = LlamaRMSNorm(hidden, eps=EPS).to(device=device, dtype=dtype)
    with torch.no_grad():
        hf.weight.copy_(weight)
        # HF rounds xhat to bf16 before multiplying by w (two roundings, up to
        # 2^-8 relative each); we round once: at most 3 half-ulps (3 * 2^-8) apart.
        assert_close(OP, "bf16 vs LlamaRMSNorm", y, hf(x), atol=1e-5, rtol=3 * 2**-8)


@pytest.mark.gpu
def test_bf16_parity_llama3_8b_shapes():
    _bf16_parity("cuda", n_rows=4096, hidden=4096)
