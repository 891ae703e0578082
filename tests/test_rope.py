"""RoPE kernels and tables against the float64 oracle, torch autograd and transformers'
LlamaRotaryEmbedding + apply_rotary_pos_emb (LLaMA-3 rope scaling)."""
from __future__ import annotations

import math

import pytest
import torch

from anita_core.model.rope_scaling import rope_cos_sin, rope_inv_freq
from csrc_triton.rope import Llama3Scaling, rope_backward, rope_forward, rope_op
from csrc_triton.rope import rope_cos_sin as kernel_rope_cos_sin
from tests.helpers import assert_close, quantized
from tests.reference.rope import (reference_cos_sin, reference_inv_freq, reference_rope)

# a kernel against its float64 reference: also run under the oldest supported triton
# (tests/test_supported_tritons.py)
pytestmark = pytest.mark.kernels

OP = "rope"

# Tolerances per dtype for rotated values of size O(1..5):
#  fp32: two products and a sum, i.e. three fp32 roundings (2^-24 ~ 6e-8 relative)
#        of terms up to ~10, ~2e-6 at worst; 1e-5 leaves ~5x margin.
#  fp16: computed in fp32, rounded once; rtol 1e-3 ~ one fp16 ulp (2^-10) covers
#        the half-ulp rounding; atol 1e-5 covers fp16 subnormals (spacing 6e-8)
#        and fp32 cancellation in x1 c - x2 s.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5),
             torch.float16: dict(atol=1e-5, rtol=1e-3)}

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA3_THETA = 500000.0


def packed_positions(batch: int, seq: int, dtype=torch.int64) -> torch.Tensor:
    """Positions of packed documents: each row is cut into random-length documents,
    each counting from 0."""
    rows = []
    for _ in range(batch):
        row = []
        while len(row) < seq:
            row.extend(range(int(torch.randint(1, seq + 1, ()))))
        rows.append(row[:seq])
    return torch.tensor(rows, dtype=dtype)


# ---------------------------------------------------------------- tables

@pytest.mark.parametrize("head_dim,theta,scaling", [
    (34, 10000.0, None),
    (18, LLAMA3_THETA, LLAMA3_SCALING),
    (128, LLAMA3_THETA, LLAMA3_SCALING),
    (18, LLAMA3_THETA, {"rope_type": "default"}),
])
def test_tables_against_float64(head_dim, theta, scaling):
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    expected_inv_freq = reference_inv_freq(head_dim, theta, scaling)
    assert inv_freq.dtype == torch.float32
    # Both round one float64 value to fp32; one fp32 ulp lets a near-tie go either way.
    assert_close("rope_cos_sin", "inv_freq", inv_freq, expected_inv_freq, atol=0.0, rtol=2**-23)

    max_position = 9000
    cos, sin = rope_cos_sin(head_dim, max_position, theta, scaling)
    assert cos.shape == sin.shape == (max_position, head_dim // 2)
    assert cos.dtype == sin.dtype == torch.float32
    cos_ref, sin_ref = reference_cos_sin(expected_inv_freq, max_position)
    # cos/sin of a float64 angle rounded once to fp32: at most half an ulp of a value
    # in [-1, 1], i.e. 2^-25; 2^-24 leaves room for float64 cos/sin's own error.
    assert_close("rope_cos_sin", "cos", cos, cos_ref, atol=2**-24, rtol=0.0)
    assert_close("rope_cos_sin", "sin", sin, sin_ref, atol=2**-24, rtol=0.0)


def test_llama3_scaling_changes_the_frequencies_it_should():
    """With theta 5e5, D = 18 and an 8192 context, the frequencies fall into all three
    llama3 regimes: the fastest are kept, one is blended, the slowest divided by factor."""
    plain = rope_inv_freq(18, LLAMA3_THETA, None).double()
    scaled = rope_inv_freq(18, LLAMA3_THETA, LLAMA3_SCALING).double()
    ratio = plain / scaled
    wavelength = 2 * math.pi / plain
    kept = wavelength < 8192 / 4
    stretched = wavelength > 8192 / 1
    blended = ~kept & ~stretched
    assert kept.any() and stretched.any() and blended.any()
    assert torch.equal(ratio[kept], torch.ones_like(ratio[kept]))
    # fp32 rounding of each inv_freq: ratio within 2 fp32 ulps of the factor.
    assert_close("rope_cos_sin", "stretched ratio", ratio[stretched],
                 torch.full_like(ratio[stretched], 8.0), atol=0.0, rtol=2**-22)
    assert ((ratio[blended] > 1) & (ratio[blended] < 8)).all()


def _hf_rotary(head_dim, theta, scaling, max_position):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    n_heads = 6
    config = LlamaConfig(hidden_size=head_dim * n_heads, num_attention_heads=n_heads,
                         num_key_value_heads=2, head_dim=head_dim,
                         max_position_embeddings=max_position,
                         rope_parameters=dict(scaling or {"rope_type": "default"},
                                              rope_theta=theta))
    return LlamaRotaryEmbedding(config)


def _hf_table_bound(theta, inv_freq, positions):
    """How far HF's fp32 cos/sin may lie from ours at these positions [..] x freqs.

    HF builds inv_freq in fp32 (theta ** (2i/D) with the exponent rounded to fp32,
    amplified by ln(theta); plus pow, divide and llama3 blending roundings), so
    inv_freq may differ by (ln(theta) + 4) fp32 ulps; it multiplies
    position * inv_freq in fp32 (half an ulp of the angle) and takes cos/sin in
    fp32 (an ulp or two). Ours takes the angle and cos/sin in float64.
    """
    angle = positions.double()[..., None] * inv_freq.double()
    return angle * (math.log(theta) + 5) * 2**-24 + 2**-22


def test_tables_against_transformers_llama3():
    head_dim, max_position = 18, 20000
    hf = _hf_rotary(head_dim, LLAMA3_THETA, LLAMA3_SCALING, max_position)
    inv_freq = rope_inv_freq(head_dim, LLAMA3_THETA, LLAMA3_SCALING)
    # HF's fp32 exponent error is amplified by ln(theta) (see _hf_table_bound).
    assert_close("rope_cos_sin_vs_hf", "inv_freq", inv_freq, hf.inv_freq,
                 atol=0.0, rtol=(math.log(LLAMA3_THETA) + 4) * 2**-24)

    cos, sin = rope_cos_sin(head_dim, max_position, LLAMA3_THETA, LLAMA3_SCALING)
    positions = torch.arange(max_position)
    hf_cos, hf_sin = hf(torch.zeros(1), positions[None])
    half = head_dim // 2
    # HF duplicates the half-table (emb = cat(freqs, freqs)); both halves must match ours.
    bound = _hf_table_bound(LLAMA3_THETA, inv_freq, positions)
    for name, ours, theirs in (("cos", cos, hf_cos[0]), ("sin", sin, hf_sin[0])):
        for part in (theirs[:, :half], theirs[:, half:]):
            # Compared in units of the per-element bound: |ours - HF| <= bound.
            assert_close("rope_cos_sin_vs_hf (units of bound)", name,
                         ours.double() / bound, part.double() / bound, atol=1.0, rtol=0.0)


# ---------------------------------------------------------------- kernels

# (B, S, Hq, Hkv, D): GQA and MHA, head dims not powers of two, D = 2 (one pair);
# 2 x 150 tokens span three programs of 128 tokens in the interpreter, the last partial.
SHAPES = [(2, 13, 6, 2, 18), (2, 150, 6, 2, 34), (3, 5, 1, 1, 2), (1, 7, 5, 5, 18)]
MAX_POSITION = 300


def make_inputs(shape, dtype, positions_dtype=torch.int64):
    batch, seq, n_q, n_kv, head_dim = shape
    q = torch.randn(batch, seq, n_q, head_dim).to(dtype)
    k = torch.randn(batch, seq, n_kv, head_dim).to(dtype)
    # Arbitrary positions anywhere in the table, not an arange.
    positions = torch.randint(0, MAX_POSITION, (batch, seq), dtype=positions_dtype)
    return q, k, positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_against_float64(shape, dtype):
    head_dim = shape[-1]
    cos, sin = rope_cos_sin(head_dim, MAX_POSITION, LLAMA3_THETA, LLAMA3_SCALING)
    q, k, positions = make_inputs(shape, dtype)
    q64, k64 = quantized(q, dtype), quantized(k, dtype)
    q_rot, k_rot = rope_forward(q, k, positions, cos, sin)
    assert q_rot.dtype == dtype and k_rot.dtype == dtype
    q_ref, k_ref = reference_rope(q64, k64, positions, cos, sin)
    assert_close(OP, "q_rot", q_rot, q_ref, **TOLERANCE[dtype])
    assert_close(OP, "k_rot", k_rot, k_ref, **TOLERANCE[dtype])

    dq_rot, dk_rot = torch.randn_like(q), torch.randn_like(k)
    dq, dk = rope_backward(dq_rot, dk_rot, positions, cos, sin)
    dq_ref, dk_ref = reference_rope(quantized(dq_rot, dtype), quantized(dk_rot, dtype),
                                    positions, cos, sin, inverse=True)
    assert_close(OP, "dq", dq, dq_ref, **TOLERANCE[dtype])
    assert_close(OP, "dk", dk, dk_ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_in_place_on_slices_of_the_fused_qkv_output(dtype):
    """q and k as column slices of one [T, (Hq + 2 Hkv) D] buffer, rotated in place
    (forward, then backward over the result): bitwise what contiguous inputs give out of
    place, v's columns untouched."""
    batch, seq, n_q, n_kv, d = 2, 7, 4, 2, 16
    cos, sin = rope_cos_sin(d, 64, 10000.0)
    positions = torch.randint(0, 64, (batch, seq))
    fused = torch.randn(batch * seq, (n_q + 2 * n_kv) * d).to(dtype)
    v_before = fused[:, (n_q + n_kv) * d:].clone()
    q = fused[:, :n_q * d].view(batch, seq, n_q, d)
    k = fused[:, n_q * d:(n_q + n_kv) * d].view(batch, seq, n_kv, d)
    want = rope_forward(q.contiguous(), k.contiguous(), positions, cos, sin)
    back = rope_backward(*want, positions, cos, sin)
    got = rope_forward(q, k, positions, cos, sin, in_place=True)
    assert got[0].data_ptr() == fused.data_ptr()
    assert torch.equal(q, want[0]) and torch.equal(k, want[1])
    rope_backward(q, k, positions, cos, sin, in_place=True)
    assert torch.equal(q, back[0]) and torch.equal(k, back[1])
    assert torch.equal(fused[:, (n_q + n_kv) * d:], v_before)


def test_int32_positions_and_packed_documents():
    shape = (2, 37, 6, 2, 18)
    cos, sin = rope_cos_sin(18, 64, 10000.0, None)
    q, k, _ = make_inputs(shape, torch.float32)
    positions = packed_positions(2, 37, dtype=torch.int32)
    q_rot, k_rot = rope_forward(q, k, positions, cos, sin)
    q_ref, k_ref = reference_rope(q.double(), k.double(), positions, cos, sin)
    assert_close(OP, "q_rot int32 packed", q_rot, q_ref, **TOLERANCE[torch.float32])
    assert_close(OP, "k_rot int32 packed", k_rot, k_ref, **TOLERANCE[torch.float32])


def test_reference_backward_matches_autograd_of_reference():
    """The oracle's rotation by -theta against float64 autograd of its forward."""
    cos, sin = rope_cos_sin(18, MAX_POSITION, LLAMA3_THETA, LLAMA3_SCALING)
    q, k, positions = make_inputs((2, 13, 6, 2, 18), torch.float64)
    q.requires_grad_(True)
    k.requires_grad_(True)
    dq_rot, dk_rot = torch.randn_like(q), torch.randn_like(k)
    auto = torch.autograd.grad(reference_rope(q, k, positions, cos, sin), (q, k), (dq_rot, dk_rot))
    closed = reference_rope(dq_rot, dk_rot, positions, cos, sin, inverse=True)
    # Both float64 with O(1) values: only float64 rounding (1e-16) separates them.
    assert_close("rope_reference", "dq", closed[0], auto[0], atol=1e-12, rtol=1e-12)
    assert_close("rope_reference", "dk", closed[1], auto[1], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autograd_function_against_torch_autograd(dtype):
    cos, sin = rope_cos_sin(34, MAX_POSITION, LLAMA3_THETA, LLAMA3_SCALING)
    q, k, positions = make_inputs((2, 13, 6, 2, 34), dtype)
    q.requires_grad_(True)
    k.requires_grad_(True)
    q64 = quantized(q, dtype).requires_grad_(True)
    k64 = quantized(k, dtype).requires_grad_(True)
    outputs = rope_op(q, k, positions, cos, sin)
    outputs_ref = reference_rope(q64, k64, positions, cos, sin)
    for name, out, ref in zip(("autograd q_rot", "autograd k_rot"), outputs, outputs_ref):
        assert_close(OP, name, out, ref, **TOLERANCE[dtype])
    dq_rot, dk_rot = torch.randn_like(q), torch.randn_like(k)
    grads = torch.autograd.grad(outputs, (q, k), (dq_rot, dk_rot))
    grads_ref = torch.autograd.grad(outputs_ref, (q64, k64),
                                    (quantized(dq_rot, dtype), quantized(dk_rot, dtype)))
    assert_close(OP, "autograd dq", grads[0], grads_ref[0], **TOLERANCE[dtype])
    assert_close(OP, "autograd dk", grads[1], grads_ref[1], **TOLERANCE[dtype])


def test_autograd_with_only_q_used_and_strided_gradient():
    # k_rot unused: its gradient arrives as zeros; q_rot.sum() gives an expanded gradient.
    cos, sin = rope_cos_sin(18, MAX_POSITION, 10000.0, None)
    q, k, positions = make_inputs((2, 13, 6, 2, 18), torch.float32)
    q.requires_grad_(True)
    k.requires_grad_(True)
    q_rot, _ = rope_op(q, k, positions, cos, sin)
    q_rot.sum().backward()
    q64 = q.detach().double().requires_grad_(True)
    reference_rope(q64, k.detach().double(), positions, cos, sin)[0].sum().backward()
    assert_close(OP, "dq from sum()", q.grad, q64.grad, **TOLERANCE[torch.float32])
    assert_close(OP, "dk unused", k.grad, torch.zeros_like(k, dtype=torch.float64),
                 **TOLERANCE[torch.float32])


def test_kernel_against_transformers_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim, max_position = 18, 20000
    batch, seq = 2, 37
    hf = _hf_rotary(head_dim, LLAMA3_THETA, LLAMA3_SCALING, max_position)
    q = torch.randn(batch, seq, 6, head_dim)
    k = torch.randn(batch, seq, 2, head_dim)
    positions = torch.randint(0, max_position, (batch, seq))
    hf_cos, hf_sin = hf(q, positions)                         # [B, S, D]
    q_hf, k_hf = apply_rotary_pos_emb(q, k, hf_cos, hf_sin, unsqueeze_dim=2)

    # 1) Our kernel fed HF's own table: only fp32 arithmetic separates the two.
    table_cos, table_sin = hf(q, torch.arange(max_position)[None])
    half = head_dim // 2
    q_rot, k_rot = rope_forward(q, k, positions, table_cos[0, :, :half].contiguous(),
                                table_sin[0, :, :half].contiguous())
    assert_close("rope_vs_hf", "q_rot (HF table)", q_rot, q_hf, **TOLERANCE[torch.float32])
    assert_close("rope_vs_hf", "k_rot (HF table)", k_rot, k_hf, **TOLERANCE[torch.float32])

    # 2) End to end with our tables: HF's fp32 angles drift from ours by up to the
    # table bound; y = x1 c -/+ x2 s moves by at most (|x1| + |x2|) * bound, plus
    # the fp32 arithmetic above.
    cos, sin = rope_cos_sin(head_dim, max_position, LLAMA3_THETA, LLAMA3_SCALING)
    q_rot, k_rot = rope_forward(q, k, positions, cos, sin)
    table_bound = _hf_table_bound(LLAMA3_THETA, rope_inv_freq(head_dim, LLAMA3_THETA,
                                                              LLAMA3_SCALING), positions)
    for name, x, ours, theirs in (("q_rot", q, q_rot, q_hf), ("k_rot", k, k_rot, k_hf)):
        pair_size = (x[..., :half].abs() + x[..., half:].abs()).double()
        bound = pair_size * table_bound[:, :, None, :] + TOLERANCE[torch.float32]["atol"]
        bound = torch.cat((bound, bound), dim=-1)
        assert_close("rope_vs_hf (units of bound)", name, ours.double() / bound,
                     theirs.double() / bound, atol=1.0, rtol=0.0)


def test_bad_arguments_raise_value_error():
    cos, sin = rope_cos_sin(18, 40, 10000.0, None)
    q, k, positions = make_inputs((2, 5, 6, 2, 18), torch.float32)
    positions = positions % 40
    with pytest.raises(ValueError, match="'positions' spans"):
        rope_forward(q, k, torch.full_like(positions, 40), cos, sin)
    with pytest.raises(ValueError, match="'positions' spans"):
        rope_backward(q, k, torch.full_like(positions, -1), cos, sin)
    with pytest.raises(ValueError, match="'positions'.*dtype"):
        rope_forward(q, k, positions.float(), cos, sin)
    with pytest.raises(ValueError, match="'positions'.*shape"):
        rope_forward(q, k, positions[:, :4].contiguous(), cos, sin)
    with pytest.raises(ValueError, match="must be even"):
        rope_forward(q[..., :17].contiguous(), k[..., :17].contiguous(), positions,
                     cos[:, :8].contiguous(), sin[:, :8].contiguous())
    with pytest.raises(ValueError, match="'k'.*shape"):
        rope_forward(q, k[:1].contiguous(), positions, cos, sin)
    with pytest.raises(ValueError, match="'k'.*shape"):
        rope_forward(q, k[..., :16].contiguous(), positions, cos, sin)
    with pytest.raises(ValueError, match="'q'.*dims"):
        rope_forward(q[0], k, positions, cos, sin)
    with pytest.raises(ValueError, match="'q'.*contiguous"):
        # [B, H, S, D] storage seen as [B, S, H, D]: the layout HF uses, not ours.
        rope_forward(q.transpose(1, 2).contiguous().transpose(1, 2), k, positions, cos, sin)
    with pytest.raises(ValueError, match="'cos'.*shape"):
        rope_forward(q, k, positions, cos[:, :8].contiguous(), sin, )
    with pytest.raises(ValueError, match="'sin'.*shape"):
        rope_forward(q, k, positions, cos, sin[:30].contiguous())
    with pytest.raises(ValueError, match="'cos'.*dtype"):
        rope_forward(q, k, positions, cos.half(), sin)
    with pytest.raises(ValueError, match="'dq_rot'.*dtype"):
        rope_backward(q.to(torch.int32), k, positions, cos, sin)
    with pytest.raises(ValueError, match="'k'.*meta"):
        rope_forward(q, k.to("meta"), positions, cos, sin)


def test_bad_table_arguments_raise_value_error():
    with pytest.raises(ValueError, match="'rope_type'.*'yarn'"):
        rope_cos_sin(18, 40, 10000.0, {"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="'type'.*'dynamic'"):
        rope_cos_sin(18, 40, 10000.0, {"type": "dynamic", "factor": 4.0})
    missing = {k: v for k, v in LLAMA3_SCALING.items() if k != "low_freq_factor"}
    with pytest.raises(ValueError, match="'low_freq_factor'"):
        rope_cos_sin(18, 40, LLAMA3_THETA, missing)
    with pytest.raises(ValueError, match="high_freq_factor"):
        rope_cos_sin(18, 40, LLAMA3_THETA, dict(LLAMA3_SCALING, high_freq_factor=1.0))
    with pytest.raises(ValueError, match="'factor'"):
        rope_cos_sin(18, 40, LLAMA3_THETA, dict(LLAMA3_SCALING, factor=0.0))
    with pytest.raises(ValueError, match="'head_dim'.*even"):
        rope_cos_sin(17, 40, 10000.0)
    with pytest.raises(ValueError, match="'max_position'"):
        rope_cos_sin(18, 0, 10000.0)
    with pytest.raises(ValueError, match="'rope_theta'"):
        rope_cos_sin(18, 40, -1.0)
    with pytest.raises(ValueError, match="'rope_scaling'"):
        rope_cos_sin(18, 40, 10000.0, "llama3")
    # the kernel package takes LLaMA-3's numbers, never a config dict
    with pytest.raises(ValueError, match="'llama3' must be a Llama3Scaling"):
        kernel_rope_cos_sin(18, 40, LLAMA3_THETA, LLAMA3_SCALING)
    with pytest.raises(ValueError, match="llama3.high_freq_factor"):
        kernel_rope_cos_sin(18, 40, LLAMA3_THETA, Llama3Scaling(8.0, 4.0, 1.0, 8192.0))


# ---------------------------------------------------------------- GPU only

def _bf16_parity(device, batch, seq, n_q, n_kv, head_dim, max_position):
    dtype = torch.bfloat16
    cos, sin = rope_cos_sin(head_dim, max_position, LLAMA3_THETA, LLAMA3_SCALING, device=device)
    q = torch.randn(batch, seq, n_q, head_dim, device=device).to(dtype)
    k = torch.randn(batch, seq, n_kv, head_dim, device=device).to(dtype)
    positions = packed_positions(batch, seq).to(device)
    q64, k64 = quantized(q, dtype), quantized(k, dtype)
    # bf16 keeps 8 significant bits: rtol 2^-7 is one ulp, over the half-ulp rounding
    # of a result computed in fp32; atol covers fp32 cancellation in x1 c - x2 s.
    bf16 = dict(atol=1e-5, rtol=2**-7)
    q_rot, k_rot = rope_forward(q, k, positions, cos, sin)
    q_ref, k_ref = reference_rope(q64, k64, positions, cos, sin)
    assert_close(OP, "bf16 q_rot", q_rot, q_ref, **bf16)
    assert_close(OP, "bf16 k_rot", k_rot, k_ref, **bf16)
    dq, dk = rope_backward(q, k, positions, cos, sin)
    dq_ref, dk_ref = reference_rope(q64, k64, positions, cos, sin, inverse=True)
    assert_close(OP, "bf16 dq", dq, dq_ref, **bf16)
    assert_close(OP, "bf16 dk", dk, dk_ref, **bf16)


@pytest.mark.gpu
def test_bf16_parity_llama3_8b_shapes():
    # LLaMA-3-8B attention: 32 query heads, 8 kv heads, head_dim 128; 2 x 2048 packed tokens.
    _bf16_parity("cuda", batch=2, seq=2048, n_q=32, n_kv=8, head_dim=128, max_position=8192)
