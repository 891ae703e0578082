"""csrc_torch, the plain-PyTorch backend, against the float64 references of the
kernel tests and against the Triton kernels (the interpreter here) on the same inputs.

Tolerances: each op is held to the very tolerance its kernel test states against
the float64 reference (imported from that test, so they cannot drift apart). Two
results each within (atol, rtol |ref|) of the reference are within
2 atol + 2 rtol |ref| of each other, so the backend-vs-kernel comparison uses twice
the reference tolerance (|ref| and |kernel| differ only by that tolerance itself).

Built from the op records (csrc_triton/records.py): every mirror has every launcher
of its record with the kernel's parameters, every mirrored family names a parity
check, and test_parity runs each record's check (``<family>_parity(dtype)`` below,
or in a new family's own test file) in fp32 and fp16.
"""
from __future__ import annotations

import inspect

import pytest
import torch

import csrc_torch
from anita_core.model.rope_scaling import llama3_scaling
from csrc_torch import nf4 as torch_nf4
from csrc_triton import linear_loss as tl_loss
from csrc_triton import lora_linear as tl_lora
from csrc_triton import nf4_matmul as tl_nf4_matmul
from csrc_triton import rms_norm as tl_rms
from csrc_triton import rope as tl_rope
from csrc_triton import swiglu as tl_swiglu
from csrc_triton.nf4_decode import nf4_dequantize
from csrc_triton.records import all_records, resolve
from csrc_triton.nf4_encode import nf4_quantize
from tests.helpers import assert_close, quantized
from tests.reference.losses import reference_linear_cross_entropy
from tests.reference.rms_norm import reference_rms_norm, reference_rms_norm_backward
from tests.reference.rope import reference_rope
from tests.reference.swiglu import reference_swiglu, reference_swiglu_backward
from tests.test_cross_entropy import random_labels
from tests.test_linear_loss import Reference as LossReference
from tests.test_linear_loss import make_inputs as loss_inputs
from tests.test_lora_linear import make_lora, reference_with_grads, small_matmul_tolerance
from tests.test_nf4_matmul import (WEIGHT_IDS, WEIGHT_KINDS, make_nf4_weight, matmul_tolerance)
from tests.test_rms_norm import EPS, RSTD_TOLERANCE, dw_tolerance
from tests.test_rms_norm import TOLERANCE as RMS_TOLERANCE
from tests.test_rms_norm import make_inputs as rms_inputs
from tests.test_rope import LLAMA3_SCALING, LLAMA3_THETA, MAX_POSITION
from tests.test_rope import TOLERANCE as ROPE_TOLERANCE
from tests.test_rope import make_inputs as rope_inputs
from tests.test_swiglu import TOLERANCE as SWIGLU_TOLERANCE
from tests.test_swiglu import make_inputs as swiglu_inputs

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def check(op, name, ours, kernel, reference, *, atol, rtol):
    """ours within (atol, rtol) of the float64 reference, and within twice that of
    the Triton kernel's result on the same inputs (module docstring)."""
    assert ours.dtype == kernel.dtype, f"{op}/{name}: dtype {ours.dtype} != kernel's {kernel.dtype}"
    assert_close(f"torch:{op}", name, ours, reference, atol=atol, rtol=rtol)
    assert_close(f"torch:{op}", f"{name} vs triton", ours, kernel, atol=2 * atol, rtol=2 * rtol)


RECORDS = all_records()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("record", [r for r in RECORDS if r.parity], ids=lambda r: r.name)
def test_parity(record, dtype):
    resolve(record.parity)(dtype)


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_each_mirror_has_its_records_launchers(record):
    if record.torch_mirror is None:
        assert record.parity is None, f"{record.name}: a parity check but no mirror"
        return
    assert record.parity, f"{record.name}: a torch mirror but no parity check in its record"
    mirror = resolve(record.torch_mirror)
    for launcher in record.launchers:
        ours = getattr(mirror, launcher.__name__, None)
        assert callable(ours), f"{record.torch_mirror} lacks {launcher.__name__}"
        # the mirror accepts every argument the kernel's launcher takes, by the same name
        # (a leading underscore marks a kernel-only test hook)
        kernel_params = inspect.signature(launcher).parameters
        mirror_params = inspect.signature(ours).parameters
        missing = [n for n in kernel_params if n not in mirror_params and not n.startswith("_")]
        assert not missing, f"{record.torch_mirror}.{launcher.__name__} lacks {missing}"


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_each_records_paths_resolve(record):
    """What a record names by dotted path exists (resolved without running it): its
    reference module, parity check, bench and compile specs."""
    for field in ("reference", "parity", "bench", "compile_specs"):
        path = getattr(record, field)
        if path is not None:
            assert resolve(path) is not None, (record.name, field, path)
    assert record.reference, f"{record.name}: no float64 reference named"


def test_model_ops_dispatch_whole_mirrored_families():
    """anita_core.model.ops dispatches only mirrored launchers, every launcher of each
    family it uses (a launcher added to a used family is not missed; a family the model
    does not call needs no entry), and each one reads that name from both backends'
    modules (its code names it)."""
    from anita_core.model import ops
    seam = {"default_backend", "active_backend", "set_backend", "use_backend"}
    defined = {name for name, fn in vars(ops).items()
               if inspect.isfunction(fn) and fn.__module__ == ops.__name__
               and not name.startswith("_") and name not in seam}
    mirrored = [set(r.launcher_names) for r in RECORDS if r.torch_mirror]
    assert defined <= set().union(*mirrored), sorted(defined - set().union(*mirrored))
    used = [names for names in mirrored if names & defined]
    assert {"rms_norm_forward", "flash_attention_forward", "lora_linear_forward"} <= defined
    assert all(names <= defined for names in used), [sorted(n - defined) for n in used]
    for name in defined:
        assert name in getattr(ops, name).__code__.co_names, f"ops.{name} runs another launcher"


# ------------------------------------------------------------------------ NF4

@pytest.mark.parametrize("shape", [(37, 99), (91, 99), (45, 256)], ids=["37x99", "91x99-odd", "45x256"])
@pytest.mark.parametrize("weight_kind", WEIGHT_KINDS, ids=WEIGHT_IDS)
def test_dequantize_is_bit_identical_to_the_kernel(shape, weight_kind):
    torch_nf4.clear_dequant_cache()
    w, w64 = make_nf4_weight(*shape, *weight_kind)
    ours = csrc_torch.dequantize_fp32(w)
    assert ours.dtype == torch.float32 and ours.shape == w.shape
    # code * absmax is one fp32 rounding of the float64 value (double quant: the
    # absmax itself is a rounded product and sum, exactly as the kernel rounds it)
    assert torch.equal(ours, nf4_dequantize(w, torch.float32)), "differs from the NF4 kernel"
    assert_close("torch:nf4_dequantize", "w", ours, w64, atol=0.0, rtol=1e-6)


@pytest.mark.parametrize("shape", [(37, 99), (91, 99), (5, 7), (300, 257)],
                         ids=["37x99", "91x99-odd", "5x7-partial", "300x257-zero-columns"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_quantize_gives_the_kernels_bytes(shape, double_quant, blocksize):
    w = (torch.randn(shape) * 3).to(torch.float16 if blocksize == 32 else torch.float32)
    w[:, :3] = 0                       # all-zero blocks and a zero partial block
    ours = csrc_torch.nf4_quantize(w, blocksize, double_quant)
    kernel = nf4_quantize(w, blocksize, double_quant)
    for field in ("packed", "absmax", "nested_absmax", "nested_code", "nested_offset", "code"):
        a, b = getattr(ours, field), getattr(kernel, field)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), field
    assert (ours.shape, ours.blocksize, ours.dtype) == (kernel.shape, kernel.blocksize, kernel.dtype)
    with pytest.raises(ValueError, match="blocksize"):
        csrc_torch.nf4_quantize(w, 48)


@pytest.mark.parametrize("blocksize", [32, 256])
def test_quantize_on_and_near_midpoints_and_table_edges(blocksize):
    """The last-bit cases random data misses (probes of tests/test_nf4.py): values on
    NF4 midpoints in full and partial blocks, and nested values a few ulps around
    every step of bitsandbytes' 65536-entry table."""
    from csrc_triton.nf4_codebook import signed_dynamic_map
    from csrc_triton.nf4_encode import launch_dynamic_quantize
    from tests.test_nf4 import _midpoint_probes

    for scale in (1.0, 0.3, 5.9):
        s, _, probes = _midpoint_probes(scale)
        for partial_probes in probes.split(blocksize - 2)[:4]:
            w = torch.cat([s[None], probes[: blocksize - 1], s[None], partial_probes])[None, :]
            ours, kernel = csrc_torch.nf4_quantize(w, blocksize), nf4_quantize(w, blocksize)
            assert torch.equal(ours.packed, kernel.packed) and torch.equal(ours.absmax,
                                                                           kernel.absmax)
    dynamic_map = signed_dynamic_map()
    midpoints = (dynamic_map[:-1] + dynamic_map[1:]) * 0.5
    table = torch.searchsorted(midpoints, (2.0 * torch.arange(65536.0)) / 65535.0 - 1.0)
    steps = torch.nonzero(table[1:] != table[:-1]).reshape(-1) + 1
    edges = (-1.0 + 2.0 * (steps.double() - 0.5) / 65535.0).float()
    ulps = torch.arange(-6, 7, dtype=torch.int32)
    probes = (edges.view(torch.int32)[:, None] + ulps[None, :]).view(torch.float32).reshape(-1)
    probes = probes[probes.abs() < 1]
    values = torch.cat([torch.cat([torch.ones(1), g]) for g in probes.split(255)])
    offset = torch.zeros(())
    ours = torch_nf4.dynamic_quantize(values, offset, dynamic_map)
    kernel = launch_dynamic_quantize(values, offset, dynamic_map)
    assert torch.equal(ours[0], kernel[0]) and torch.equal(ours[1], kernel[1])


def test_dequantize_cache_hits_invalidates_and_respects_its_budget():
    torch_nf4.clear_dequant_cache()
    w, _ = make_nf4_weight(30, 64, 64, True)
    first = csrc_torch.dequantize_fp32(w)
    assert csrc_torch.dequantize_fp32(w) is first
    assert csrc_torch.dequant_cache_info()["hits"] == 1
    w.packed[0] ^= 0xFF                            # an in-place change must not be served stale
    changed = csrc_torch.dequantize_fp32(w)
    assert changed is not first and torch.equal(changed, nf4_dequantize(w, torch.float32))
    previous = csrc_torch.set_dequant_cache_bytes(0)
    try:
        others = [make_nf4_weight(30, 64, 64, False)[0] for _ in range(3)]
        for other in others:
            csrc_torch.dequantize_fp32(other)
        assert csrc_torch.dequant_cache_info()["entries"] == 1   # only the last one kept
    finally:
        csrc_torch.set_dequant_cache_bytes(previous)
    with pytest.raises(ValueError, match="n_bytes"):
        csrc_torch.set_dequant_cache_bytes(-1)


def nf4_quantize_parity(dtype):
    """The mirror's bytes are the kernel's (bit identity: stronger than the reference)."""
    for shape in ((37, 99), (5, 7)):
        for double_quant in (False, True):
            w = (torch.randn(shape) * 3).to(dtype)
            ours, kernel = csrc_torch.nf4_quantize(w, 64, double_quant), nf4_quantize(w, 64, double_quant)
            for field in ("packed", "absmax", "nested_absmax", "nested_code", "nested_offset"):
                a, b = getattr(ours, field), getattr(kernel, field)
                assert (a is None and b is None) or torch.equal(a, b), (shape, double_quant, field)


def nf4_matmul_parity(dtype):
    for weight_kind in ((32, False), (64, True)):
        for m, k, n in ((37, 99, 91), (5, 256, 45)):
            _nf4_matmul_case(dtype, weight_kind, m, k, n)


def _nf4_matmul_case(dtype, weight_kind, m, k, n):
    w, w64 = make_nf4_weight(n, k, *weight_kind)
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    x64, dy64 = quantized(x, dtype), quantized(dy, dtype)
    atol, rtol = matmul_tolerance(dtype, x64, w64.t())
    check("nf4_matmul", "forward", csrc_torch.nf4_matmul_forward(x, w),
          tl_nf4_matmul.nf4_matmul_forward(x, w), x64 @ w64.t(), atol=atol, rtol=rtol)
    atol, rtol = matmul_tolerance(dtype, dy64, w64)
    check("nf4_matmul", "backward_input", csrc_torch.nf4_matmul_backward_input(dy, w),
          tl_nf4_matmul.nf4_matmul_backward_input(dy, w), dy64 @ w64, atol=atol, rtol=rtol)


def lora_linear_parity(dtype):
    for rank, dropout, scale, fp32_lora in ((1, 0.0, 2.0, False), (8, 0.25, -0.5, True)):
        _lora_linear_case(dtype, rank, dropout, scale, fp32_lora)


def _lora_linear_case(dtype, rank, dropout, scale, fp32_lora):
    m, k, n = 37, 99, 70
    w, w64 = make_nf4_weight(n, k, 64, True)
    a, b = make_lora(n, k, rank, torch.float32 if fp32_lora else dtype)
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    results = {}
    for name, backend in (("torch", csrc_torch), ("triton", tl_lora)):
        generator = torch.Generator().manual_seed(1234)      # the same dropout mask for both
        y, ctx = backend.lora_linear_forward(x, w, a, b, scale, dropout, True, generator)
        results[name] = (y, ctx) + backend.lora_linear_backward(dy, x, w, a, b, scale, ctx)
    (y, ctx, dx, da, db), (ky, kctx, kdx, kda, kdb) = results["torch"], results["triton"]
    if dropout:
        assert torch.equal(ctx.keep_mask, kctx.keep_mask)
    else:
        assert ctx.keep_mask is None and ctx.dropout == 0.0
    x64, dy64 = quantized(x, dtype), quantized(dy, dtype)
    y64, dx64, da64, db64 = reference_with_grads(x64, w64, quantized(a, a.dtype),
                                                 quantized(b, b.dtype), scale, ctx.keep_mask,
                                                 dropout, dy64)
    tolerance = lambda pair: dict(atol=pair[0], rtol=pair[1])  # noqa: E731
    check("lora_linear", "forward", y, ky, y64, **tolerance(matmul_tolerance(dtype, x64, w64.t())))
    check("lora_linear", "dx", dx, kdx, dx64, **tolerance(matmul_tolerance(dtype, dy64, w64)))
    check("lora_linear", "dA", da, kda, da64, **tolerance(small_matmul_tolerance(a.dtype)))
    check("lora_linear", "dB", db, kdb, db64, **tolerance(small_matmul_tolerance(b.dtype)))
    none, _, _ = csrc_torch.lora_linear_backward(dy, x, w, a, b, scale, ctx, input_grad=False)
    assert none is None


# ------------------------------------------------------------ elementwise ops

def rms_norm_parity(dtype):
    for shape in ((37, 99), (1, 7), (150, 1000)):
        _rms_norm_case(dtype, shape)


def _rms_norm_case(dtype, shape):
    x, weight, dy = rms_inputs(shape, dtype)
    x64, w64, dy64 = quantized(x, dtype), quantized(weight, dtype), quantized(dy, dtype)
    y, rstd = csrc_torch.rms_norm_forward(x, weight, EPS)
    ky, krstd = tl_rms.rms_norm_forward(x, weight, EPS)
    check("rms_norm", "y", y, ky, reference_rms_norm(x64, w64, EPS), **RMS_TOLERANCE[dtype])
    check("rms_norm", "rstd", rstd, krstd, 1 / torch.sqrt((x64 * x64).mean(-1) + EPS),
          **RSTD_TOLERANCE)
    dx_ref, dw_ref = reference_rms_norm_backward(dy64, x64, w64, EPS)
    dx, dw = csrc_torch.rms_norm_backward(dy, x, weight, rstd, True)
    kdx, kdw = tl_rms.rms_norm_backward(dy, x, weight, rstd, True)
    check("rms_norm", "dx", dx, kdx, dx_ref, **RMS_TOLERANCE[dtype])
    check("rms_norm", "dw", dw, kdw, dw_ref, **dw_tolerance(dtype, shape[0]))
    assert csrc_torch.rms_norm_backward(dy, x, weight, rstd, False)[1] is None


def rope_parity(dtype):
    for shape in ((2, 13, 6, 2, 18), (3, 5, 1, 1, 2)):
        _rope_case(dtype, shape)


def _rope_case(dtype, shape):
    cos, sin = csrc_torch.rope_cos_sin(shape[-1], MAX_POSITION, LLAMA3_THETA,
                                       llama3_scaling(LLAMA3_SCALING))
    q, k, positions = rope_inputs(shape, dtype)
    q_ref, k_ref = reference_rope(quantized(q, dtype), quantized(k, dtype), positions, cos, sin)
    (qr, kr), (kqr, kkr) = (backend.rope_forward(q, k, positions, cos, sin)
                            for backend in (csrc_torch, tl_rope))
    check("rope", "q_rot", qr, kqr, q_ref, **ROPE_TOLERANCE[dtype])
    check("rope", "k_rot", kr, kkr, k_ref, **ROPE_TOLERANCE[dtype])
    dq_rot, dk_rot = torch.randn_like(q), torch.randn_like(k)
    dq_ref, dk_ref = reference_rope(quantized(dq_rot, dtype), quantized(dk_rot, dtype),
                                    positions, cos, sin, inverse=True)
    (dq, dk), (kdq, kdk) = (backend.rope_backward(dq_rot, dk_rot, positions, cos, sin)
                            for backend in (csrc_torch, tl_rope))
    check("rope", "dq", dq, kdq, dq_ref, **ROPE_TOLERANCE[dtype])
    check("rope", "dk", dk, kdk, dk_ref, **ROPE_TOLERANCE[dtype])
    with pytest.raises(ValueError, match="positions"):
        csrc_torch.rope_forward(q, k, positions + MAX_POSITION, cos, sin)


def swiglu_parity(dtype):
    for shape in ((37, 999), (3, 5, 7)):
        _swiglu_case(dtype, shape)


def _swiglu_case(dtype, shape):
    gate, up, dh = swiglu_inputs(shape, dtype)
    g64, u64, dh64 = (quantized(t, dtype) for t in (gate, up, dh))
    check("swiglu", "h", csrc_torch.swiglu_forward(gate, up), tl_swiglu.swiglu_forward(gate, up),
          reference_swiglu(g64, u64), **SWIGLU_TOLERANCE[dtype])
    dgate_ref, dup_ref = reference_swiglu_backward(dh64, g64, u64)
    (dg, du), (kdg, kdu) = (backend.swiglu_backward(dh, gate, up)
                            for backend in (csrc_torch, tl_swiglu))
    check("swiglu", "dgate", dg, kdg, dgate_ref, **SWIGLU_TOLERANCE[dtype])
    check("swiglu", "dup", du, kdu, dup_ref, **SWIGLU_TOLERANCE[dtype])


# ------------------------------------------------------------------ the losses

def linear_loss_parity(dtype):
    _linear_cross_entropy_case(dtype)
    _token_logprobs_case(dtype)


def _linear_cross_entropy_case(dtype):
    T, H, V = 37, 45, 1001
    hidden, weight = loss_inputs(T, H, V, dtype)
    labels = random_labels(T, V)
    n_valid = int((labels != -100).sum())
    grad_scale = 1.0 / n_valid
    chunk = 5 * V * 4                                   # several chunks of 5 tokens
    outs = [backend.linear_cross_entropy_forward_backward(hidden, weight, labels, grad_scale,
                                                          weight_grad=True, chunk_bytes=chunk)
            for backend in (csrc_torch, tl_loss)]
    (loss, n, dh, dw), (kloss, kn, kdh, kdw) = outs
    ref = LossReference(hidden, weight, labels, torch.full((T,), -grad_scale))
    ref_loss, _ = reference_linear_cross_entropy(quantized(hidden, dtype), quantized(weight, dtype),
                                                 labels)
    assert int(n) == int(kn) == n_valid
    check("linear_cross_entropy", "loss_sum", loss.reshape(1), kloss.reshape(1),
          ref_loss.reshape(1), atol=ref.loss_atol(n_valid, float(ref_loss)), rtol=0.0)
    # our gradient rows stay fp32 (u_d = 0); the kernel's fp16 rows are inside its own bound
    check("linear_cross_entropy", "dhidden", dh, kdh, ref.dh, atol=ref.dh_atol(dtype),
          rtol=torch.finfo(dtype).eps / 2)
    check("linear_cross_entropy", "dweight", dw, kdw, ref.dw, atol=ref.dw_atol(dtype), rtol=0.0)
    eval_loss, eval_n = csrc_torch.linear_cross_entropy_forward(hidden, weight, labels,
                                                                chunk_bytes=chunk)
    assert int(eval_n) == n_valid and torch.equal(eval_loss, loss)


def _token_logprobs_case(dtype):
    T, H, V = 29, 33, 517
    hidden, weight = loss_inputs(T, H, V, dtype)
    labels = random_labels(T, V)
    dlogp = torch.randn(T)
    chunk = 7 * V * 4
    (logp, lse), (klogp, klse) = (backend.token_logprobs_forward(hidden, weight, labels,
                                                                 chunk_bytes=chunk)
                                  for backend in (csrc_torch, tl_loss))
    ref = LossReference(hidden, weight, labels, dlogp)
    ignored = labels == -100
    assert bool((logp[ignored] == 0).all()) and bool((lse[ignored] == 0).all())
    check("token_logprobs", "logp", logp, klogp, ref.logp, atol=ref.rel_p, rtol=0.0)
    (dh, dw), (kdh, kdw) = (backend.token_logprobs_backward(dlogp, hidden, weight, labels, l_,
                                                            weight_grad=True, chunk_bytes=chunk)
                            for backend, l_ in ((csrc_torch, lse), (tl_loss, klse)))
    check("token_logprobs", "dhidden", dh, kdh, ref.dh, atol=ref.dh_atol(dtype),
          rtol=torch.finfo(dtype).eps / 2)
    check("token_logprobs", "dweight", dw, kdw, ref.dw, atol=ref.dw_atol(dtype), rtol=0.0)


def test_bad_arguments_get_the_kernels_errors():
    w, _ = make_nf4_weight(8, 32, 32, False)
    with pytest.raises(ValueError, match="x2d"):
        csrc_torch.nf4_matmul_forward(torch.randn(3, 31), w)
    with pytest.raises(ValueError, match="eps"):
        csrc_torch.rms_norm_forward(torch.randn(3, 4), torch.ones(4), -1.0)
    with pytest.raises(ValueError, match="up"):
        csrc_torch.swiglu_forward(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="dropout"):
        csrc_torch.lora_linear_forward(torch.randn(3, 32), w, torch.randn(2, 32),
                                       torch.randn(8, 2), 1.0, 1.5)
    with pytest.raises(ValueError, match="labels"):
        csrc_torch.linear_cross_entropy_forward(torch.randn(3, 4), torch.randn(5, 4),
                                                torch.tensor([0, 1, 9]))


# --------------------------------------------------------- the seam, the model

def test_backend_variable_default_and_refusal(monkeypatch):
    from anita_core.model import ops
    monkeypatch.delenv(ops.BACKEND_VARIABLE, raising=False)
    assert ops._backend_from_environment() == ("triton" if torch.cuda.is_available() else "torch")
    monkeypatch.setenv(ops.BACKEND_VARIABLE, "torch")
    assert ops._backend_from_environment() == "torch"
    monkeypatch.setenv(ops.BACKEND_VARIABLE, "cuda")
    with pytest.raises(ValueError, match="ANITA_BACKEND='cuda' is not a backend"):
        ops._backend_from_environment()
    with pytest.raises(ValueError, match="not one of"):
        ops.set_backend("numpy")
    assert ops.active_backend() == "triton"        # conftest pins the kernels for the tests


# Both backends run fp32 everywhere on the same inputs and the same dropout masks;
# they differ in summation order and in the attention's arithmetic (a full softmax
# against flash attention's online exp2 rescaling), and the test's large random LoRA
# weights (PEFT's B = 0 would hide the path) make the 2-layer model poorly
# conditioned: the first layer's gradients move by thousands of fp32 ulps. Measured
# over 22 draws of this test (2026-11-29): up to 1.03e-4 of a gradient's largest
# element, median 2e-5 (an earlier 1e-4 bound failed on one draw). 1e-3 is 10x the
# worst seen and still far below what a wrong term, scale or mask moves (O(1)).
MODEL_REL = 1e-3


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_train_step_and_logits_agree_between_backends(tmp_path, dropout):
    from anita_core.hf import load_model
    from anita_core.lora import LoRAAdapters, LoRAConfig
    from anita_core.model import ops
    from tests.model_factory import make_tiny_llama_dir

    model = load_model(make_tiny_llama_dir(tmp_path), progress=False, dropout_seed=5)
    model.adapters = LoRAAdapters.init(LoRAConfig(r=4, alpha=8, dropout=dropout, seed=3),
                                       model.config)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.3)          # PEFT's B = 0 would hide the LoRA path
    V = model.config.vocab_size
    ids, targets = torch.randint(0, V, (2, 11)), torch.randint(0, V, (2, 11))
    targets[0, :3] = -100
    start = model.dropout_generator.get_state()
    results = {}
    for backend in ("triton", "torch"):
        model.adapters.zero_grad()
        model.dropout_generator.set_state(start)
        with ops.use_backend(backend):
            loss, n = model.train_step(ids, targets, grad_scale=0.1)
            logits = model.logits(ids)
        grads = {name: p.grad.clone() for name, p in model.adapters.named_parameters()}
        results[backend] = (loss, n, grads, logits)
    assert ops.active_backend() == "triton"
    (loss, n, grads, logits), (kloss, kn, kgrads, klogits) = results["torch"], results["triton"]
    assert int(n) == int(kn) == int((targets != -100).sum())
    assert_close("torch:model", "loss", loss.reshape(1), kloss.reshape(1), atol=0.0, rtol=MODEL_REL)
    assert_close("torch:model", "logits", logits, klogits,
                 atol=MODEL_REL * float(klogits.abs().max()), rtol=MODEL_REL)
    assert len(grads) == 2 * 7 * 2                     # A and B of 7 projections in 2 layers
    for name, g in kgrads.items():
        scale = float(g.abs().max())
        assert scale > 0, f"{name}: zero gradient on the kernels"
        assert_close("torch:model", name, grads[name], g, atol=MODEL_REL * scale, rtol=MODEL_REL)


# ------------------------------------------------------------------ attention

def flash_attention_parity(dtype):
    for shape in ((2, 37, 4, 2, 64), (1, 29, 8, 1, 72)):
        _flash_attention_case(dtype, shape)


def _flash_attention_case(dtype, shape):
    """Packed documents of very different lengths and padding (test_attention's rows)."""
    from csrc_triton import attention as tl_attention
    from tests.test_attention import TOLERANCE as ATTENTION_TOLERANCE
    from tests.test_attention import check_all, make_inputs, packed_segments, reference_with_grads
    batch, seq, n_q, n_kv, head_dim = shape
    q, k, v = make_inputs(batch, seq, n_q, n_kv, head_dim, dtype)
    segments = packed_segments(batch, seq)
    bounds = csrc_torch.document_bounds(segments)
    out, lse = csrc_torch.flash_attention_forward(q, k, v, bounds)
    d_out = torch.randn_like(out)
    grads = csrc_torch.flash_attention_backward(d_out, q, k, v, out, lse, bounds)
    # against the float64 reference, with the kernel test's own bounds
    check_all(f"torch {shape}", dtype, (out, lse, grads),
              reference_with_grads(q, k, v, segments, d_out, dtype), (q, k, d_out, segments))
    # against the Triton kernel on the same inputs (twice the reference tolerance, see the
    # module docstring; fp16 dQ/dK also carry the Delta rounding both make, so the same
    # per-element bound applies to each)
    k_out, k_lse = tl_attention.flash_attention_forward(q, k, v, bounds)
    assert_close("torch:flash_attention", "out vs triton", out, k_out,
                 **{key: 2 * value for key, value in ATTENTION_TOLERANCE[dtype].items()})
    finite = torch.isfinite(k_lse)
    assert torch.equal(finite, torch.isfinite(lse))      # the same rows see nothing
    assert_close("torch:flash_attention", "lse vs triton", lse[finite], k_lse[finite],
                 atol=2e-5, rtol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_segments", [True, False], ids=["packed", "causal"])
def test_flash_attention_in_many_query_blocks(dtype, with_segments, monkeypatch):
    """Query blocks of 8 tokens over 67 (a short tail block; documents spanning blocks;
    blocks whose key range starts at a document far back; a padding-only block), against
    the float64 reference, every element of out, lse, dq, dk, dv."""
    from csrc_torch import attention as torch_attention
    from tests.test_attention import check_all, make_inputs, packed_segments, reference_with_grads
    monkeypatch.setattr(torch_attention, "QUERY_BLOCK", 8)
    batch, seq, n_q, n_kv, head_dim = 2, 67, 4, 2, 24
    q, k, v = make_inputs(batch, seq, n_q, n_kv, head_dim, dtype)
    segments = packed_segments(batch, seq, lengths=[1, 30, 2, 9, 40])
    segments[:, -3:] = -1                   # the last block [64, 67): padding in every row
    if not with_segments:
        segments = torch.zeros_like(segments)
    bounds = csrc_torch.document_bounds(segments) if with_segments else None
    # the padding-only block is skipped; the block after the 30-token document starts reads
    # from that document's start
    blocks = list(torch_attention._blocks(bounds, seq, 8))
    assert len(blocks) == (8 if with_segments else 9)
    if with_segments:
        assert blocks[3] == (24, 32, 1) and blocks[4][2] > 0
    out, lse = csrc_torch.flash_attention_forward(q, k, v, bounds)
    d_out = torch.randn_like(out)
    grads = csrc_torch.flash_attention_backward(d_out, q, k, v, out, lse, bounds)
    check_all(f"torch blocks {'packed' if with_segments else 'causal'}", dtype, (out, lse, grads),
              reference_with_grads(q, k, v, segments, d_out, dtype), (q, k, d_out, segments))
