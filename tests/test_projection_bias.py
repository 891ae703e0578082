"""The frozen projection bias (Qwen2's q/k/v) of nf4_matmul and lora_linear, against float64.

y = x W^T + b (+ the LoRA term), b [N] in x's dtype, frozen: the backward is the one
without a bias (dL/dx = dY W (+ LoRA), no dL/db). Checked on both paths of the Triton
backend (the fused kernel's HAS_BIAS epilogue, the dequantize path's addmm), forced
one at a time, and on the torch backend; outputs are poisoned (conftest).

Tolerances: those of the matmul without a bias (tests/test_nf4_matmul.matmul_tolerance).
Every implementation widens b (exact in fp32) and adds it to the fp32 accumulator before
the one rounding of y, which adds at most one fp32 rounding, u32 |y| ~ 6e-8 |y|, far
inside the fp32 atol (1e-4) and the rtol (2u of y's dtype) that already cover y.
"""
from __future__ import annotations

import pytest
import torch

import csrc_torch
from csrc_triton.lora_linear import (lora_linear_op, lora_linear_backward, lora_linear_forward,
                                     lora_linear_fused_backward, lora_linear_fused_forward)
from csrc_triton.nf4_concat import concatenate_rows
from csrc_triton.nf4_matmul import nf4_matmul_forward, nf4_matmul_op
from tests.helpers import assert_close, quantized
from tests.reference.lora_linear import reference_lora_linear
from tests.test_lora_linear import make_lora
from tests.test_nf4_matmul import make_nf4_weight, matmul_tolerance

pytestmark = pytest.mark.kernels

OP = "projection_bias"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
# M = 1 (one token decoding), 3, 37 (odd, several rows of the interpreter's tile).
MS = [1, 3, 37]
# (K, N, blocksize, double quant): K = 99 odd, N = 91 odd and N*K odd (blocks span
# rows, the last byte half used); K = 128 row-aligned with N = 45 odd.
WEIGHTS = {"99x91-bs64-single": (99, 91, 64, False), "128x45-bs64-double": (128, 45, 64, True)}
# (backend, path): the Triton backend's two paths, each forced, and the torch backend
BACKENDS = [("triton", "fused"), ("triton", "dequant"), ("torch", None)]
BACKEND_IDS = ["triton-fused", "triton-dequant", "torch"]


def launchers(backend: str):
    if backend == "triton":
        return nf4_matmul_forward, lora_linear_forward
    return csrc_torch.nf4_matmul_forward, csrc_torch.lora_linear_forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("weight", list(WEIGHTS))
@pytest.mark.parametrize("backend,path", BACKENDS, ids=BACKEND_IDS)
def test_forward_with_bias_against_float64(dtype, m, weight, backend, path):
    k, n, blocksize, double_quant = WEIGHTS[weight]
    w, w64 = make_nf4_weight(n, k, blocksize, double_quant)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    x64, b64 = quantized(x, dtype), quantized(bias, dtype)
    atol, rtol = matmul_tolerance(dtype, x64, w64.t())
    matmul_forward, lora_forward = launchers(backend)

    y = matmul_forward(x, w, path=path, bias=bias)
    assert y.dtype == dtype
    assert_close(OP, "nf4_matmul forward", y, x64 @ w64.t() + b64, atol=atol, rtol=rtol)

    a, b = make_lora(n, k, 5, torch.float32)
    y, ctx = lora_forward(x, w, a, b, 0.75, 0.25, True, None, path=path, bias=bias)
    want = reference_lora_linear(x64, w64, a.double(), b.double(), 0.75, ctx.keep_mask, 0.25)
    assert_close(OP, "lora_linear forward", y, want + b64, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_m", ["0", "192"], ids=["dequant", "fused"])
def test_autograd_with_bias_dx_unchanged(dtype, max_m, monkeypatch):
    """The autograd Functions with a bias: y against float64, and dX (and dA, dB) exactly
    those of the same call without the bias (the backward never sees it)."""
    monkeypatch.setenv("ANITA_NF4_FUSED_MAX_M", max_m)    # which path M = 2 * 19 takes
    w, w64 = make_nf4_weight(45, 77, 64, True)
    bias = torch.randn(45).to(dtype)
    x = torch.randn(2, 19, 77).to(dtype)
    dy = torch.randn(2, 19, 45).to(dtype)
    x64, b64 = quantized(x, dtype), quantized(bias, dtype)
    atol, rtol = matmul_tolerance(dtype, x64.reshape(-1, 77), w64.t())

    grads = {}
    for with_bias in (True, False):
        xg = x.clone().requires_grad_()
        y = nf4_matmul_op(xg, w, bias if with_bias else None)
        grads["nf4", with_bias] = torch.autograd.grad(y, xg, dy)
        if with_bias:
            assert_close(OP, "autograd nf4_matmul y", y, x64 @ w64.t() + b64, atol=atol, rtol=rtol)
    assert torch.equal(grads["nf4", True][0], grads["nf4", False][0])

    a, b = make_lora(45, 77, 4, torch.float32)
    for with_bias in (True, False):
        xg, ag, bg = x.clone().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()
        generator = torch.Generator().manual_seed(7)      # the same dropout mask both times
        y = lora_linear_op(xg, w, ag, bg, 0.5, 0.2, True, generator, bias if with_bias else None)
        grads["lora", with_bias] = torch.autograd.grad(y, (xg, ag, bg), dy)
    for got, want in zip(grads["lora", True], grads["lora", False]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,path", BACKENDS, ids=BACKEND_IDS)
def test_concatenated_qkv_bias(dtype, backend, path):
    """q/k/v as one matmul: the bias of the concatenation is [b_q; b_k; b_v]; each segment
    of y is its own projection with its own bias, and dX is the one without a bias."""
    rows, k = (48, 16, 16), 64
    pairs = [make_nf4_weight(n, k, 64, True) for n in rows]
    fused = concatenate_rows([w for w, _ in pairs])
    biases = [torch.randn(n).to(dtype) for n in rows]
    adapters = [make_lora(n, k, 4, torch.float32) for n in rows]
    forward, backward = ((lora_linear_fused_forward, lora_linear_fused_backward)
                         if backend == "triton" else
                         (csrc_torch.lora_linear_fused_forward, csrc_torch.lora_linear_fused_backward))
    x = torch.randn(37, k).to(dtype)
    dy = torch.randn(37, sum(rows)).to(dtype)
    y, ctx = forward(x, fused, adapters, 0.75, path=path, bias=torch.cat(biases))

    x64 = quantized(x, dtype)
    want = torch.cat([reference_lora_linear(x64, w64, a.double(), b.double(), 0.75)
                      + quantized(bias, dtype)
                      for (_, w64), (a, b), bias in zip(pairs, adapters, biases)], dim=1)
    w64 = torch.cat([w64 for _, w64 in pairs])
    atol, rtol = matmul_tolerance(dtype, x64, w64.t())
    assert_close(OP, "qkv forward", y, want, atol=atol, rtol=rtol)

    _, ctx_plain = forward(x, fused, adapters, 0.75, path=path)
    dx, grads = backward(dy, x, fused, adapters, 0.75, ctx, path=path)
    dx_plain, grads_plain = backward(dy, x, fused, adapters, 0.75, ctx_plain, path=path)
    assert torch.equal(dx, dx_plain)
    for got, want in zip(grads, grads_plain):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_bias_is_refused_naming_it(backend):
    w, _ = make_nf4_weight(45, 64, 64, False)
    x = torch.randn(3, 64)
    a, b = make_lora(45, 64, 4, torch.float32)
    matmul_forward, lora_forward = launchers(backend)
    bad = {"length": torch.randn(44), "dtype": torch.randn(45, dtype=torch.float64),
           "2-D": torch.randn(1, 45), "device": torch.randn(45, device="meta"),
           "non-contiguous": torch.randn(90)[::2], "not a tensor": [0.0] * 45}
    for what, bias in bad.items():
        for call in (lambda: matmul_forward(x, w, bias=bias),
                     lambda: lora_forward(x, w, a, b, 1.0, 0.0, True, None, bias=bias)):
            with pytest.raises(ValueError, match="argument 'bias'") as error:
                call()
            assert "\n" not in str(error.value), what


def test_trainable_bias_is_refused():
    w, _ = make_nf4_weight(45, 64, 64, False)
    x = torch.randn(3, 64, requires_grad=True)
    a, b = make_lora(45, 64, 4, torch.float32)
    bias = torch.randn(45, requires_grad=True)
    with pytest.raises(ValueError, match="argument 'bias' requires grad"):
        nf4_matmul_op(x, w, bias)
    with pytest.raises(ValueError, match="argument 'bias' requires grad"):
        lora_linear_op(x, w, a, b, 1.0, 0.0, True, None, bias)
    # detached, it is accepted and gets no gradient
    y = nf4_matmul_op(x, w, bias.detach())
    y.sum().backward()
    assert bias.grad is None and x.grad is not None


def test_fused_bias_refused_in_the_fused_launchers_too():
    pairs = [make_nf4_weight(n, 64, 64, False) for n in (16, 8)]
    fused = concatenate_rows([w for w, _ in pairs])
    adapters = [make_lora(n, 64, 2, torch.float32) for n in (16, 8)]
    x = torch.randn(3, 64)
    for forward in (lora_linear_fused_forward, csrc_torch.lora_linear_fused_forward):
        with pytest.raises(ValueError, match="argument 'bias' has shape"):
            forward(x, fused, adapters, 1.0, bias=torch.randn(16))   # b_q alone, not [b_q; b_k]
