"""The torch attention backend does not compute the keys that every query of a query
block has in its gap (issue 30: a DPO pair's rejected queries skip the chosen answer's
keys instead of computing and masking them).

Query blocks of 16 tokens (QUERY_BLOCK patched down, as tests/test_torch_backend.py
does) so that a 160-token row has blocks wholly inside the rejected answers. The
masks come from tests/test_attention_keys.py's definitions (who may see whom, per
token role), never from the backend's bounds code."""
from __future__ import annotations

import pytest
import torch

import csrc_torch.attention as torch_attention
from tests.test_attention import make_inputs
from tests.test_attention_keys import (LONG_PAIRS, LONG_SEQ, bounds_from_mask, check_against_oracle,
                                       layout, unit_ends, visible_from_definitions)

pytestmark = pytest.mark.kernels

BLOCK, SEQ = 16, 160
# both rows' chosen answers are the keys [32, 80), block-aligned, so the prompt queries'
# blocks [0, 32) never read them; row 1 starts and ends with padding (its last block
# [144, 160) is padding there and rejected queries in row 0: padding must not stop the skip)
ROWS = [[("pair", 32, 48, 80)],
        [("pad", 16), ("pair", 16, 48, 64)]]
CHOSEN = slice(32, 80)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(torch_attention, "QUERY_BLOCK", BLOCK)


def _run(q, k, v, d_out, bounds):
    out, lse = torch_attention.flash_attention_forward(q, k, v, bounds)
    return out, torch_attention.flash_attention_backward(d_out, q, k, v, out, lse, bounds)


@pytest.mark.parametrize("loose", [False, True], ids=["tight-key-end", "pair-end-key-end"])
def test_keys_in_every_query_gap_of_a_block_are_not_computed(small_blocks, loose):
    """NaN in the chosen keys' k and v. A computed-then-masked key still enters P V and
    dO V^T (0 x NaN = NaN), so only skipped keys leave the rejected queries finite: their
    out and dq, and dk/dv of the rejected keys (seen only by rejected queries), must be
    bitwise the clean run's; so must out and dq of the prompt and padding queries. The
    prompt keys' dk/dv are left out: the chosen queries, which do see the poison, feed
    them."""
    units, roles = layout(ROWS, SEQ)
    visible = visible_from_definitions(units, roles)
    bounds = bounds_from_mask(visible, unit_ends(units) if loose else None)
    q, k, v = make_inputs(2, SEQ, 4, 2, 16, torch.float32)
    d_out = torch.randn(2, SEQ, 4, 16)
    clean_out, clean_grads = _run(q, k, v, d_out, bounds)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, CHOSEN] = float("nan")
    v_bad[:, CHOSEN] = float("nan")
    out, (dq, dk, dv) = _run(q, k_bad, v_bad, d_out, bounds)
    assert torch.isnan(out[0, CHOSEN]).all()       # the chosen queries did read the poison
    not_chosen = torch.cat([torch.arange(0, 32), torch.arange(80, SEQ)])
    rejected_and_padding = torch.arange(80, SEQ)
    for name, got, want, where in (("out", out, clean_out, not_chosen),
                                   ("dq", dq, clean_grads[0], not_chosen),
                                   ("dk", dk, clean_grads[1], rejected_and_padding),
                                   ("dv", dv, clean_grads[2], rejected_and_padding)):
        got, want = got[:, where], want[:, where]
        assert torch.isfinite(got).all(), f"{name}: NaN at non-chosen positions (keys computed)"
        assert torch.equal(got, want), f"{name}: differs from the un-poisoned run"


def test_block_keys_cover_every_key_seen_and_skip_the_common_gap():
    """Per query block, the key ranges _key_blocks returns: every key some query of the
    block sees (brute force from the mask) is in them, in order, once; the blocks wholly
    inside both rows' rejected answers (or row 1's padding) leave out exactly [32, 80)."""
    units, roles = layout(ROWS, SEQ)
    visible = visible_from_definitions(units, roles)
    bounds = bounds_from_mask(visible)
    blocks = list(torch_attention._key_blocks(bounds, SEQ, BLOCK))
    assert [q0 for q0, _, _ in blocks] == list(range(0, SEQ, BLOCK))
    for q0, q1, pieces in blocks:
        keys = [j for a, b in pieces for j in range(a, b)]
        assert keys == sorted(set(keys))
        seen = visible[:, q0:q1].any(dim=0).any(dim=0).nonzero().flatten().tolist()
        assert set(seen) <= set(keys), (q0, pieces)
        if q0 >= 80:
            assert pieces == ((0, 32), (80, q1)), (q0, pieces)


@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pairs_on_small_query_blocks_against_float64(monkeypatch, block, dtype):
    """Rows whose pairs' gaps differ, with padding and a plain document: blocks whose
    common gap is partial, empty, or clipped to the block's keys; every element of out,
    lse, dq, dk, dv against the float64 oracle (tests/test_attention.py's tolerances)."""
    monkeypatch.setattr(torch_attention, "QUERY_BLOCK", block)
    for rows, seq in ((LONG_PAIRS, LONG_SEQ), (ROWS, SEQ)):
        units, roles = layout(rows, seq)
        visible = visible_from_definitions(units, roles)
        bounds = bounds_from_mask(visible)
        check_against_oracle(f"pairs, query blocks of {block}", "torch", visible, bounds,
                             (2, seq, 4, 2, 16), dtype)
