"""64-bit indexing: every kernel that indexes activations computes the same values when an
offset passes 2^31 - 1, and its launcher picks the 64-bit variant exactly then.

A real [T, hidden] past 2^31 elements cannot run under the interpreter (minutes per
million rows, and GiBs of memory), so the tests use tiny tensors whose rows lie
FAR_ROWS = 2^30 + 64 elements apart in one lazily allocated storage (tests/helpers.py:
far_apart_rows): 3 rows put the last offset past 2^31, yet only a few pages are ever
touched. The launchers choose INDEX_64 by span (csrc_triton.checks.wide_index), so
these views take the 64-bit variant; a 32-bit kernel would wrap its offsets and read
or write 4 GiB below the tensor (garbage or a crash). Each result is compared
bitwise with the same launch on contiguous copies (the 32-bit variant, which every
op's own test holds to its float64 reference): the index width must change no value.
The sm_90 compile of every INDEX_64 variant is in tests/test_hopper_compile.py.
"""
from __future__ import annotations

import pytest
import torch

from csrc_triton import _runtime
from csrc_triton.checks import index_span, wide_index
from csrc_triton.attention import document_bounds, flash_attention_backward, flash_attention_forward
from csrc_triton.low_rank import low_rank_matmul
from csrc_triton.nf4_matmul import _choose
from csrc_triton.rms_norm import rms_norm_backward, rms_norm_forward
from csrc_triton.rope import rope_backward, rope_cos_sin, rope_forward
from csrc_triton.swiglu import swiglu_backward, swiglu_forward
from tests.helpers import FAR_ROWS, far_apart_rows

# a kernel against its float64 reference: also run under the oldest supported triton
# (tests/test_supported_tritons.py)
pytestmark = pytest.mark.kernels

DTYPE = torch.float16


def test_the_launchers_choose_64_bits_by_span():
    far = far_apart_rows(torch.randn(3, 8))
    assert index_span(far) == 2 * FAR_ROWS + 8 > _runtime.MAX_INT32_NUMEL
    assert wide_index(far) and not wide_index(far.contiguous(), None)
    assert not wide_index(far_apart_rows(torch.randn(2, 8)))           # 2^30 + 72: fits
    # a real [T, hidden] past the bound, as a meta tensor (no memory): 524,288 x 4096
    assert wide_index(torch.empty(2**19, 4096, device="meta"))
    assert not wide_index(torch.empty(2**19 - 1, 4096, device="meta"))
    assert index_span(torch.empty(0, 5)) == 0


def test_rms_norm():
    x, dy = far_apart_rows(torch.randn(3, 40).to(DTYPE)), far_apart_rows(torch.randn(3, 40).to(DTYPE))
    w = torch.randn(40)
    y, rstd = rms_norm_forward(x, w, 1e-5)
    y32, rstd32 = rms_norm_forward(x.contiguous(), w, 1e-5)
    assert torch.equal(y, y32) and torch.equal(rstd, rstd32)
    dx, _ = rms_norm_backward(dy, x, w, rstd, False)
    assert torch.equal(dx, rms_norm_backward(dy.contiguous(), x.contiguous(), w, rstd, False)[0])


def test_swiglu_reads_and_writes_far_rows():
    gate_up = far_apart_rows(torch.randn(3, 2 * 24).to(DTYPE))
    gate, up = gate_up[:, :24], gate_up[:, 24:]
    h = swiglu_forward(gate, up)
    assert torch.equal(h, swiglu_forward(gate.contiguous(), up.contiguous()))
    dh = torch.randn(3, 24).to(DTYPE)
    want = swiglu_backward(dh, gate.contiguous(), up.contiguous())
    out = far_apart_rows(torch.full((3, 48), float("nan")).to(DTYPE))    # poisoned
    got = swiglu_backward(dh, gate, up, out=(out[:, :24], out[:, 24:]))
    assert got[0].data_ptr() == out.data_ptr()
    assert torch.equal(out[:, :24], want[0]) and torch.equal(out[:, 24:], want[1])


def test_rope_in_place_on_far_token_rows():
    n_q, n_kv, d = 2, 1, 16
    cos, sin = rope_cos_sin(d, 64, 10000.0)
    positions = torch.tensor([[5, 0, 17]])
    fused = far_apart_rows(torch.randn(3, (n_q + 2 * n_kv) * d).to(DTYPE))
    q = fused[:, :n_q * d].view(1, 3, n_q, d)
    k = fused[:, n_q * d:(n_q + n_kv) * d].view(1, 3, n_kv, d)
    want_q, want_k = rope_forward(q.contiguous(), k.contiguous(), positions, cos, sin)
    back_q, back_k = rope_backward(want_q, want_k, positions, cos, sin)
    rope_forward(q, k, positions, cos, sin, in_place=True)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    rope_backward(q, k, positions, cos, sin, in_place=True)
    assert torch.equal(q, back_q) and torch.equal(k, back_k)


def test_attention_reads_and_writes_far_token_rows():
    n_q, n_kv, d, seq = 2, 1, 16, 3
    width = (n_q + 2 * n_kv) * d

    def heads(buffer):
        q, k, v = buffer.split([n_q * d, n_kv * d, n_kv * d], dim=1)
        return q.view(1, seq, n_q, d), k.view(1, seq, n_kv, d), v.view(1, seq, n_kv, d)

    fused = far_apart_rows(torch.randn(seq, width).to(DTYPE))
    q, k, v = heads(fused)
    bounds = document_bounds(torch.tensor([[0, 0, 1]]))
    out, lse = flash_attention_forward(q, k, v, bounds)
    contiguous = [t.contiguous() for t in (q, k, v)]
    out32, lse32 = flash_attention_forward(*contiguous, bounds)
    assert torch.equal(out, out32) and torch.equal(lse, lse32)
    d_out = torch.randn_like(out)
    want = flash_attention_backward(d_out, *contiguous, out, lse, bounds)
    grads = far_apart_rows(torch.full((seq, width), float("nan")).to(DTYPE))   # poisoned
    flash_attention_backward(d_out, q, k, v, out, lse, bounds, into=heads(grads))
    for got, ref in zip(heads(grads), want):
        assert torch.equal(got, ref)


def test_low_rank_matmul_and_nf4_dispatch():
    a = far_apart_rows(torch.randn(3, 32).to(DTYPE))
    b = torch.randn(32, 8).to(DTYPE)
    assert torch.equal(low_rank_matmul(a, b, torch.float32),
                       low_rank_matmul(a.contiguous(), b, torch.float32))
    # the fused NF4 kernels index in 32 bits: such activations take the dequantize path
    assert _choose("op", 3, None, DTYPE, None, a.contiguous()) == "fused"
    assert _choose("op", 3, None, DTYPE, None, a) == "dequant"
    with pytest.raises(ValueError, match="path 'fused' indexes activations in 32 bits"):
        _choose("op", 3, "fused", DTYPE, None, a)
