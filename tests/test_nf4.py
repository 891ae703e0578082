"""NF4 quantize / dequantize: byte identity with bitsandbytes, exactness against
the float64 reference, the bitsandbytes and checkpoint conversions, bad input.

bitsandbytes is the oracle for bytes (its CPU implementation; tests needing it
skip where it is missing). tests.reference.nf4.reference_bnb_nf4_quantize emulates
its rules in torch and is itself checked against bitsandbytes here, so the GPU
tests (no bitsandbytes there) still compare bytes.

No backward tests: quantization has no gradient and the NF4 weight is frozen
(see the csrc_triton.nf4 docstring).
"""
from __future__ import annotations

import json

import pytest
import torch

from anita_core.hf.bnb import nf4_from_state_dict, nf4_to_state_dict
from csrc_triton import nf4_dequantize, nf4_quantize
from csrc_triton.nf4 import NF4Weight
from csrc_triton.nf4_codebook import SUPPORTED_BLOCKSIZES, nf4_code, signed_dynamic_map
from csrc_triton.nf4_encode import launch_dynamic_quantize
from tests.helpers import assert_close, bitsandbytes_functional
from tests.reference.nf4 import (reference_bnb_dynamic_quantize, reference_bnb_nf4_quantize,
                                 reference_nf4_absmax, reference_nf4_dequantize)

# a kernel against its float64 reference: also run under the oldest supported triton
# (tests/test_supported_tritons.py)
pytestmark = pytest.mark.kernels

# (shape, why): small, odd, not multiples of any blocksize unless stated.
SHAPES = [
    ((1, 37), "one row, odd numel"),
    ((7, 301), "odd numel, rows span blocks, partial last block"),
    ((12, 96), "even numel; 96 is a multiple of 32 only"),
    ((5,), "1-D, smaller than one block"),
    ((129, 515), "66435 elements: several nested groups of 256 blocks at blocksize 32"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP32 = 2.0 ** -24  # half an ulp of fp32, relative: one round-to-nearest


def _bnb():
    return bitsandbytes_functional()


@pytest.fixture
def eager_bitsandbytes():
    """bitsandbytes wraps its generic CPU decode in torch.compile, which costs ~25 s
    per shape on this CPU and changes nothing in a bit-exact check: run it eagerly."""
    import torch._dynamo
    with torch._dynamo.config.patch(disable=True):
        yield


def _assert_same_bytes(q: NF4Weight, packed: torch.Tensor, state) -> None:
    """Every stored field equal, bit for bit, to bitsandbytes' (packed, QuantState)."""
    assert torch.equal(q.packed, packed.reshape(-1)), "packed bytes differ"
    assert q.absmax.dtype == state.absmax.dtype
    assert torch.equal(q.absmax, state.absmax), "absmax differs"
    assert torch.equal(q.code, state.code)
    assert q.double_quant == state.nested
    if state.nested:
        assert torch.equal(q.nested_absmax, state.state2.absmax), "nested absmax differs"
        assert torch.equal(q.nested_code, state.state2.code), "nested code differs"
        assert torch.equal(q.nested_offset, state.offset), "offset differs"
    assert q.shape == state.shape and q.dtype == state.dtype and q.blocksize == state.blocksize


def _weight(shape, dtype):
    # Scaled so blocks have very different absmax values (spreads the nested codes).
    w = torch.randn(shape) * torch.rand(shape[:1] + (1,) * (len(shape) - 1)) * 3
    return w.to(dtype)


# ---------------------------------------------------------------------------
# quantize: bytes
# ---------------------------------------------------------------------------

def test_signed_dynamic_map_equals_bitsandbytes():
    F = _bnb()
    assert torch.equal(signed_dynamic_map(), F.create_dynamic_map(signed=True))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", SUPPORTED_BLOCKSIZES)
@pytest.mark.parametrize("shape", [s for s, _ in SHAPES], ids=[w for _, w in SHAPES])
def test_quantize_bytes_equal_bitsandbytes(shape, blocksize, double_quant):
    F = _bnb()
    for dtype in DTYPES:
        w = _weight(shape, dtype)
        packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                        compress_statistics=double_quant)
        _assert_same_bytes(nf4_quantize(w, blocksize, double_quant), packed, state)


def _midpoint_probes(scale: float):
    """fp32 values a few ulps around scale * (each NF4 midpoint), |value| <= scale."""
    code = nf4_code()
    midpoints = (code[:-1] + code[1:]) * 0.5
    s = torch.tensor(scale, dtype=torch.float32)
    bits = (midpoints * s).view(torch.int32)[:, None] + torch.arange(-3, 4, dtype=torch.int32)
    probes = bits.view(torch.float32).reshape(-1)
    return s, midpoints, probes[probes.abs() <= s]


@pytest.mark.parametrize("blocksize", SUPPORTED_BLOCKSIZES)
def test_quantize_values_on_and_near_midpoints(blocksize):
    """Last-bit rules random data almost never reaches: a value exactly on a
    midpoint takes the lower code, and the partial last block divides by its
    absmax while full blocks multiply by the rounded reciprocal. Every probe goes
    once into full blocks and once into the partial last block."""
    F = _bnb()
    ties = rule_splits = 0
    for scale in (1.0, 3.0, 0.3, 1.7, 5.9):
        s, midpoints, probes = _midpoint_probes(scale)
        ties += int(torch.isin(probes * (1.0 / s), midpoints).sum())
        by_product = (probes[:, None] * (1.0 / s) > midpoints).sum(1)
        by_quotient = (probes[:, None] / s > midpoints).sum(1)
        rule_splits += int((by_product != by_quotient).sum())
        # full blocks: [s, probes...], padded with s; then one partial block [s, probes...]
        chunks = [torch.cat([s[None], c]) for c in probes.split(blocksize - 1)]
        full = torch.cat(chunks + [s.repeat(-sum(map(len, chunks)) % blocksize)])
        for partial_probes in probes.split(blocksize - 2):
            w = torch.cat([full, s[None], partial_probes])[None, :]
            assert w.numel() % blocksize, "the last block must be partial"
            packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
            _assert_same_bytes(nf4_quantize(w, blocksize), packed, state)
    # The probes must reach both rules, or this test could not fail.
    assert ties > 0 and rule_splits > 0, (ties, rule_splits)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 256])
def test_quantize_all_zero_blocks(blocksize, double_quant):
    """A zero full block stores absmax 0, a zero partial block stores 1e-38
    (bitsandbytes' clamp), both encode code index 7 (value 0)."""
    F = _bnb()
    w = _weight((3, 2 * blocksize + 5), torch.float32)
    flat = w.view(-1)
    flat[blocksize:2 * blocksize] = 0          # a full block
    flat[-(flat.numel() % blocksize):] = 0     # the partial last block
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                    compress_statistics=double_quant)
    q = nf4_quantize(w, blocksize, double_quant)
    _assert_same_bytes(q, packed, state)
    absmax = reference_nf4_absmax(q)
    assert absmax[1] == 0 or double_quant  # double quant decodes 0 only approximately
    assert torch.all(q.packed[blocksize // 2:blocksize] == 0x77)


def test_quantize_all_zero_weight_double_quant():
    """One block in all: offset = absmax, so the nested group is all zero."""
    F = _bnb()
    for w in (torch.zeros(1, 37), torch.randn(1, 30)):
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                        compress_statistics=True)
        _assert_same_bytes(nf4_quantize(w, 64, True), packed, state)


def test_nested_rule_near_table_boundaries():
    """bitsandbytes' CPU quantize_blockwise reads the code index from a 65536-entry
    table, which is not always the nearest code: probe values a few ulps around
    every table step where the index changes (group max 1 -> scale exactly 1),
    plus random groups, against bitsandbytes itself."""
    F = _bnb()
    dynamic_map = signed_dynamic_map()
    midpoints = (dynamic_map[:-1] + dynamic_map[1:]) * 0.5
    grid = (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0 - 1.0
    table = torch.searchsorted(midpoints, grid)
    steps = torch.nonzero(table[1:] != table[:-1]).reshape(-1) + 1
    edges = (-1.0 + 2.0 * (steps.double() - 0.5) / 65535.0).float()
    ulps = torch.arange(-6, 7, dtype=torch.int32)
    probes = (edges.view(torch.int32)[:, None] + ulps[None, :]).view(torch.float32).reshape(-1)
    probes = probes[probes.abs() < 1]
    groups = probes.split(255)
    values = torch.cat([torch.cat([torch.ones(1), g]) for g in groups]
                       + [torch.randn(3 * 256 + 17) * 0.01])
    offset = torch.zeros(())
    indices, group_max = launch_dynamic_quantize(values, offset, dynamic_map)
    expected, state = F.quantize_blockwise(values, code=F.create_dynamic_map(signed=True),
                                           blocksize=256)
    assert torch.equal(group_max, state.absmax)
    mismatch = torch.nonzero(indices != expected).reshape(-1)
    assert mismatch.numel() == 0, (
        f"{mismatch.numel()} indices differ, first at value {values[mismatch[0]].item()!r}")
    emulated, emulated_max = reference_bnb_dynamic_quantize(values, dynamic_map)
    assert torch.equal(emulated, expected) and torch.equal(emulated_max, state.absmax)


@pytest.mark.parametrize("double_quant", [False, True])
def test_emulated_bnb_rule_equals_bitsandbytes(double_quant):
    """The torch emulation the GPU tests rely on is itself bit-identical to bitsandbytes."""
    F = _bnb()
    for (shape, _), blocksize in zip(SHAPES, (32, 64, 128, 256, 32)):
        for dtype in DTYPES:
            w = _weight(shape, dtype)
            packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                            compress_statistics=double_quant)
            _assert_same_bytes(reference_bnb_nf4_quantize(w, blocksize, double_quant),
                               packed, state)


def _assert_equal_weights(a: NF4Weight, b: NF4Weight) -> None:
    for name in ("packed", "absmax", "code", "nested_absmax", "nested_code", "nested_offset"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()), name
    assert (a.shape, a.blocksize, a.dtype) == (b.shape, b.blocksize, b.dtype)


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_equals_emulated_bnb_rule(double_quant):
    """Runs without bitsandbytes too (CPU interpreter or GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for (shape, _), blocksize in zip(SHAPES, (64, 32, 256, 128, 32)):
        for dtype in DTYPES:
            w = _weight(shape, dtype).to(device)
            _assert_equal_weights(nf4_quantize(w, blocksize, double_quant).to("cpu"),
                                  reference_bnb_nf4_quantize(w, blocksize, double_quant))


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_llama_shape_gpu(dtype, double_quant):
    """LLaMA-3-8B k_proj shape, compiled kernels, against the emulated bnb rule."""
    w = _weight((1024, 4096), dtype).cuda()
    _assert_equal_weights(nf4_quantize(w, 64, double_quant).to("cpu"),
                          reference_bnb_nf4_quantize(w, 64, double_quant))


# ---------------------------------------------------------------------------
# dequantize
# ---------------------------------------------------------------------------

def _bnb_consistent(shape, blocksize) -> bool:
    """bitsandbytes 0.50's CPU dequantize_4bit (C kernel, used when the last dim
    is even) computes the block of an element per row and decodes wrongly when
    the last dim is not a multiple of the blocksize, or for a 1-D weight; its
    generic path (odd last dim) is right. Compare with bnb only where it is
    self-consistent; the float64 reference covers every shape."""
    return len(shape) == 2 and (shape[-1] % 2 == 1 or shape[-1] % blocksize == 0)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_equals_bitsandbytes(out_dtype, double_quant, eager_bitsandbytes):
    """Bit for bit, including the rounding to fp16 / bf16."""
    F = _bnb()
    cases = [(s, b) for s, _ in SHAPES for b in SUPPORTED_BLOCKSIZES if _bnb_consistent(s, b)]
    cases.append(((9, 256), 128))  # even last dim, a multiple of the blocksize: bnb's C kernel
    for shape, blocksize in cases:
        w = _weight(shape, torch.float32)
        packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                        compress_statistics=double_quant)
        state.dtype = out_dtype
        expected = F.dequantize_4bit(packed, state, quant_type="nf4")
        actual = nf4_dequantize(nf4_quantize(w, blocksize, double_quant), out_dtype)
        assert actual.dtype == out_dtype and actual.shape == w.shape
        diff = torch.nonzero(actual.view(torch.int16 if out_dtype != torch.float32
                                         else torch.int32)
                             != expected.view(torch.int16 if out_dtype != torch.float32
                                              else torch.int32))
        assert diff.numel() == 0, f"{shape} blocksize {blocksize}: {len(diff)} elements differ"


def _dequant_tolerances(q: NF4Weight, out_dtype):
    """atol, rtol of the kernel against the float64 reference decode.

    The bound is the exact worst case of the roundings counted below, so a run may
    use all of it: the summary's "tolerance used" reaches 0.99 for nf4_dequantize
    (one fp32 rounding of code * absmax, whose error is up to half an ulp of the
    result, i.e. up to rtol = 2^-24 relative for a result just above a power of two)
    and can never pass 1.0 by chance; a kernel that rounded twice, or read a wrong
    code or block, would exceed it by orders of magnitude."""
    # One fp32 rounding of code * absmax: half an ulp, relative.
    rtol = ULP32
    # The smallest absmax (1e-38, an all-zero partial block) gives subnormal
    # products: half the fp32 subnormal spacing.
    atol = 2.0 ** -150
    if q.double_quant:
        # The absmax decode rounds twice in fp32 (product, then + offset), each by at
        # most half an ulp of its result; |code| <= 1 carries that absolute error.
        atol += ULP32 * (float(q.nested_absmax.abs().max())
                         + float(reference_nf4_absmax(q).abs().max()))
    if out_dtype == torch.float16:
        rtol += 2.0 ** -11   # one more rounding, to fp16 (10 mantissa bits)
        atol += 2.0 ** -25   # half the fp16 subnormal spacing
    if out_dtype == torch.bfloat16:
        rtol += 2.0 ** -8    # one more rounding, to bf16 (7 mantissa bits)
    return atol, rtol


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_against_float64_reference(out_dtype, double_quant):
    for (shape, _), blocksize in zip(SHAPES, (32, 64, 128, 256, 64)):
        w = _weight(shape, torch.float32)
        w.view(-1)[:blocksize] = 0                     # a zero block
        q = nf4_quantize(w, blocksize, double_quant)
        atol, rtol = _dequant_tolerances(q, out_dtype)
        assert_close("nf4_dequantize", f"{shape}/{blocksize}/{out_dtype}",
                     nf4_dequantize(q, out_dtype), reference_nf4_dequantize(q),
                     atol=atol, rtol=rtol)


def test_dequantize_default_dtype_and_reference_quantizer():
    """dtype defaults to q.dtype; decoding a reference-built weight (nearest code,
    float64 search) matches the float64 decode too."""
    from tests.reference.nf4 import reference_nf4_quantize
    w = _weight((7, 301), torch.float16)
    q = reference_nf4_quantize(w, 64)
    out = nf4_dequantize(q)
    assert out.dtype == torch.float16
    atol, rtol = _dequant_tolerances(q, torch.float16)
    assert_close("nf4_dequantize", "reference-built", out, reference_nf4_dequantize(q),
                 atol=atol, rtol=rtol)


def test_quantization_error_is_nf4_sized():
    """A sanity check of the whole round trip: on Gaussian weights NF4 keeps the
    relative Frobenius error near 0.09 (NOTES.md); a scrambled nibble order or
    absmax would blow it up."""
    w = torch.randn(64, 301)
    for blocksize in SUPPORTED_BLOCKSIZES:
        error = (nf4_dequantize(nf4_quantize(w, blocksize, True)) - w).norm() / w.norm()
        assert 0.05 < float(error) < 0.12, (blocksize, float(error))


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_llama_shape_gpu(out_dtype):
    w = _weight((1024, 4096), torch.bfloat16).cuda()
    q = nf4_quantize(w, 64, True)
    atol, rtol = _dequant_tolerances(q, out_dtype)
    assert_close("nf4_dequantize", f"gpu/{out_dtype}", nf4_dequantize(q, out_dtype),
                 reference_nf4_dequantize(q.to("cpu")), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------
# conversions
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [False, True])
def test_to_bnb_and_from_bnb_round_trip(double_quant, eager_bitsandbytes):
    F = _bnb()
    w = _weight((9, 256), torch.bfloat16)
    q = nf4_quantize(w, 64, double_quant)
    packed, state = q.to_bnb()
    assert packed.shape == ((w.numel() + 1) // 2, 1) and packed.dtype == torch.uint8
    assert packed.data_ptr() == q.packed.data_ptr()  # a view, as documented
    bnb_packed, bnb_state = F.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                            compress_statistics=double_quant)
    assert torch.equal(packed, bnb_packed)
    for name in ("absmax", "code", "offset"):
        mine, theirs = getattr(state, name), getattr(bnb_state, name)
        assert (mine is None and theirs is None) or torch.equal(mine, theirs), name
    assert (state.shape, state.dtype, state.blocksize, state.quant_type, state.nested) == (
        bnb_state.shape, bnb_state.dtype, bnb_state.blocksize, bnb_state.quant_type,
        bnb_state.nested)
    if double_quant:
        assert torch.equal(state.state2.absmax, bnb_state.state2.absmax)
        assert torch.equal(state.state2.code, bnb_state.state2.code)
        assert (state.state2.blocksize, state.state2.dtype) == (
            bnb_state.state2.blocksize, bnb_state.state2.dtype)
    state.dtype = torch.float32
    assert torch.equal(F.dequantize_4bit(packed, state, quant_type="nf4"),
                       nf4_dequantize(q, torch.float32))
    _assert_equal_weights(NF4Weight.from_bnb(bnb_packed, bnb_state), q)


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_matches_bitsandbytes_serialization(double_quant):
    """to_state_dict writes exactly what a bitsandbytes Linear4bit saves: the
    packed weight plus QuantState.as_dict(packed=True) under '<prefix>weight.'."""
    F = _bnb()
    w = _weight((7, 301), torch.float16)
    prefix = "model.layers.0.mlp.down_proj."
    packed, state = F.quantize_4bit(w, blocksize=128, quant_type="nf4",
                                    compress_statistics=double_quant)
    expected = {f"{prefix}weight": packed}
    expected.update({f"{prefix}weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    actual = nf4_to_state_dict(nf4_quantize(w, 128, double_quant), prefix)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key
    _assert_equal_weights(nf4_from_state_dict(expected, prefix),
                          nf4_quantize(w, 128, double_quant))


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip_through_safetensors(tmp_path, double_quant):
    from safetensors.torch import load_file, save_file
    q = nf4_quantize(_weight((12, 96), torch.float32), 32, double_quant)
    tensors = nf4_to_state_dict(q, "lin.")
    tensors.update(nf4_to_state_dict(nf4_quantize(_weight((5,), torch.float32), 32,
                                                  double_quant), "other."))
    save_file(tensors, str(tmp_path / "w.safetensors"))
    loaded = load_file(str(tmp_path / "w.safetensors"))
    back = nf4_from_state_dict(loaded, "lin.")
    _assert_equal_weights(back, q)
    assert nf4_from_state_dict(loaded, "lin.", dtype=torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(nf4_dequantize(back), nf4_dequantize(q))


def test_state_dict_json_record():
    q = nf4_quantize(torch.randn(3, 37), 64, True)
    record = nf4_to_state_dict(q, "p.")["p.weight.quant_state.bitsandbytes__nf4"]
    meta = json.loads(bytes(record.tolist()).decode("utf-8"))
    assert meta == {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [3, 37],
                    "nested_blocksize": 256, "nested_dtype": "float32",
                    "nested_offset": q.nested_offset.item()}


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (lambda: nf4_quantize(torch.randn(4, 64), 48), "blocksize"),
    (lambda: nf4_quantize(torch.randn(4, 64), 512), "blocksize"),
    (lambda: nf4_quantize(torch.randn(4, 64), True), "blocksize"),
    (lambda: nf4_quantize(torch.randn(4, 64), 64.0), "blocksize"),
    (lambda: nf4_quantize(torch.randn(4, 64), 64, double_quant=1), "double_quant"),
    (lambda: nf4_quantize(torch.randn(4, 64).to(torch.float64)), "dtype"),
    (lambda: nf4_quantize(torch.randint(0, 3, (4, 64))), "dtype"),
    (lambda: nf4_quantize(torch.randn(64, 4).t()), "contiguous"),
    (lambda: nf4_quantize(torch.randn(0, 64)), "empty"),
    (lambda: nf4_quantize(torch.tensor(1.0)), "dimension"),
    (lambda: nf4_quantize(torch.tensor([1.0, float("nan")])), "NaN"),
    (lambda: nf4_quantize(torch.tensor([1.0, float("inf")])), "inf"),
    (lambda: nf4_quantize([1.0, 2.0]), "torch.Tensor"),
    (lambda: nf4_dequantize(torch.zeros(4, dtype=torch.uint8)), "NF4Weight"),
    (lambda: nf4_dequantize(nf4_quantize(torch.randn(3, 37)), torch.float64), "dtype"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


@pytest.mark.parametrize("field, value, match", [
    ("packed", torch.zeros(10, dtype=torch.uint8), "packed"),
    ("packed", torch.zeros(56, dtype=torch.int8), "packed"),
    ("absmax", torch.zeros(2), "absmax"),
    ("absmax", torch.zeros(4, dtype=torch.uint8), "absmax"),
    ("code", torch.zeros(16, dtype=torch.float16), "code"),
    ("blocksize", 48, "blocksize"),
    ("shape", torch.Size([3, 38]), "packed"),
    ("nested_offset", torch.zeros(()), "nested"),
])
def test_dequantize_rejects_inconsistent_weight(field, value, match):
    from dataclasses import replace
    q = replace(nf4_quantize(torch.randn(3, 37), 32), **{field: value})
    with pytest.raises(ValueError, match=match):
        nf4_dequantize(q)


_STATE_KEYS = ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
               "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"]


@pytest.mark.parametrize("key", _STATE_KEYS)
def test_from_state_dict_missing_key(key):
    tensors = nf4_to_state_dict(nf4_quantize(torch.randn(3, 37), 64, True), "m.")
    del tensors[f"m.{key}"]
    with pytest.raises(ValueError, match=f"m.{key}'"):
        nf4_from_state_dict(tensors, "m.")


@pytest.mark.parametrize("key, value", [
    ("weight", torch.zeros(56, dtype=torch.uint8)),          # flat, transformers stores [n, 1]
    ("weight", torch.zeros(57, 1, dtype=torch.uint8)),
    ("weight", torch.zeros(28, 1, dtype=torch.bfloat16)),    # quant_storage other than uint8
    ("weight.absmax", torch.zeros(2)),                        # fp32 where nested wants uint8
    ("weight.nested_absmax", torch.zeros(2)),
    ("weight.nested_quant_map", torch.zeros(255)),
    ("weight.quant_map", torch.linspace(-1, 1, 16)),          # not the NF4 code
])
def test_from_state_dict_wrong_tensor(key, value):
    tensors = nf4_to_state_dict(nf4_quantize(torch.randn(3, 37), 64, True), "m.")
    tensors[f"m.{key}"] = value
    with pytest.raises(ValueError, match=f"m.{key}'"):
        nf4_from_state_dict(tensors, "m.")


def _with_record(tensors, key, **changes):
    record = tensors[key]
    meta = json.loads(bytes(record.tolist()).decode("utf-8"))
    meta.update(changes)
    tensors[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return tensors


@pytest.mark.parametrize("changes, match", [
    (dict(quant_type="fp4"), "quant_type"),
    (dict(blocksize=4096), "blocksize"),
    (dict(shape=[3, 0]), "shape"),
    (dict(dtype="int8"), "dtype"),
    (dict(nested_blocksize=128), "nested_blocksize"),
])
def test_from_state_dict_bad_record(changes, match):
    key = "m.weight.quant_state.bitsandbytes__nf4"
    tensors = _with_record(nf4_to_state_dict(nf4_quantize(torch.randn(3, 37), 64, True), "m."),
                           key, **changes)
    with pytest.raises(ValueError, match=match):
        nf4_from_state_dict(tensors, "m.")


def test_from_state_dict_rejects_fp4_and_garbage():
    tensors = nf4_to_state_dict(nf4_quantize(torch.randn(3, 37), 64), "m.")
    fp4 = dict(tensors)
    record = fp4.pop("m.weight.quant_state.bitsandbytes__nf4")
    fp4["m.weight.quant_state.bitsandbytes__fp4"] = record
    with pytest.raises(ValueError, match="not nf4"):
        nf4_from_state_dict(fp4, "m.")
    not_utf8 = torch.tensor([0xFF, 0x7B], dtype=torch.uint8)
    tensors["m.weight.quant_state.bitsandbytes__nf4"] = not_utf8
    with pytest.raises(ValueError, match="JSON"):
        nf4_from_state_dict(tensors, "m.")
    with pytest.raises(ValueError, match="dtype"):
        nf4_from_state_dict(nf4_to_state_dict(nf4_quantize(torch.randn(3, 37))), "",
                                  dtype=torch.int8)


def test_from_bnb_rejects_fp4():
    F = _bnb()
    packed, state = F.quantize_4bit(torch.randn(3, 64), blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="nf4"):
        NF4Weight.from_bnb(packed, state)


def test_nf4_code_is_bitsandbytes_code():
    F = _bnb()
    assert torch.equal(nf4_code(), F.get_4bit_type("nf4", device="cpu"))
