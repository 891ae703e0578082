"""nf4_matmul (forward y = x W^T, backward dX = dY W) against the float64 reference."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from csrc_triton import _runtime
from csrc_triton.nf4 import NF4Weight
from csrc_triton.nf4_matmul import (nf4_matmul_op, nf4_matmul_backward_input,
                                    nf4_matmul_forward)
from tests.helpers import assert_close, bitsandbytes_functional, quantized
from tests.reference.lora_linear import reference_double_quantize, reference_nf4_matmul
from tests.reference.nf4 import reference_nf4_dequantize, reference_nf4_quantize

# a kernel against its float64 reference: also run under the oldest supported triton
# (tests/test_supported_tritons.py)
pytestmark = pytest.mark.kernels

OP = "nf4_matmul"

# fp32 results: fp32 accumulation over K <= ~300 products of size ~1 with |y| up
# to ~50 leaves rounding error ~1e-5; 1e-4 is 10x that and still 10x below the
# ~1e-3 error of rounding W or x to fp16 anywhere on the way.
FP32_ATOL, FP32_RTOL = 1e-4, 1e-5
# fp16/bf16 results, absolute part: the fp32 accumulation error above (the
# output rounding is covered by rtol).
LOW_PRECISION_ATOL = 1e-4
# Standard deviations allowed for the rounding of W to fp16/bf16 that the
# tensor-core path does (GPU only); 6 sigma stays quiet over ~1e8 elements.
W_ROUNDING_SIGMAS = 6.0


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def matmul_tolerance(dtype: torch.dtype, lhs: torch.Tensor, rhs: torch.Tensor):
    """(atol, rtol) for a kernel computing lhs @ rhs in ``dtype`` (float64 args).

    rtol = 2u: the result is rounded once to ``dtype`` (at most u relative), with
    2x headroom. On GPU, fp16/bf16 tiles go to the tensor cores with W rounded
    to ``dtype``: that adds sum_k lhs_k rhs_k delta_k with |delta_k| <= u and
    sign-random lhs, whose standard deviation is at most u * sqrt(lhs^2 @ rhs^2).
    """
    if dtype == torch.float32:
        return FP32_ATOL, FP32_RTOL
    u = unit_roundoff(dtype)
    atol = LOW_PRECISION_ATOL
    if not _runtime.DOT_IN_FP32:
        spread = (lhs.square() @ rhs.square()).sqrt().max().item()
        atol += W_ROUNDING_SIGMAS * u * spread
    return atol, 2 * u


def make_nf4_weight(n: int, k: int, blocksize: int, double_quant: bool, device="cpu"):
    """(NF4Weight, its float64 value) for a random Gaussian [n, k] weight."""
    q = reference_nf4_quantize(torch.randn(n, k), blocksize)
    if double_quant:
        q = reference_double_quantize(q)
    return q.to(device), reference_nf4_dequantize(q).to(device)


WEIGHT_KINDS = [(32, False), (64, False), (128, False), (32, True), (64, True), (256, True)]
WEIGHT_IDS = [f"bs{b}-{'double' if d else 'single'}" for b, d in WEIGHT_KINDS]


# 91x99 has an odd element count (last byte half used) and, at blocksize 32,
# 282 blocks: more than one nested-absmax group; K = 99 makes blocks span rows.
# K = 256 takes the row-aligned kernel path (blocks never span rows; blocksize
# 256 is wider than the interpreter's 128-wide K tile). The multi-tile shapes
# need several tiles in every dimension and several K (and N) loop steps; two
# weight kinds suffice there (interpreter time).
SHAPES = {"37x99x70": (37, 99, 70), "37x99x91-oddnumel": (37, 99, 91),
          "37x256x45-aligned": (37, 256, 45)}
CASES = [pytest.param(shape, kind, id=f"{name}-{kind_id}")
         for name, shape in SHAPES.items() for kind, kind_id in zip(WEIGHT_KINDS, WEIGHT_IDS)]
MULTITILE_SHAPES = {"150x261x133": (150, 261, 133), "150x384x133-aligned": (150, 384, 133)}
CASES += [pytest.param(shape, kind, id=f"{name}-multitile-{kind_id}")
          for name, shape in MULTITILE_SHAPES.items()
          for kind, kind_id in zip(WEIGHT_KINDS, WEIGHT_IDS) if kind in ((32, False), (64, True))]

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape,weight_kind", CASES)
def test_launchers_match_reference(dtype, shape, weight_kind):
    (m, k, n), (blocksize, double_quant) = shape, weight_kind
    w, w64 = make_nf4_weight(n, k, blocksize, double_quant)
    x = torch.randn(m, k).to(dtype)
    y = nf4_matmul_forward(x, w)
    assert y.dtype == dtype
    x64 = quantized(x, dtype)
    atol, rtol = matmul_tolerance(dtype, x64, w64.t())
    assert_close(OP, "forward", y, reference_nf4_matmul(x64, w64), atol=atol, rtol=rtol)

    dy = torch.randn(m, n).to(dtype)
    dx = nf4_matmul_backward_input(dy, w)
    assert dx.dtype == dtype
    dy64 = quantized(dy, dtype)
    atol, rtol = matmul_tolerance(dtype, dy64, w64)
    assert_close(OP, "backward_input", dx, dy64 @ w64, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
def test_autograd_function_matches_torch_autograd(dtype, double_quant):
    w, w64 = make_nf4_weight(45, 77, 64, double_quant)
    x = torch.randn(2, 19, 77).to(dtype).requires_grad_()
    dy = torch.randn(2, 19, 45).to(dtype)
    y = nf4_matmul_op(x, w)
    (dx,) = torch.autograd.grad(y, x, dy)

    x64 = quantized(x.detach(), dtype).requires_grad_()
    y64 = reference_nf4_matmul(x64, w64)
    (dx64,) = torch.autograd.grad(y64, x64, quantized(dy, dtype))
    atol, rtol = matmul_tolerance(dtype, x64.detach().reshape(-1, 77), w64.t())
    assert_close(OP, "autograd.forward", y, y64, atol=atol, rtol=rtol)
    atol, rtol = matmul_tolerance(dtype, quantized(dy, dtype).reshape(-1, 45), w64)
    assert_close(OP, "autograd.dx", dx, dx64, atol=atol, rtol=rtol)
    assert y.shape == (2, 19, 45) and dx.dtype == dtype


def test_non_contiguous_upstream_gradient():
    # sum() hands backward an expanded (stride-0) gradient; it must still be right.
    w, w64 = make_nf4_weight(33, 51, 32, False)
    x = torch.randn(7, 51, requires_grad=True)
    (dx,) = torch.autograd.grad(nf4_matmul_op(x, w).sum(), x)
    expected = w64.sum(dim=0).expand(7, 51)
    assert_close(OP, "autograd.dx_sum", dx, expected, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_bitsandbytes_double_quant_weight():
    bnb_functional = bitsandbytes_functional()
    w_full = torch.randn(91, 99)
    packed, state = bnb_functional.quantize_4bit(w_full, blocksize=32, compress_statistics=True,
                                                 quant_type="nf4")
    w = NF4Weight(packed=packed.reshape(-1), absmax=state.absmax, shape=w_full.shape,
                  blocksize=state.blocksize, dtype=torch.float32, code=state.code.float(),
                  nested_absmax=state.state2.absmax, nested_code=state.state2.code,
                  nested_offset=state.offset.float().reshape(()))
    w64 = reference_nf4_dequantize(w)
    # The hand-built container must describe the weight bitsandbytes encoded
    # (bnb's own dequantize_4bit costs ~9 s on first call, so compare with the
    # original): NF4 rounds each element by at most half the widest code gap
    # (0.152) times its block absmax, plus a small double-quant scale error;
    # a wrong nibble order or block mapping errs by up to 2x absmax.
    # (A fixture check, not an op output: kept out of the op's error table.)
    layout_error = (w64 - w_full.double()).abs().max().item()
    assert layout_error <= 0.2 * w_full.abs().max().item(), layout_error
    x = torch.randn(37, 99)
    assert_close(OP, "bnb_forward", nf4_matmul_forward(x, w), x.double() @ w64.t(),
                 atol=FP32_ATOL, rtol=FP32_RTOL)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

def test_rejects_bad_arguments():
    w, _ = make_nf4_weight(10, 33, 32, False)
    x = torch.randn(5, 33)
    with pytest.raises(ValueError, match="x2d.*shape"):
        nf4_matmul_forward(torch.randn(5, 32), w)            # K mismatch
    with pytest.raises(ValueError, match="x.*last dim 33"):
        nf4_matmul_op(torch.randn(2, 5, 34), w)                  # K mismatch (autograd path)
    with pytest.raises(ValueError, match="dy2d.*shape"):
        nf4_matmul_backward_input(torch.randn(5, 11), w)     # N mismatch
    with pytest.raises(ValueError, match="contiguous"):
        nf4_matmul_forward(torch.randn(33, 5).t(), w)
    with pytest.raises(ValueError, match="contiguous"):
        nf4_matmul_op(torch.randn(2, 33, 5).transpose(1, 2), w)
    with pytest.raises(ValueError, match="dtype"):
        nf4_matmul_forward(x.double(), w)
    with pytest.raises(ValueError, match="dtype"):
        nf4_matmul_op(x.to(torch.int32), w)
    with pytest.raises(ValueError, match="dims"):
        nf4_matmul_forward(x.reshape(1, 5, 33), w)
    with pytest.raises(ValueError, match="on meta"):
        nf4_matmul_forward(x.to("meta"), w)
    if torch.cuda.is_available():  # a second real device exists only on a GPU machine
        with pytest.raises(ValueError, match="device|on cpu"):
            nf4_matmul_forward(x, w.to("cuda"))
    with pytest.raises(ValueError, match="NF4Weight"):
        nf4_matmul_forward(x, torch.randn(10, 33))


def test_rejects_inconsistent_weight():
    w, _ = make_nf4_weight(10, 33, 32, False)
    x = torch.randn(5, 33)
    bad_weights = {
        "packed.*elements": replace(w, packed=w.packed[:-1]),
        "packed.*dtype": replace(w, packed=w.packed.to(torch.int8)),
        "absmax.*elements": replace(w, absmax=w.absmax[:-1]),
        "absmax.*dtype": replace(w, absmax=w.absmax.half()),
        "code.*elements": replace(w, code=w.code[:8]),
        "2-D": replace(w, shape=torch.Size([330])),
        "blocksize": replace(w, blocksize=0),
        "absmax.*on meta": replace(w, absmax=w.absmax.to("meta")),
    }
    for message, bad in bad_weights.items():
        with pytest.raises(ValueError, match=message):
            nf4_matmul_forward(x, bad)
    dq = reference_double_quantize(w)
    with pytest.raises(ValueError, match="nested_absmax.*elements"):
        nf4_matmul_forward(x, replace(dq, nested_absmax=torch.ones(2)))
    with pytest.raises(ValueError, match="absmax.*dtype"):
        nf4_matmul_forward(x, replace(dq, absmax=w.absmax))  # fp32 absmax with nested stats


# ---------------------------------------------------------------------------
# GPU: bf16 at LLaMA-3-8B shapes
# ---------------------------------------------------------------------------

def random_nf4_weight(n: int, k: int, blocksize: int, device) -> NF4Weight:
    """A double-quantized NF4Weight with random bytes and scales: every code value
    and every nested group occurs, without quantizing a 58M-element matrix."""
    n_blocks = -(-n * k // blocksize)
    return NF4Weight(
        packed=torch.randint(0, 256, ((n * k + 1) // 2,), dtype=torch.uint8, device=device),
        absmax=torch.randint(0, 256, (n_blocks,), dtype=torch.uint8, device=device),
        shape=torch.Size([n, k]), blocksize=blocksize, dtype=torch.bfloat16,
        nested_absmax=torch.rand(-(-n_blocks // 256), device=device) * 0.02 + 0.01,
        nested_code=torch.linspace(-1, 1, 256, device=device),
        nested_offset=torch.tensor(0.05, device=device))


LLAMA3_8B_PROJECTIONS = {  # (out_features N, in_features K)
    "q_proj": (4096, 4096), "k_proj": (1024, 4096), "gate_proj": (14336, 4096),
    "down_proj": (4096, 14336)}


@pytest.mark.gpu
@pytest.mark.parametrize("projection", list(LLAMA3_8B_PROJECTIONS))
def test_bf16_llama3_8b_shapes(projection):
    n, k = LLAMA3_8B_PROJECTIONS[projection]
    w = random_nf4_weight(n, k, 64, "cuda")
    w64 = reference_nf4_dequantize(w.to("cpu")).to("cuda")
    x = torch.randn(2048, k, device="cuda").to(torch.bfloat16)
    x64 = quantized(x, torch.bfloat16)
    atol, rtol = matmul_tolerance(torch.bfloat16, x64, w64.t())
    assert_close(OP, "bf16_llama3_forward", nf4_matmul_forward(x, w), x64 @ w64.t(),
                 atol=atol, rtol=rtol)
    dy = (torch.randn(2048, n, device="cuda") / math.sqrt(n)).to(torch.bfloat16)
    dy64 = quantized(dy, torch.bfloat16)
    atol, rtol = matmul_tolerance(torch.bfloat16, dy64, w64)
    assert_close(OP, "bf16_llama3_backward_input", nf4_matmul_backward_input(dy, w), dy64 @ w64,
                 atol=atol, rtol=rtol)
