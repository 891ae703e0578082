"""SwiGLU kernels against the float64 oracle and torch autograd."""
from __future__ import annotations

import pytest
import torch

from csrc_triton.swiglu import swiglu_backward, swiglu_forward, swiglu_op
from tests.helpers import assert_close, quantized
from tests.reference.swiglu import reference_swiglu, reference_swiglu_backward

# a kernel against its float64 reference: also run under the oldest supported triton
# (tests/test_supported_tritons.py)
pytestmark = pytest.mark.kernels

OP = "swiglu"

# Tolerances per dtype; inputs are O(1..10), so are the outputs:
#  fp32: sigmoid (exp + divide) and two products, a few fp32 ulps (6e-8 relative)
#        of terms up to ~50; the 1 + g (1 - s) factor of dgate cancels near
#        g = -1.28, leaving an absolute error of a few ulps of |dh u| ~ 1e-6.
#        1e-5 is ~3x the worst error seen.
#  fp16: computed in fp32, rounded once; rtol 1e-3 ~ one fp16 ulp (2^-10) covers
#        the half-ulp rounding; atol 1e-5 covers fp16 subnormal outputs (spacing
#        6e-8) and the fp32 cancellation above.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5),
             torch.float16: dict(atol=1e-5, rtol=1e-3)}


def make_inputs(shape, dtype):
    # Gate spread wide enough (|g| up to ~15) that sigmoid saturates on both sides.
    gate = (torch.randn(shape) * 4).to(dtype)
    up = torch.randn(shape).to(dtype)
    dh = torch.randn(shape).to(dtype)
    return gate, up, dh


# Odd sizes: element counts not multiples of the block (16384 in the interpreter);
# (37, 999) spans three blocks, the last one partial.
SHAPES = [(37, 99), (37, 999), (3, 5, 7), (1,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_against_float64(shape, dtype):
    gate, up, dh = make_inputs(shape, dtype)
    g64, u64, dh64 = (quantized(t, dtype) for t in (gate, up, dh))
    h = swiglu_forward(gate, up)
    assert h.dtype == dtype
    assert_close(OP, "h", h, reference_swiglu(g64, u64), **TOLERANCE[dtype])
    dgate, dup = swiglu_backward(dh, gate, up)
    dgate_ref, dup_ref = reference_swiglu_backward(dh64, g64, u64)
    assert dgate.dtype == dtype and dup.dtype == dtype
    assert_close(OP, "dgate", dgate, dgate_ref, **TOLERANCE[dtype])
    assert_close(OP, "dup", dup, dup_ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_halves_of_one_buffer_read_and_written_in_place(dtype):
    """gate and up as the two halves of one [rows, 2I] buffer (the fused gate/up output),
    and the backward writing dgate over dh, itself the first half of the [rows, 2I]
    d[gate, up] buffer, and dup beside it (the down projection's dX on the dequantize
    path): the same values as contiguous tensors, against float64."""
    rows, inter = 37, 99
    gate_up = torch.cat(make_inputs((rows, inter), dtype)[:2], dim=1)
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    g64, u64 = quantized(gate, dtype), quantized(up, dtype)
    h = swiglu_forward(gate, up)
    assert h.is_contiguous() and torch.equal(h, swiglu_forward(gate.contiguous(), up.contiguous()))
    assert_close(OP, "h halves", h, reference_swiglu(g64, u64), **TOLERANCE[dtype])
    d = torch.full((rows, 2 * inter), float("nan"), dtype=dtype)
    d[:, :inter] = torch.randn(rows, inter).to(dtype)                 # dh, in dgate's place
    dh64 = quantized(d[:, :inter], dtype)
    dgate, dup = swiglu_backward(d[:, :inter], gate, up, out=(d[:, :inter], d[:, inter:]))
    assert dgate.data_ptr() == d.data_ptr() and dup.data_ptr() == d[:, inter:].data_ptr()
    dgate_ref, dup_ref = reference_swiglu_backward(dh64, g64, u64)
    assert_close(OP, "dgate in place", d[:, :inter], dgate_ref, **TOLERANCE[dtype])
    assert_close(OP, "dup beside it", d[:, inter:], dup_ref, **TOLERANCE[dtype])


# The interpreter evaluates sigmoid with NumPy, which warns when exp(-g) overflows
# to inf; that overflow is the saturation this test is about.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_extreme_gates_stay_finite():
    # sigmoid(g) must not produce inf/NaN where exp(-g) overflows fp32.
    gate = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4])
    up = torch.ones(7)
    dh = torch.ones(7)
    g64 = gate.double()
    assert_close(OP, "h extreme", swiglu_forward(gate, up), reference_swiglu(g64, up.double()),
                 **TOLERANCE[torch.float32])
    dgate, dup = swiglu_backward(dh, gate, up)
    dgate_ref, dup_ref = reference_swiglu_backward(dh.double(), g64, up.double())
    assert_close(OP, "dgate extreme", dgate, dgate_ref, **TOLERANCE[torch.float32])
    assert_close(OP, "dup extreme", dup, dup_ref, **TOLERANCE[torch.float32])


def test_reference_backward_matches_autograd_of_reference():
    """The oracle's closed-form backward against float64 autograd of its forward."""
    gate = (torch.randn(7, 33, dtype=torch.float64) * 4).requires_grad_(True)
    up = torch.randn(7, 33, dtype=torch.float64, requires_grad=True)
    dh = torch.randn(7, 33, dtype=torch.float64)
    auto = torch.autograd.grad(reference_swiglu(gate, up), (gate, up), dh)
    closed = reference_swiglu_backward(dh, gate.detach(), up.detach())
    # Both float64 with O(10) values: only float64 rounding (1e-16) separates them.
    assert_close("swiglu_reference", "dgate", closed[0], auto[0], atol=1e-12, rtol=1e-12)
    assert_close("swiglu_reference", "dup", closed[1], auto[1], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autograd_function_against_torch_autograd(dtype):
    gate, up, dh = make_inputs((2, 19, 37), dtype)
    gate.requires_grad_(True)
    up.requires_grad_(True)
    g64 = quantized(gate, dtype).requires_grad_(True)
    u64 = quantized(up, dtype).requires_grad_(True)
    h = swiglu_op(gate, up)
    h_ref = reference_swiglu(g64, u64)
    assert_close(OP, "autograd h", h, h_ref, **TOLERANCE[dtype])
    dgate, dup = torch.autograd.grad(h, (gate, up), dh)
    dgate_ref, dup_ref = torch.autograd.grad(h_ref, (g64, u64), quantized(dh, dtype))
    assert_close(OP, "autograd dgate", dgate, dgate_ref, **TOLERANCE[dtype])
    assert_close(OP, "autograd dup", dup, dup_ref, **TOLERANCE[dtype])


def test_autograd_accepts_non_contiguous_incoming_gradient():
    # .sum() hands backward an expanded (stride 0) gradient of ones.
    gate = torch.randn(37, 99, requires_grad=True)
    up = torch.randn(37, 99)
    swiglu_op(gate, up).sum().backward()
    g64 = gate.detach().double().requires_grad_(True)
    reference_swiglu(g64, up.double()).sum().backward()
    assert_close(OP, "dgate from sum()", gate.grad, g64.grad, **TOLERANCE[torch.float32])


def test_bad_arguments_raise_value_error():
    gate, up, dh = make_inputs((5, 8), torch.float32)
    with pytest.raises(ValueError, match="'up'.*shape"):
        swiglu_forward(gate, torch.randn(5, 7))
    with pytest.raises(ValueError, match="'up'.*dtype"):
        swiglu_forward(gate, up.half())
    with pytest.raises(ValueError, match="'gate'.*dtype"):
        swiglu_forward(gate.to(torch.int64), up.to(torch.int64))
    with pytest.raises(ValueError, match="'gate'.*contiguous"):
        swiglu_forward(torch.randn(8, 5).t(), up)
    with pytest.raises(ValueError, match="'up'.*meta"):
        swiglu_forward(gate, up.to("meta"))
    with pytest.raises(ValueError, match="'dh'.*shape"):
        swiglu_backward(dh[:4], gate, up)
    with pytest.raises(ValueError, match="'dh'.*dtype"):
        swiglu_backward(dh.to(torch.int32), gate, up)
    with pytest.raises(ValueError, match="'out'"):
        swiglu_backward(dh, gate, up, out=(dh,))
    with pytest.raises(ValueError, match="'out\\[1\\]'.*shape"):
        swiglu_backward(dh, gate, up, out=(dh, dh[:, :3]))
    with pytest.raises(ValueError, match="'up'.*shape"):
        swiglu_op(gate, up[:, :4].contiguous())


# ---------------------------------------------------------------- GPU only

def _bf16_parity(device, n_rows, intermediate):
    dtype = torch.bfloat16
    gate = (torch.randn(n_rows, intermediate, device=device) * 4).to(dtype)
    up = torch.randn(n_rows, intermediate, device=device).to(dtype)
    dh = torch.randn(n_rows, intermediate, device=device).to(dtype)
    g64, u64, dh64 = (quantized(t, dtype) for t in (gate, up, dh))
    # bf16 keeps 8 significant bits: rtol 2^-7 is one ulp, over the half-ulp rounding
    # of a result computed in fp32; atol covers fp32 cancellation in dgate.
    bf16 = dict(atol=1e-5, rtol=2**-7)
    assert_close(OP, "bf16 h", swiglu_forward(gate, up), reference_swiglu(g64, u64), **bf16)
    dgate, dup = swiglu_backward(dh, gate, up)
    dgate_ref, dup_ref = reference_swiglu_backward(dh64, g64, u64)
    assert_close(OP, "bf16 dgate", dgate, dgate_ref, **bf16)
    assert_close(OP, "bf16 dup", dup, dup_ref, **bf16)


@pytest.mark.gpu
def test_bf16_parity_llama3_8b_shapes():
    # 2048 tokens through LLaMA-3-8B's MLP (intermediate size 14336).
    _bf16_parity("cuda", n_rows=2048, intermediate=14336)
