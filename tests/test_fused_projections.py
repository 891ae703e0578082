"""Projections that share an input as one NF4 matmul (csrc_triton.nf4_concat,
lora_linear_fused_*) and the SwiGLU backward epilogue, against float64 references,
fused and unfused per projection, on both backends.

Tolerances are the ones the per-projection kernels are held to (imported from
their tests): fusion changes which products share a launch, not the precision
of any product (fp32 accumulation, one rounding of each output).

The SwiGLU epilogue checks in fp16 use up to ~0.87 of their bound (rtol 2u of
matmul_tolerance): on the dequantize path the matmul's output dm is rounded to fp16
before the SwiGLU gradient and that result is rounded again, two roundings of at most
u relative each, so a correct kernel can use nearly all of 2u, never more by chance.
"""
from __future__ import annotations

import pytest
import torch

import csrc_torch
from anita_core.hf.bnb import nf4_to_state_dict
from csrc_triton.lora_linear import lora_linear_backward, lora_linear_forward
from csrc_triton.lora_linear import (lora_linear_fused_backward as fused_backward,
                                     lora_linear_fused_forward as fused_forward)
from csrc_triton.nf4_decode import nf4_dequantize
from csrc_triton.nf4_concat import concatenate_rows, segment_views
from csrc_triton.nf4_matmul import nf4_matmul_backward_input, nf4_matmul_forward
from anita_core.model.weights import LayerWeights
from tests.helpers import assert_close, quantized
from tests.reference.lora_linear import reference_lora_linear
from tests.reference.swiglu import reference_swiglu_backward
from tests.test_lora_linear import make_lora, small_matmul_tolerance
from tests.test_nf4_matmul import make_nf4_weight, matmul_tolerance

# a kernel against its float64 reference: also run under the oldest supported triton
# (tests/test_supported_tritons.py)
pytestmark = pytest.mark.kernels

OP = "fused_projections"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
# (rows per segment, K, blocksize, double quant): 300 rows x 64 = 300 blocks of 64,
# more than one nested group of 256 blocks, so a segment's groups straddle the next
# segment's first block index; K = 99 makes quantization blocks span rows.
SEGMENTS = {
    "qkv-like-double64": ((48, 16, 16), 64, 64, True),
    "3-segments-unaligned-groups": ((300, 40, 24), 64, 64, True),
    "gate-up-like-single32": ((40, 40), 96, 32, False),
    "rows-spanning-blocks-double32": ((32, 64), 99, 32, True),
}


def segmented_weight(rows, k, blocksize, double_quant):
    pairs = [make_nf4_weight(n, k, blocksize, double_quant) for n in rows]
    return concatenate_rows([w for w, _ in pairs]), [w for w, _ in pairs], [w64 for _, w64 in pairs]


@pytest.mark.parametrize("case", list(SEGMENTS))
def test_concatenation_decodes_to_the_segments_and_shares_storage(case):
    rows, k, blocksize, double_quant = SEGMENTS[case]
    fused, weights, _ = segmented_weight(rows, k, blocksize, double_quant)
    want = torch.cat([nf4_dequantize(w, torch.float32) for w in weights])
    assert torch.equal(nf4_dequantize(fused, torch.float32).view(want.shape), want)
    assert torch.equal(csrc_torch.dequantize_fp32(fused), want)
    assert fused.nbytes() <= sum(w.nbytes() for w in weights)
    for view, w in zip(segment_views(fused), weights):
        assert torch.equal(nf4_dequantize(view, torch.float32), nf4_dequantize(w, torch.float32))
        assert view.packed.untyped_storage().data_ptr() == fused.packed.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="concatenates"):
        nf4_to_state_dict(fused, "model.layers.0.self_attn.qkv_proj.")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SEGMENTS))
@pytest.mark.parametrize("path", ["fused", "dequant"])
def test_nf4_matmul_on_a_concatenation(dtype, case, path):
    rows, k, blocksize, double_quant = SEGMENTS[case]
    fused, _, w64s = segmented_weight(rows, k, blocksize, double_quant)
    w64 = torch.cat(w64s)
    x, dy = torch.randn(37, k).to(dtype), torch.randn(37, sum(rows)).to(dtype)
    x64, dy64 = quantized(x, dtype), quantized(dy, dtype)
    assert_close(OP, "forward", nf4_matmul_forward(x, fused, path=path), x64 @ w64.t(),
                 **dict(zip(("atol", "rtol"), matmul_tolerance(dtype, x64, w64.t()))))
    assert_close(OP, "backward_input", nf4_matmul_backward_input(dy, fused, path=path), dy64 @ w64,
                 **dict(zip(("atol", "rtol"), matmul_tolerance(dtype, dy64, w64))))


def reference_group(x64, w64s, adapters64, scale, dy64s):
    """Float64 outputs and gradients of each projection on its own."""
    x64 = x64.detach().clone().requires_grad_()
    outs, grads = [], []
    for w64, pair, dy64 in zip(w64s, adapters64, dy64s):
        if pair is None:
            y64 = x64 @ w64.t()
            outs.append(y64.detach())
            grads.append(None)
            (y64 * dy64).sum().backward()
            continue
        a64, b64 = (t.detach().clone().requires_grad_() for t in pair)
        y64 = reference_lora_linear(x64, w64, a64, b64, scale, None, 0.0)
        (y64 * dy64).sum().backward()
        outs.append(y64.detach())
        grads.append((a64.grad, b64.grad))
    return outs, x64.grad, grads


FUSED_LORA_CASES = {
    # (segments case, which segments carry an adapter, rank, fp32 LoRA weights)
    "qkv-all-adapted": ("qkv-like-double64", (True, True, True), 8, True),
    "qkv-k-without-adapter": ("qkv-like-double64", (True, False, True), 4, False),
    "unaligned-groups-rank5": ("3-segments-unaligned-groups", (True, True, True), 5, True),
    "gate-up-single": ("gate-up-like-single32", (True, True), 16, False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(FUSED_LORA_CASES))
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_lora_matches_unfused_and_float64(dtype, case, backend):
    segments_case, adapted, rank, fp32_lora = FUSED_LORA_CASES[case]
    rows, k, blocksize, double_quant = SEGMENTS[segments_case]
    fused, weights, w64s = segmented_weight(rows, k, blocksize, double_quant)
    lora_dtype = torch.float32 if fp32_lora else dtype
    adapters = [make_lora(n, k, rank, lora_dtype) if on else None for n, on in zip(rows, adapted)]
    scale = 0.75
    x = torch.randn(37, k).to(dtype)
    dys = [torch.randn(37, n).to(dtype) for n in rows]
    forward, backward = ((fused_forward, fused_backward) if backend == "triton" else
                         (csrc_torch.lora_linear_fused_forward, csrc_torch.lora_linear_fused_backward))
    y, ctx = forward(x, fused, adapters, scale)
    dx, grads = backward(torch.cat(dys, dim=1), x, fused, adapters, scale, ctx)

    x64 = quantized(x, dtype)
    adapters64 = [None if p is None else tuple(quantized(t, t.dtype) for t in p) for p in adapters]
    outs64, dx64, grads64 = reference_group(x64, w64s, adapters64, scale,
                                            [quantized(d, dtype) for d in dys])
    w64 = torch.cat(w64s)
    atol, rtol = matmul_tolerance(dtype, x64, w64.t())
    assert_close(OP, "fused forward", y, torch.cat(outs64, dim=1), atol=atol, rtol=rtol)
    atol, rtol = matmul_tolerance(dtype, quantized(torch.cat(dys, dim=1), dtype), w64)
    assert_close(OP, "fused dx", dx, dx64, atol=atol, rtol=rtol)
    atol, rtol = small_matmul_tolerance(lora_dtype)
    for s, (got, want) in enumerate(zip(grads, grads64)):
        assert (got is None) == (want is None), f"segment {s}: adapter gradients present/absent"
        if got is not None:
            assert (got[0].dtype, got[1].dtype) == (lora_dtype, lora_dtype)
            assert_close(OP, f"fused dA[{s}]", got[0], want[0], atol=atol, rtol=rtol)
            assert_close(OP, f"fused dB[{s}]", got[1], want[1], atol=atol, rtol=rtol)

    # unfused, one projection at a time on the segment views: the same reference
    if backend == "triton":
        for s, (view, pair, dy) in enumerate(zip(segment_views(fused), adapters, dys)):
            if pair is None:
                continue
            y_s, ctx_s = lora_linear_forward(x, view, *pair, scale, 0.0, True, None)
            _, da, db = lora_linear_backward(dy, x, view, *pair, scale, ctx_s)
            atol, rtol = matmul_tolerance(dtype, x64, w64s[s].t())
            assert_close(OP, f"unfused forward[{s}]", y_s, outs64[s], atol=atol, rtol=rtol)
            atol, rtol = small_matmul_tolerance(lora_dtype)
            assert_close(OP, f"unfused dA[{s}]", da, grads64[s][0], atol=atol, rtol=rtol)
            assert_close(OP, f"unfused dB[{s}]", db, grads64[s][1], atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,path", [("triton", "fused"), ("triton", "dequant"),
                                          ("torch", "dequant")])   # torch: one path only
@pytest.mark.parametrize("layout", ["halves", "separate"])
def test_swiglu_epilogue_of_the_input_gradient(dtype, path, backend, layout):
    """dgate, dup of the down projection's input silu(gate) * up, from its dX. ``halves``:
    gate and up as the two halves of one [m, 2k] buffer (the fused gate/up output, read
    through its row stride), as the model passes them."""
    m, k, n = 37, 64, 48          # down projection [n, k]: its input is silu(gate) * up, [m, k]
    w, w64 = make_nf4_weight(n, k, 64, True)
    if layout == "halves":
        gate_up = torch.randn(m, 2 * k).to(dtype)
        gate, up = gate_up[:, :k], gate_up[:, k:]
    else:
        gate, up = torch.randn(m, k).to(dtype), torch.randn(m, k).to(dtype)
    dy = torch.randn(m, n).to(dtype)
    a, b = make_lora(n, k, 8, torch.float32)
    if backend == "triton":
        plain = nf4_matmul_backward_input(dy, w, path=path, swiglu_input=(gate, up))
        x = gate.contiguous()     # (any [m, k] input of the LoRA: only its products matter)
        _, ctx = lora_linear_forward(x, w, a, b, 0.5, 0.0, True, None, path=path)
        lora, _, _ = lora_linear_backward(dy, x, w, a, b, 0.5, ctx, path=path,
                                          swiglu_input=(gate, up))
    else:
        plain = csrc_torch.nf4_matmul_backward_input(dy, w, swiglu_input=(gate, up))
        x = gate.contiguous()
        _, ctx = csrc_torch.lora_linear_forward(x, w, a, b, 0.5, 0.0, True, None)
        lora, _, _ = csrc_torch.lora_linear_backward(dy, x, w, a, b, 0.5, ctx,
                                                     swiglu_input=(gate, up))
    dy64, g64, u64 = (quantized(t, dtype) for t in (dy, gate, up))
    # the matmul's fp32 tile feeds the SwiGLU gradient unrounded: the reference takes
    # dm in float64, and the output is rounded once (matmul_tolerance's rtol 2u)
    for name, dm64 in (("plain", dy64 @ w64), ("lora", dy64 @ w64 + 0.5 * (dy64 @ b.double()) @ a.double())):
        d_gate64, d_up64 = reference_swiglu_backward(dm64, g64, u64)
        got = plain if name == "plain" else lora
        atol, rtol = matmul_tolerance(dtype, dy64, w64)
        scale = 1.0 + float(u64.abs().max() + g64.abs().max())   # |d/dm| of the SwiGLU gradients
        assert got.shape == (m, 2 * k) and got.dtype == dtype
        assert_close(OP, f"swiglu {name} dgate", got[:, :k], d_gate64, atol=atol * scale, rtol=rtol)
        assert_close(OP, f"swiglu {name} dup", got[:, k:], d_up64, atol=atol * scale, rtol=rtol)


def test_layer_weights_fuse_at_construction_without_a_second_copy():
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    shapes = ((48, 64), (16, 64), (16, 64), (64, 48), (96, 64), (96, 64), (64, 96))
    projections = {p: make_nf4_weight(n, k, 64, True)[0] for p, (n, k) in zip(names, shapes)}
    before = {p: nf4_dequantize(w, torch.float32) for p, w in projections.items()}
    total = sum(w.nbytes() for w in projections.values())
    layer = LayerWeights(torch.ones(64), torch.ones(64), dict(projections))
    assert set(layer.fused) == {"qkv_proj", "gate_up_proj"}
    for p, want in before.items():
        assert torch.equal(nf4_dequantize(layer.projections[p], torch.float32), want), p
    storages = {}
    for w in list(layer.projections.values()) + list(layer.fused.values()):
        storages[w.packed.untyped_storage().data_ptr()] = w.packed.untyped_storage().nbytes()
    # packed bytes live once: q/k/v share one storage, gate/up another
    assert sum(storages.values()) == sum(w.packed.numel() for w in projections.values())
    held = sum(w.nbytes() for g, w in layer.fused.items()) + sum(
        layer.projections[p].nbytes() for p in ("o_proj", "down_proj"))
    # code tables are shared, not duplicated; the offsets grow from 3 scalars to one [3]
    assert held <= total


def test_fused_launchers_refuse_bad_arguments():
    w, _ = make_nf4_weight(32, 64, 64, True)
    fused = concatenate_rows([w, make_nf4_weight(16, 64, 64, True)[0]])
    x = torch.randn(5, 64)
    pair = make_lora(32, 64, 4, torch.float32)
    for forward in (fused_forward, csrc_torch.lora_linear_fused_forward):
        with pytest.raises(ValueError, match="row concatenation"):
            forward(x, w, [pair, None], 1.0)
        with pytest.raises(ValueError, match="'adapters' has 1 entries"):
            forward(x, fused, [pair], 1.0)
        with pytest.raises(ValueError, match="no adapter"):
            forward(x, fused, [None, None], 1.0)
    with pytest.raises(ValueError, match="K and blocksize must agree"):
        concatenate_rows([w, make_nf4_weight(16, 32, 64, True)[0]])
    with pytest.raises(ValueError, match="swiglu_input"):
        nf4_matmul_backward_input(torch.randn(5, 32), w, swiglu_input=(x, x[:, :3]))


# ---------------------------------------------------------------- GPU: bf16, M <= 192
# The fused NF4 kernel (M <= 192: generation, evaluation, small DPO batches) on a
# segmented weight with the LoRA epilogue, and with the SwiGLU epilogue, at
# LLaMA-3-8B shapes. Tolerances: matmul_tolerance of the NF4 product plus
# low_precision_lora_tolerances of the rank-r products (tests/test_lora_linear.py).
# test_gpu_checks_run_on_the_cpu runs the same checks at small shapes in fp16.

QKV_8B = ((4096, 1024, 1024), 4096)


def check_fused_qkv_lora(rows, k, m, *, device="cuda", dtype=torch.bfloat16, scale=0.5, rank=32):
    from csrc_triton.nf4_dense import choose_path
    from tests.test_lora_linear import low_precision_lora_tolerances, nf4_weight_and_value
    assert choose_path("lora_linear_fused", m, dtype=dtype) == "fused"
    pairs = [nf4_weight_and_value(n, k, device) for n in rows]
    fused = concatenate_rows([w for w, _ in pairs])
    w64s = [w64 for _, w64 in pairs]
    adapters = [tuple(t.to(device) for t in make_lora(n, k, rank, torch.float32)) for n in rows]
    x = torch.randn(m, k, device=device).to(dtype)
    dys = [(torch.randn(m, n, device=device) / n ** 0.5).to(dtype) for n in rows]
    y, ctx = fused_forward(x, fused, adapters, scale)
    dx, grads = fused_backward(torch.cat(dys, dim=1), x, fused, adapters, scale, ctx)

    x64 = quantized(x, dtype)
    dy64s = [quantized(d, dtype) for d in dys]
    adapters64 = [tuple(t.double() for t in p) for p in adapters]
    outs64, dx64, grads64 = reference_group(x64, w64s, adapters64, scale, dy64s)
    extra_dx, first = 0.0, 0
    for s, (n, (a64, b64), dy64) in enumerate(zip(rows, adapters64, dy64s)):
        lora_y, lora_dx, atol_da, atol_db = low_precision_lora_tolerances(
            x64, dy64, a64, b64, scale, 1.0, m, n, k, dtype)
        extra_dx += lora_dx
        atol, rtol = matmul_tolerance(dtype, x64, w64s[s].t())
        assert_close(OP, "low precision fused forward", y[:, first:first + n], outs64[s],
                     atol=atol + lora_y, rtol=rtol)
        assert_close(OP, "low precision fused dA", grads[s][0], grads64[s][0], atol=atol_da, rtol=0.0)
        assert_close(OP, "low precision fused dB", grads[s][1], grads64[s][1], atol=atol_db, rtol=0.0)
        first += n
    atol, rtol = matmul_tolerance(dtype, torch.cat(dy64s, dim=1), torch.cat(w64s))
    assert_close(OP, "low precision fused dx", dx, dx64, atol=atol + extra_dx, rtol=rtol)


def check_swiglu_epilogue(n, k, m, *, device="cuda", dtype=torch.bfloat16):
    """The down projection's input gradient with the SwiGLU backward in its epilogue."""
    from tests.test_lora_linear import nf4_weight_and_value
    w, w64 = nf4_weight_and_value(n, k, device)
    gate, up = (torch.randn(m, k, device=device).to(dtype) for _ in range(2))
    dy = (torch.randn(m, n, device=device) / n ** 0.5).to(dtype)
    got = nf4_matmul_backward_input(dy, w, path="fused", swiglu_input=(gate, up))
    dy64, g64, u64 = (quantized(t, dtype) for t in (dy, gate, up))
    d_gate64, d_up64 = reference_swiglu_backward(dy64 @ w64, g64, u64)
    atol, rtol = matmul_tolerance(dtype, dy64, w64)
    scale = 1.0 + float(u64.abs().max() + g64.abs().max())   # |d/dm| of the SwiGLU gradients
    assert got.shape == (m, 2 * k) and got.dtype == dtype
    assert_close(OP, "swiglu epilogue dgate", got[:, :k], d_gate64, atol=atol * scale, rtol=rtol)
    assert_close(OP, "swiglu epilogue dup", got[:, k:], d_up64, atol=atol * scale, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 192])
def test_gpu_bf16_fused_qkv_lora_at_small_m(m):
    check_fused_qkv_lora(*QKV_8B, m)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 192])
def test_gpu_bf16_swiglu_epilogue_at_small_m(m):
    check_swiglu_epilogue(4096, 14336, m)


def test_gpu_checks_run_on_the_cpu():
    check_fused_qkv_lora((48, 16, 16), 64, 7, device="cpu", dtype=torch.float16)
    check_swiglu_epilogue(48, 64, 7, device="cpu", dtype=torch.float16)
