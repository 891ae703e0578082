"""Flash attention (packed documents, GQA) against the float64 oracle, torch autograd of
that oracle, and a proof that key/query blocks outside a block's documents are skipped."""
from __future__ import annotations

import pytest
import torch

from csrc_triton.attention import (AttentionBlocks, document_bounds, flash_attention,
                                   flash_attention_backward, flash_attention_forward)
from tests.helpers import assert_close, quantized
from tests.reference.attention import reference_attention, reference_visible

# a kernel against its float64 reference: also run under the oldest supported triton
# (tests/test_supported_tritons.py)
pytestmark = pytest.mark.kernels

OP = "flash_attention"

# Tolerances. Values are O(1) (outputs are convex combinations of unit-normal V;
# gradients are sums of O(S) products of O(1) terms, largest seen ~5).
#  fp32: the interpreter computes in IEEE fp32; a row's softmax and its dots sum at
#        most ~150 terms, each rounding 2^-24 relative, ~1e-5 worst case at |x| ~ 5;
#        seen max 2e-6, so atol 2e-5 / rtol 1e-5 has ~10x margin.
#  fp16: the same fp32 computation rounded once to fp16: half an ulp is 2^-11
#        relative; rtol 2^-10 = one ulp, atol 1e-4 covers values near fp16's
#        subnormal spacing and the fp32 error above on cancelling sums.
#        One more fp16 effect, bounded per element (delta_rounding_bound): the backward's
#        Delta_i = dO_i . O_i uses O as stored, rounded to fp16 (as every flash
#        attention backward does); that error reaches dQ and dK through dS = P (dP - Delta).
#  lse is fp32 in both: |lse| <= ~10, fp32 log/exp2 rounding, atol 1e-5.
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-5),
             torch.float16: dict(atol=1e-4, rtol=2**-10)}
LSE_TOLERANCE = dict(atol=1e-5, rtol=1e-6)


def packed_segments(batch: int, seq: int, lengths=None) -> torch.Tensor:
    """Segment ids: documents of very different lengths (one-token ones included),
    then padding (-1) at the end of some rows."""
    rows = []
    for b in range(batch):
        row = []
        pattern = lengths or [1, int(torch.randint(2, seq, ())), 1, 3, seq]
        for doc, length in enumerate(pattern):
            row += [doc] * length
        row = row[:seq]
        if b == batch - 1:                              # right padding on the last row
            n_pad = int(torch.randint(1, max(2, seq // 4), ()))
            row = row[:seq - n_pad] + [-1] * n_pad
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


def make_inputs(batch, seq, n_q, n_kv, head_dim, dtype):
    q = torch.randn(batch, seq, n_q, head_dim).to(dtype)
    k = torch.randn(batch, seq, n_kv, head_dim).to(dtype)
    v = torch.randn(batch, seq, n_kv, head_dim).to(dtype)
    return q, k, v


def visible_of(segments, batch, seq):
    """Bool [B, S, S] of who sees whom: ``segments`` is segment ids [B, S], None (one
    causal document per row), or already such a mask (tests/test_attention_keys.py)."""
    if segments is not None and segments.dtype == torch.bool:
        return segments
    return reference_visible(segments, batch, seq)


def reference_with_grads(q, k, v, segments, d_out, dtype):
    q64, k64, v64 = (quantized(t, dtype).requires_grad_(True) for t in (q, k, v))
    out, lse = reference_attention(q64, k64, v64, visible=visible_of(segments, *q.shape[:2]))
    grads = torch.autograd.grad(out, (q64, k64, v64), quantized(d_out, dtype))
    return out.detach(), lse.detach(), grads


def delta_rounding_bound(q, k, out, d_out, segments, dtype):
    """Largest change of (dQ, dK) caused by rounding O to ``dtype`` before Delta = dO . O:
    |dDelta_i| <= u sum_d |dO_id| |O_id| (u = half an ulp, relative), and with
    dS_ij = -P_ij dDelta_i:  |ddQ_i| <= c sum_j P_ij |dDelta_i| |K_j|,
    |ddK_j| <= c sum_i P_ij |dDelta_i| |Q_i| (K/V repeated per query head, dK summed
    over each kv head's group). All float64, from the reference's own quantities."""
    if dtype == torch.float32:
        return 0.0, 0.0
    unit = torch.finfo(dtype).eps / 2
    batch, seq, n_q, head_dim = q.shape
    group = n_q // k.shape[2]
    q64, k64 = quantized(q, dtype), quantized(k, dtype).repeat_interleave(group, dim=2)
    scale = head_dim ** -0.5
    scores = torch.einsum("bihd,bjhd->bhij", q64, k64) * scale
    visible = visible_of(segments, batch, seq)[:, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    delta_error = unit * (quantized(d_out, dtype).abs() * out.double().abs()).sum(-1)  # [B, S, H]
    weighted = probs * delta_error.transpose(1, 2)[..., None]                         # [B, H, S, S]
    dq = scale * torch.einsum("bhij,bjhd->bihd", weighted, k64.abs())
    dk = scale * torch.einsum("bhij,bihd->bjhd", weighted, q64.abs())
    dk = dk.view(batch, seq, k.shape[2], group, head_dim).sum(3)
    return dq, dk


def assert_within(label, got, ref, dtype, extra):
    """|got - ref| <= atol + rtol |ref| + extra, element by element (in units of that bound)."""
    tol = TOLERANCE[dtype]
    allowed = tol["atol"] + tol["rtol"] * ref.double().abs() + extra
    assert_close(OP + " (units of bound)", label, got.double() / allowed, ref.double() / allowed,
                 atol=1.0, rtol=0.0)


def check_all(label, dtype, got, want, inputs):
    (out, lse, grads), (out_ref, lse_ref, grads_ref) = got, want
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(OP, f"{label} out", out, out_ref, **TOLERANCE[dtype])
    assert_close(OP, f"{label} lse", lse, lse_ref, **LSE_TOLERANCE)
    q, k, d_out, segments = inputs
    extra_dq, extra_dk = delta_rounding_bound(q, k, out, d_out, segments, dtype)
    for name, g, r, extra in zip(("dq", "dk", "dv"), grads, grads_ref, (extra_dq, extra_dk, 0.0)):
        assert g.dtype == dtype
        assert_close(OP, f"{label} {name}", g, r, atol=float("inf"), rtol=0.0)  # logs the error
        assert_within(f"{label} {name}", g, r, dtype, extra)


# (B, S, Hq, Hkv, D): odd S, GQA 1/2/4/8, head dims 64, 128 and two odd ones
# (72 pads to 128, 200 to 256).
SHAPES = [(2, 67, 2, 2, 64), (1, 53, 4, 2, 128), (1, 91, 4, 1, 72), (1, 45, 8, 1, 64),
          (1, 29, 2, 1, 200)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_against_float64(shape, dtype):
    batch, seq, n_q, n_kv, head_dim = shape
    q, k, v = make_inputs(batch, seq, n_q, n_kv, head_dim, dtype)
    segments = packed_segments(batch, seq)
    bounds = document_bounds(segments)
    out, lse = flash_attention_forward(q, k, v, bounds)
    d_out = torch.randn_like(out)
    grads = flash_attention_backward(d_out, q, k, v, out, lse, bounds)
    check_all(f"{shape}", dtype, (out, lse, grads),
              reference_with_grads(q, k, v, segments, d_out, dtype), (q, k, d_out, segments))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_causal_document_per_row_without_segment_ids(dtype):
    q, k, v = make_inputs(2, 43, 2, 1, 64, dtype)
    out, lse = flash_attention_forward(q, k, v, None)
    d_out = torch.randn_like(out)
    grads = flash_attention_backward(d_out, q, k, v, out, lse, None)
    check_all("no segments", dtype, (out, lse, grads),
              reference_with_grads(q, k, v, None, d_out, dtype), (q, k, d_out, None))


@pytest.mark.parametrize("tiles", [AttentionBlocks(16, 16, 4, 1), AttentionBlocks(32, 16, 4, 1),
                                   AttentionBlocks(16, 32, 4, 1, block_h=2)],
                         ids=["16x16", "32x16", "16x32-h2"])
def test_many_small_blocks_and_every_document_shape(tiles):
    """Small tiles over 150 tokens: documents of 1, 1, 2, 60, 1, 37 tokens and padding in
    the middle of a row and at its start, so blocks start, end, skip, are masked (the
    diagonal, a document start) and unmasked (wholly inside a document, below the
    diagonal) everywhere, with query tiles taller and shorter than key tiles. (The other
    tests run the interpreter's default tiles, one tile per short sequence.)"""
    dtype = torch.float32
    q, k, v = make_inputs(2, 150, 2, 1, 32, dtype)
    row0 = [0] + [1] + [2] * 2 + [3] * 60 + [4] + [5] * 37 + [-1] * 48
    row1 = [-1] * 5 + [0] * 100 + [-1] * 3 + [1] * 42
    segments = torch.tensor([row0, row1])
    bounds = document_bounds(segments)
    out, lse = flash_attention_forward(q, k, v, bounds, _blocks_override=tiles)
    d_out = torch.randn_like(out)
    grads = flash_attention_backward(d_out, q, k, v, out, lse, bounds, _blocks_override=tiles)
    want = reference_with_grads(q, k, v, segments, d_out, dtype)
    check_all(f"{tiles} tiles", dtype, (out, lse, grads), want, (q, k, d_out, segments))
    padding = segments < 0
    # padding rows: exactly zero output and gradients, -inf lse, and no NaN anywhere
    assert (out[padding] == 0).all() and (grads[0][padding] == 0).all()
    assert (grads[1][padding] == 0).all() and (grads[2][padding] == 0).all()
    assert torch.isneginf(lse.transpose(1, 2)[padding]).all()


@pytest.mark.parametrize("with_bounds", [True, False], ids=["documents", "causal"])
def test_fused_qkv_views_and_one_gradient_buffer(with_bounds):
    """q, k, v as column slices of one [T, (Hq + 2 Hkv) D] buffer (the fused projection's
    output, as the model hands them over) and dq, dk, dv written into slices of one such
    buffer (poisoned first): bitwise what contiguous copies give, every element written,
    and within the float64 tolerances. 16 x 16 tiles over 45 tokens: masked and
    unmasked blocks, with and without document bounds."""
    dtype, (batch, seq, n_q, n_kv, d) = torch.float16, (2, 45, 4, 2, 16)
    tiles, width = AttentionBlocks(16, 16, 4, 1), (n_q + 2 * n_kv) * d

    def heads(buffer):
        q, k, v = buffer.split([n_q * d, n_kv * d, n_kv * d], dim=1)
        return (q.view(batch, seq, n_q, d), k.view(batch, seq, n_kv, d),
                v.view(batch, seq, n_kv, d))

    q, k, v = heads(torch.randn(batch * seq, width).to(dtype))
    segments = packed_segments(batch, seq) if with_bounds else None
    bounds = document_bounds(segments) if with_bounds else None
    contiguous = [t.contiguous() for t in (q, k, v)]
    out, lse = flash_attention_forward(q, k, v, bounds, _blocks_override=tiles)
    want_out, want_lse = flash_attention_forward(*contiguous, bounds, _blocks_override=tiles)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    d_out = torch.randn_like(out)
    want = flash_attention_backward(d_out, *contiguous, out, lse, bounds, _blocks_override=tiles)
    buffer = torch.full((batch * seq, width), float("nan"), dtype=dtype)
    got = flash_attention_backward(d_out, q, k, v, out, lse, bounds, into=heads(buffer),
                                   _blocks_override=tiles)
    assert all(g.data_ptr() == h.data_ptr() for g, h in zip(got, heads(buffer)))
    for g, w in zip(heads(buffer), want):
        assert torch.equal(g, w)
    check_all("fused views", dtype, (out, lse, got),
              reference_with_grads(*contiguous, segments, d_out, dtype),
              (contiguous[0], contiguous[1], d_out, segments))


@pytest.mark.filterwarnings("ignore:All-NaN slice")     # the poisoned rows' own row maxima
def test_blocks_outside_a_block_documents_are_skipped_not_masked():
    """NaN placed in whole 16-token blocks that lie before a query block's first
    document or after its last query. A masked block still enters the dots
    (0 * NaN = NaN); only a skipped block leaves the checked rows finite."""
    dtype = torch.float32
    seq, tiles = 150, AttentionBlocks(16, 16, 4, 1, block_h=2)   # both query heads per tile
    segments = torch.tensor([[0] * 40 + [1] * 60 + [2] * 50])      # A [0,40) B [40,100) C [100,150)
    q, k, v = make_inputs(1, seq, 2, 1, 32, dtype)
    d_out = torch.randn(1, seq, 2, 32)
    clean = reference_with_grads(q, k, v, segments, d_out, dtype)
    poisoned = torch.zeros(seq, dtype=torch.bool)
    poisoned[:32] = True                                           # whole blocks of A only
    poisoned[112:] = True                                          # whole blocks of C only
    for t in (q, k, v, d_out):
        t[:, poisoned] = float("nan")
    bounds = document_bounds(segments)
    out, lse = flash_attention_forward(q, k, v, bounds, _blocks_override=tiles)
    dq, dk, dv = flash_attention_backward(d_out, q, k, v, out, lse, bounds, _blocks_override=tiles)
    # rows/keys 48..95: blocks wholly inside B, whose visible range is [32, 112)
    checked = slice(48, 96)
    out_ref, _, (dq_ref, dk_ref, dv_ref) = clean
    for name, got, ref in (("out", out, out_ref), ("dq", dq, dq_ref), ("dk", dk, dk_ref),
                           ("dv", dv, dv_ref)):
        assert_close(OP, f"skipped blocks {name}", got[:, checked], ref[:, checked],
                     **TOLERANCE[dtype])
    assert torch.isnan(out[:, :32]).all()          # the poison was really there


def test_gpu_launches_autotune_over_the_configs_that_passed_the_sm90_check():
    """What a GPU launch times on first use, per kernel and head dim: attention_configs'
    candidates minus PRUNED (the sweep test holds PRUNED to the compiler), keyed on the
    sequence bucket, heads, head dim and bounds (triton adds the dtypes)."""
    from csrc_triton import attention, attention_configs
    for kind in attention_configs.KINDS:
        for block_d in (16, 64, 128, 256):
            tuner = attention.tuned_kernel(kind, block_d)
            chosen = attention_configs.gpu_configs(kind, block_d)
            assert chosen and len(tuner.configs) == len(chosen)
            for config, blocks in zip(tuner.configs, chosen):
                assert (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps,
                        config.num_stages) == tuple(blocks)[:4]
                assert (kind, attention_configs.head_dim_class(block_d), blocks) \
                    not in attention_configs.PRUNED
            assert tuner.keys == attention.AUTOTUNE_KEY
    assert attention_configs.PRUNED            # the check did reject some candidates


def test_document_bounds_against_brute_force():
    segments = torch.cat([packed_segments(3, 57), torch.full((1, 57), -1),
                          torch.tensor([[-1] * 4 + [0] * 50 + [1] * 3])])
    first_key, key_end = document_bounds(segments.to(torch.int32))
    assert first_key.dtype == key_end.dtype == torch.int32
    for b, row in enumerate(segments.tolist()):
        for i, s in enumerate(row):
            same = [j for j in range(len(row)) if row[j] == s]
            if s < 0:
                assert (first_key[b, i], key_end[b, i]) == (i + 1, i)
            else:
                assert (first_key[b, i], key_end[b, i]) == (min(same), max(same) + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autograd_function_against_torch_autograd(dtype):
    q, k, v = make_inputs(2, 39, 2, 1, 48, dtype)
    segments = packed_segments(2, 39)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = flash_attention(*leaves, segments)
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, d_out)
    out_ref, lse_ref, grads_ref = reference_with_grads(q, k, v, segments, d_out, dtype)
    assert_close(OP, "autograd out", out, out_ref, **TOLERANCE[dtype])
    extras = delta_rounding_bound(q, k, out.detach(), d_out, segments, dtype) + (0.0,)
    for name, g, r, extra in zip(("dq", "dk", "dv"), grads, grads_ref, extras):
        assert_within(f"autograd {name}", g, r, dtype, extra)
    # an expanded (strided) upstream gradient is accepted
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    flash_attention(*leaves, segments).sum().backward()
    out64 = [quantized(t, dtype).requires_grad_(True) for t in (q, k, v)]
    reference_attention(*out64, segments)[0].sum().backward()
    out = flash_attention(q, k, v, segments)
    extras = delta_rounding_bound(q, k, out, torch.ones_like(out), segments, dtype) + (0.0,)
    for leaf, ref, extra in zip(leaves, out64, extras):
        assert_within("autograd from sum()", leaf.grad, ref.grad, dtype, extra)


def test_bad_arguments_raise_value_error():
    q, k, v = make_inputs(2, 9, 4, 2, 16, torch.float32)
    segments = torch.zeros(2, 9, dtype=torch.int64)
    with pytest.raises(ValueError, match="'segment_ids'.*shape"):
        flash_attention(q, k, v, segments[:, :8].contiguous())
    with pytest.raises(ValueError, match="'segment_ids'.*dtype"):
        flash_attention(q, k, v, segments.float())
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        flash_attention(q[:, :, :3].contiguous(), k, v)
    big = torch.randn(1, 2, 1, 257)
    with pytest.raises(ValueError, match="head dim.*257"):
        flash_attention(big, big, big)
    with pytest.raises(ValueError, match="'q'.*contiguous"):
        flash_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v)
    with pytest.raises(ValueError, match="'v'.*contiguous"):
        flash_attention(q, k, v.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="'k'.*dtype"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="'v'.*shape"):
        flash_attention(q, k, v[:, :, :1].contiguous())
    with pytest.raises(ValueError, match="'bounds'"):
        flash_attention_forward(q, k, v, segments)
    with pytest.raises(ValueError, match="first_key.*dtype"):
        flash_attention_forward(q, k, v, (segments, segments))
    out, lse = flash_attention_forward(q, k, v)
    with pytest.raises(ValueError, match="'lse'.*shape"):
        flash_attention_backward(out, q, k, v, out, lse[:, :2].contiguous())
    with pytest.raises(ValueError, match="'d_out'.*dtype"):
        flash_attention_backward(out.half(), q, k, v, out, lse)


# ---------------------------------------------------------------- bf16 error bounds

BF16_UNIT = 2.0 ** -8               # half an ulp of bf16, relative (8 significant bits)


def bf16_error_bounds(q, k, v, d_out):
    """Per-element bounds on |flash attention in bf16 - exact| for ONE causal document
    (q [L, Hq, D], k/v [L, Hkv, D], d_out [L, Hq, D], the bf16 values as float64),
    derived from where a bf16 flash attention rounds (ours, and SDPA's flash/cuDNN
    kernels alike), with u = 2^-8 and the fp32 sums' g = (L + D) 2^-24 (1 + max|s|):
      out: P rounded to bf16 for P V, out rounded:   (u + g) (P|V| + |O|)
      dV:  P rounded for P^T dO, dV rounded:           (u + g) (P^T|dO| + |dV|)
      dS = P (dP - Delta), Delta = dO . O from O as stored (rounded: u |dO| . |O|),
           dS rounded for its dots:  e_dS = (u + g) |dS| + P u (|dO| . |O|)
      dQ:  c e_dS |K| + (u + g) |dQ|,    dK: c e_dS^T |Q| + (u + g) |dK|
    (dK, dV summed over each kv head's query heads). Returns float64 (out, dq, dk, dv)
    bounds and the exact values (out, dq, dk, dv)."""
    L, n_q, head_dim = q.shape
    group = n_q // k.shape[1]
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    c = head_dim ** -0.5
    scores = torch.einsum("ihd,jhd->hij", q, kr) * c
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)     # [H, L, L]
    out = torch.einsum("hij,jhd->ihd", probs, vr)
    d_p = torch.einsum("ihd,jhd->hij", d_out, vr)
    delta = (d_out * out).sum(-1).T                                                # [H, L]
    d_s = probs * (d_p - delta[..., None])
    dq = c * torch.einsum("hij,jhd->ihd", d_s, kr)
    dk = c * torch.einsum("hij,ihd->jhd", d_s, q)
    dv = torch.einsum("hij,ihd->jhd", probs, d_out)
    g = (L + head_dim) * 2.0 ** -24 * (1.0 + float(scores.masked_fill(~causal, 0).abs().max()))
    e = BF16_UNIT + g
    out_bound = e * (torch.einsum("hij,jhd->ihd", probs, vr.abs()) + out.abs())
    dv_bound = e * (torch.einsum("hij,ihd->jhd", probs, d_out.abs()) + dv.abs())
    delta_error = BF16_UNIT * (d_out.abs() * out.abs()).sum(-1).T                  # [H, L]
    e_ds = e * d_s.abs() + probs * delta_error[..., None]
    dq_bound = c * torch.einsum("hij,jhd->ihd", e_ds, kr.abs()) + e * dq.abs()
    dk_bound = c * torch.einsum("hij,ihd->jhd", e_ds, q.abs()) + e * dk.abs()

    def per_kv_head(t):                 # [L, Hq, D] -> [L, Hkv, D], summed over the group
        return t.view(L, k.shape[1], group, head_dim).sum(2)

    return ((out_bound, dq_bound, per_kv_head(dk_bound), per_kv_head(dv_bound)),
            (out, dq, per_kv_head(dk), per_kv_head(dv)))


def _bf16(t):
    return t.to(torch.bfloat16).double()


def test_bf16_error_bounds_cover_an_emulated_bf16_flash_attention():
    """The bound's derivation, checked where it can be on a CPU: a float64 emulation that
    rounds exactly where a bf16 flash attention does (P and dS before their dots, O as
    stored before Delta, every output) stays within it, element by element, and uses a
    fair share of it somewhere (the bound is not vacuous)."""
    L, n_q, n_kv, d = 96, 4, 2, 32
    q, k, v, d_out = (_bf16(torch.randn(L, h, d)) for h in (n_q, n_kv, n_kv, n_q))
    (bounds, exact) = bf16_error_bounds(q, k, v, d_out)
    group, c = n_q // n_kv, d ** -0.5
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    scores = (torch.einsum("ihd,jhd->hij", q, kr) * c).masked_fill(~causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = _bf16(torch.einsum("hij,jhd->ihd", _bf16(probs), vr))
    d_s = probs * (torch.einsum("ihd,jhd->hij", d_out, vr) - (d_out * out).sum(-1).T[..., None])
    dq = _bf16(c * torch.einsum("hij,jhd->ihd", _bf16(d_s), kr))
    dk = _bf16(c * torch.einsum("hij,ihd->jhd", _bf16(d_s), q).view(L, n_kv, group, d).sum(2))
    dv = _bf16(torch.einsum("hij,ihd->jhd", _bf16(probs), d_out).view(L, n_kv, group, d).sum(2))
    for name, got, want, bound in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), exact, bounds):
        used = (got - want).abs() / bound
        assert float(used.max()) <= 1.0, name
        assert float(used.max()) >= 0.05, (name, float(used.max()))


# ---------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("n_kv,head_dim", [(8, 128), (2, 128), (8, 64)])
def test_bf16_against_sdpa_per_document(n_kv, head_dim):
    """bf16 on the GPU, 32 query heads, 2 x 2048 packed tokens: every document of every row
    against SDPA's flash / cuDNN kernel run on that document alone (causal), outputs and
    gradients. Both round where bf16_error_bounds says, so they may differ by twice its
    bound, computed per element from the document's own float64 magnitudes; each is also
    held to one bound from the float64 values. Padding rows: exactly 0."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dtype, device = torch.bfloat16, "cuda"
    batch, seq, n_q = 2, 2048, 32
    q, k, v = (t.to(device) for t in make_inputs(batch, seq, n_q, n_kv, head_dim, dtype))
    segments = packed_segments(batch, seq, lengths=[1, 700, 1, 3, 900, seq]).to(device)
    bounds = document_bounds(segments)
    out, lse = flash_attention_forward(q, k, v, bounds)
    d_out = torch.randn_like(out)
    grads = flash_attention_backward(d_out, q, k, v, out, lse, bounds)
    group = n_q // n_kv
    for b in range(batch):
        row = segments[b].tolist()
        starts = [i for i in range(seq) if row[i] >= 0 and (i == 0 or row[i] != row[i - 1])]
        for start in starts:
            end = start
            while end < seq and row[end] == row[start]:
                end += 1
            doc = [t[b, start:end] for t in (q, k, v, d_out)]
            leaves = [t.transpose(0, 1)[None].detach().requires_grad_(True) for t in doc[:3]]
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
                ref = torch.nn.functional.scaled_dot_product_attention(
                    leaves[0], leaves[1].repeat_interleave(group, 1),
                    leaves[2].repeat_interleave(group, 1), is_causal=True)
            sdpa = [ref] + list(torch.autograd.grad(ref, leaves, doc[3].transpose(0, 1)[None]))
            sdpa = [t[0].transpose(0, 1) for t in sdpa]
            limits, exact = bf16_error_bounds(*(t.double() for t in doc))
            ours = [out[b, start:end]] + [g[b, start:end] for g in grads]
            for name, got, other, bound, want in zip(("out", "dq", "dk", "dv"), ours, sdpa,
                                                     limits, exact):
                label = f"bf16 row {b} [{start}, {end}) {name}"
                assert_close(OP, label, got, want, atol=float("inf"), rtol=0.0)   # logs it
                assert_close(OP + " (units of bound)", label, got.double() / bound,
                             want / bound, atol=1.0, rtol=0.0)
                assert_close(OP + " vs SDPA (units of 2 bounds)", label,
                             got.double() / (2 * bound), other.double() / (2 * bound),
                             atol=1.0, rtol=0.0)
    padding = segments < 0
    assert (out[padding] == 0).all() and all((g[padding] == 0).all() for g in grads)
