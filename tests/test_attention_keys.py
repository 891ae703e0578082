"""Key sets beyond whole documents (issues 30 and 27), both backends against the float64
oracle: a DPO pair packed with its prompt once, [prompt | chosen | rejected], whose
rejected queries skip the chosen keys (a gap per query), and a sliding window
(Mistral's), alone and within packed documents; the window's convention against
transformers' own sliding-window mask.

The oracle's mask is written from the definitions (who may see whom, per token role),
never from the kernels' bounds code; the bounds the kernels take are derived from
that mask by brute force here (bounds_from_mask), and document_bounds(window=W) is
held to it."""
from __future__ import annotations

import pytest
import torch

import csrc_torch.attention as torch_attention
import csrc_triton.attention as triton_attention
from csrc_triton.attention import AttentionBlocks, check_gap, document_bounds
from tests.helpers import assert_close
from tests.test_attention import (OP, TOLERANCE, check_all, make_inputs, packed_segments,
                                  reference_with_grads)

pytestmark = pytest.mark.kernels

BACKENDS = {"triton": triton_attention, "torch": torch_attention}
PROMPT, CHOSEN, REJECTED = 0, 1, 2


# ---------------------------------------------------------------- masks from definitions

def layout(rows, seq):
    """Per token (unit id, role) [B, S] from rows of ("doc", L), ("pair", P, C, R) and
    ("pad", n) (a row is padded at its end up to ``seq``): unit -1 is padding; a
    document's tokens all have role PROMPT; a pair's are PROMPT, CHOSEN, REJECTED."""
    units, roles = [], []
    for row in rows:
        unit, role, n = [], [], 0
        for item in row:
            kind, lengths = item[0], item[1:]
            if kind == "pad":
                unit += [-1] * lengths[0]
                role += [PROMPT] * lengths[0]
                continue
            for r, length in enumerate(lengths):
                unit += [n] * length
                role += [r] * length
            n += 1
        assert len(unit) <= seq
        units.append(unit + [-1] * (seq - len(unit)))
        roles.append(role + [PROMPT] * (seq - len(role)))
    return torch.tensor(units), torch.tensor(roles)


def visible_from_definitions(units, roles=None, window=None):
    """Bool [B, S, S]: query i sees key j iff both are in the same unit (not padding),
    j <= i, j is a prompt (or document) token or has i's own role (chosen sees chosen,
    rejected sees rejected), and, with a window W, j > i - W (transformers' sliding
    window: W keys counting the query itself)."""
    seq = units.shape[1]
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    visible = (units[:, :, None] == units[:, None, :]) & (units[:, :, None] >= 0) & (j <= i)
    if roles is not None:
        visible &= (roles[:, None, :] == PROMPT) | (roles[:, None, :] == roles[:, :, None])
    if window is not None:
        visible &= j > i - window
    return visible


def bounds_from_mask(visible, loose_key_end=None):
    """(first_key, key_end, gap_start, gap_end) int32 [B, S] by brute force from a mask:
    first_key = the first key seen (i + 1 if none), the gap = the one run of unseen keys
    inside [first_key, i] (empty: gap_start = gap_end = first_key), key_end = one past
    the last query that sees the key (or ``loose_key_end``, a later end). Asserts that
    the mask is what the bounds say: the queries that see key j are [j, key_end[j])
    minus those whose gap holds j."""
    batch, seq, _ = visible.shape
    fields = torch.zeros(4, batch, seq, dtype=torch.int32)
    for b in range(batch):
        for i in range(seq):
            seen = [j for j in range(seq) if visible[b, i, j]]
            first = seen[0] if seen else i + 1
            holes = [j for j in range(first, i + 1) if not visible[b, i, j]]
            assert holes == list(range(holes[0], holes[-1] + 1)) if holes else True
            gap = (holes[0], holes[-1] + 1) if holes else (first, first)
            fields[0, b, i], fields[2, b, i], fields[3, b, i] = first, *gap
        for j in range(seq):
            seers = [i for i in range(seq) if visible[b, i, j]]
            fields[1, b, j] = seers[-1] + 1 if seers else j
    if loose_key_end is not None:
        assert (loose_key_end >= fields[1]).all()
        fields[1] = loose_key_end.to(torch.int32)
    first_key, key_end, gap_start, gap_end = fields
    i = torch.arange(seq)[None, :, None]
    j = torch.arange(seq)[None, None, :]
    in_gap = (j >= gap_start[:, :, None]) & (j < gap_end[:, :, None])
    said = (i >= j) & (i < key_end[:, None, :]) & ~in_gap
    assert torch.equal(said, visible)
    said_by_rows = (j >= first_key[:, :, None]) & (j <= i) & ~in_gap
    assert torch.equal(said_by_rows, visible)
    return tuple(t.contiguous() for t in fields)


def unit_ends(units):
    """[B, S]: one past the last token of each token's unit (j for padding)."""
    batch, seq = units.shape
    ends = torch.zeros(batch, seq, dtype=torch.int32)
    for b in range(batch):
        for j in range(seq):
            end = j
            while units[b, j] >= 0 and end < seq and units[b, end] == units[b, j]:
                end += 1
            ends[b, j] = end
    return ends


def run(backend, q, k, v, bounds, d_out=None, tiles=None):
    module = BACKENDS[backend]
    extra = {} if tiles is None or backend == "torch" else dict(_blocks_override=tiles)
    out, lse = module.flash_attention_forward(q, k, v, bounds, **extra)
    if d_out is None:
        d_out = torch.randn_like(out)
    grads = module.flash_attention_backward(d_out, q, k, v, out, lse, bounds, **extra)
    return (out, lse, grads), d_out


def check_against_oracle(label, backend, visible, bounds, shape, dtype, tiles=None):
    batch, seq, n_q, n_kv, head_dim = shape
    q, k, v = make_inputs(batch, seq, n_q, n_kv, head_dim, dtype)
    got, d_out = run(backend, q, k, v, bounds, tiles=tiles)
    check_all(f"{backend} {label}", dtype, got,
              reference_with_grads(q, k, v, visible, d_out, dtype), (q, k, d_out, visible))
    return got, visible


# ---------------------------------------------------------------- (a) DPO pairs

# pairs of odd lengths, 1-token answers and prompts, a plain document and padding between
PAIR_ROWS = [[("pair", 3, 4, 2), ("pair", 1, 1, 1), ("doc", 2), ("pair", 5, 1, 6), ("pad", 2),
              ("pair", 2, 3, 1)],
             [("pad", 1), ("pair", 7, 5, 3), ("pair", 2, 1, 4)]]
PAIR_SEQ = 37


@pytest.mark.parametrize("loose", [False, True], ids=["tight-key-end", "pair-end-key-end"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_dpo_pairs_packed_with_their_prompt_once(backend, dtype, loose):
    """6 query heads over 2 kv heads, head dim 24. key_end tight (a chosen key's ends at
    the chosen answer) or loose (every key's at its pair's end: the gap alone keeps
    the rejected queries off the chosen keys, in the backward too)."""
    units, roles = layout(PAIR_ROWS, PAIR_SEQ)
    visible = visible_from_definitions(units, roles)
    bounds = bounds_from_mask(visible, unit_ends(units) if loose else None)
    assert (bounds[3] > bounds[2]).any()                   # there really are gaps
    _, _ = check_against_oracle("pairs", backend, visible, bounds, (2, PAIR_SEQ, 6, 2, 24), dtype)


# ---------------------------------------------------------------- (b, c) sliding windows

@pytest.mark.parametrize("window", [1, 4, 20, 37, 50])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sliding_window_over_one_document_per_row(backend, window):
    """W = 1 (a query sees itself only), shorter than the row, W = S and W > S (the plain
    causal mask); the last row is right-padded."""
    seq, dtype = 37, torch.float32
    segments = torch.zeros(2, seq, dtype=torch.int64)
    segments[1, 30:] = -1
    visible = visible_from_definitions(torch.where(segments >= 0, 0, -1), window=window)
    bounds = document_bounds(segments, window=window)
    assert all(torch.equal(a, b) for a, b in zip(bounds, bounds_from_mask(visible)[:2]))
    check_against_oracle(f"window {window}", backend, visible, bounds, (2, seq, 6, 2, 24), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [1, 3, 9])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sliding_window_within_packed_documents(backend, window, dtype):
    """Documents of 1, 2..S, 1, 3 tokens and padding: the window is shorter than some
    documents and longer than others."""
    seq = 41
    segments = packed_segments(2, seq)
    visible = visible_from_definitions(segments, window=window)
    bounds = document_bounds(segments.to(torch.int32), window=window)
    assert all(torch.equal(a, b) for a, b in zip(bounds, bounds_from_mask(visible)[:2]))
    check_against_oracle(f"window {window} + documents", backend, visible, bounds,
                         (2, seq, 6, 2, 24), dtype)


@pytest.mark.parametrize("window", [1, 2, 5, 16])
def test_window_convention_is_transformers_mistral(window):
    """document_bounds(window=W) and the definition above against the mask transformers
    builds for a MistralConfig(sliding_window=W): one document per row, and packed
    documents given as restarting position ids (transformers' packed-sequence path)."""
    from transformers import MistralConfig
    from transformers.masking_utils import create_sliding_window_causal_mask
    seq, lengths = 23, [7, 1, 10, 5]
    config = MistralConfig(sliding_window=window, hidden_size=8, num_attention_heads=2,
                           num_key_value_heads=1, num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    segments = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[None]
    for position_ids, segment_ids in ((torch.arange(seq)[None], torch.zeros(1, seq)),
                                      (positions, segments)):
        mask = create_sliding_window_causal_mask(config, torch.zeros(1, seq, 8), None, None,
                                                 position_ids=position_ids,
                                                 allow_is_causal_skip=False)
        theirs = mask.reshape(1, seq, seq)
        assert theirs.dtype == torch.bool
        ours = visible_from_definitions(segment_ids.long(), window=window)
        assert torch.equal(ours, theirs)
        first_key, key_end = document_bounds(segment_ids.long(), window=window)
        i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
        per_query = (j >= first_key[0, :, None]) & (j <= i)      # each side on its own
        per_key = (i >= j) & (i < key_end[0, None, :])
        assert torch.equal(per_query[None], theirs) and torch.equal(per_key[None], theirs)


# ---------------------------------------------------------------- interface

def test_autograd_function_takes_a_window_or_bounds_with_a_gap():
    """flash_attention(q, k, v, segment_ids, window) and flash_attention(q, k, v,
    bounds=...) differentiate like the float64 oracle's autograd."""
    dtype, seq = torch.float32, 37
    units, roles = layout(PAIR_ROWS, seq)
    segments = packed_segments(2, seq)
    for label, kwargs, visible in (
            ("window", dict(segment_ids=segments, window=5),
             visible_from_definitions(segments, window=5)),
            ("window, no segments", dict(window=4),
             visible_from_definitions(torch.zeros(2, seq, dtype=torch.int64), window=4)),
            ("gap", dict(bounds=bounds_from_mask(visible_from_definitions(units, roles))),
             visible_from_definitions(units, roles))):
        q, k, v = make_inputs(2, seq, 6, 2, 24, dtype)
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = triton_attention.flash_attention(*leaves, **kwargs)
        d_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, d_out)
        out_ref, _, grads_ref = reference_with_grads(q, k, v, visible, d_out, dtype)
        assert_close(OP, f"autograd {label} out", out, out_ref, **TOLERANCE[dtype])
        for name, g, r in zip(("dq", "dk", "dv"), grads, grads_ref):
            assert_close(OP, f"autograd {label} {name}", g, r, **TOLERANCE[dtype])


def test_bad_bounds_raise_one_line_value_errors():
    q, k, v = make_inputs(1, 6, 2, 1, 16, torch.float32)
    first_key, key_end = document_bounds(torch.zeros(1, 6, dtype=torch.int64))
    empty = torch.zeros(1, 6, dtype=torch.int32)
    for module in BACKENDS.values():
        forward = module.flash_attention_forward
        with pytest.raises(ValueError, match="gap_start.*dtype"):
            forward(q, k, v, (first_key, key_end, empty.long(), empty))
        with pytest.raises(ValueError, match="gap_end.*shape"):
            forward(q, k, v, (first_key, key_end, empty, empty[:, :5].contiguous()))
        with pytest.raises(ValueError, match="'bounds' must be"):
            forward(q, k, v, (first_key, key_end, empty))
        # query 4 sees [0, 4]: a gap [3, 6) runs past it, [2, 1) is reversed
        for start, end in ((3, 6), (2, 1)):
            gap_start, gap_end = empty.clone(), empty.clone()
            gap_start[0, 4], gap_end[0, 4] = start, end
            with pytest.raises(ValueError, match=rf"query 4 of row 0.*\[{start}, {end}\)"):
                forward(q, k, v, (first_key, key_end, gap_start, gap_end))
    with pytest.raises(ValueError, match="'window' must be a positive int"):
        document_bounds(torch.zeros(1, 6, dtype=torch.int64), window=0)
    with pytest.raises(ValueError, match="either 'bounds' or 'segment_ids'"):
        triton_attention.flash_attention(q, k, v, torch.zeros(1, 6), bounds=(first_key, key_end))
    check_gap((first_key, key_end, empty + 3, empty + 3))   # empty gaps anywhere are fine


# ---------------------------------------------------------------- Triton tiles and skipping

TILES = [AttentionBlocks(16, 16, 4, 1), AttentionBlocks(32, 16, 4, 1),
         AttentionBlocks(16, 32, 4, 1, block_h=2)]
TILE_IDS = ["16x16", "32x16", "16x32-h2"]
# long answers: whole 16-token blocks inside the chosen answer (skipped for the rejected
# queries' tiles), blocks crossing every boundary, a 1-token answer, padding
LONG_PAIRS = [[("pair", 20, 37, 41), ("pair", 3, 1, 18), ("pad", 2), ("doc", 9)],
              [("pad", 5), ("pair", 1, 50, 33), ("pair", 17, 16, 16)]]
LONG_SEQ = 139


@pytest.mark.parametrize("tiles", TILES, ids=TILE_IDS)
def test_pairs_on_small_tiles(tiles):
    """Query tiles shorter and taller than key tiles, two query heads per tile, over
    pairs whose answers span many blocks: the masked, unmasked and skipped blocks of
    the gap variant, forward and backward."""
    units, roles = layout(LONG_PAIRS, LONG_SEQ)
    visible = visible_from_definitions(units, roles)
    bounds = bounds_from_mask(visible, unit_ends(units))
    check_against_oracle(f"pairs {tiles}", "triton", visible, bounds, (2, LONG_SEQ, 4, 2, 16),
                         torch.float32, tiles=tiles)


@pytest.mark.parametrize("tiles", TILES, ids=TILE_IDS)
def test_window_and_documents_on_small_tiles(tiles):
    """W = 20 over documents of 100 and 42 tokens and padding, and W = 7 over the same:
    the windowed walk's first blocks start mid-document."""
    segments = torch.tensor([[0] * 100 + [1] * 42 + [-1] * 8, [-1] * 3 + [0] * 147])
    for window in (20, 7):
        visible = visible_from_definitions(segments, window=window)
        bounds = document_bounds(segments, window=window)
        check_against_oracle(f"window {window} {tiles}", "triton", visible, bounds,
                             (2, 150, 2, 1, 16), torch.float32, tiles=tiles)


def _poisoned_run(q, k, v, d_out, bounds, poison_keys, poison_queries, tiles):
    q, k, v, d_out = (t.clone() for t in (q, k, v, d_out))
    for t in (k, v):
        t[:, poison_keys] = float("nan")
    for t in (q, d_out):
        t[:, poison_queries] = float("nan")
    (out, _, grads), _ = run("triton", q, k, v, bounds, d_out, tiles)
    return out, grads


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_key_blocks_before_the_window_are_skipped_not_masked():
    """One 150-token document, W = 20, 16 x 16 tiles. NaN in the keys [0, 48): the query
    tiles from 80 on start their walk at min first_key (61 or later, block 48) and must
    not touch them. NaN in the queries [112, 150): the key blocks below 80 end their
    walk at max key_end (99 or less, so the query tile [96, 112) last) and must not
    touch them. A masked block would enter the dots (0 x NaN = NaN)."""
    tiles, window, seq = AttentionBlocks(16, 16, 4, 1, block_h=2), 20, 150
    segments = torch.zeros(1, seq, dtype=torch.int64)
    visible = visible_from_definitions(segments, window=window)
    bounds = document_bounds(segments, window=window)
    q, k, v = make_inputs(1, seq, 2, 1, 16, torch.float32)
    d_out = torch.randn(1, seq, 2, 16)
    out_ref, _, (dq_ref, dk_ref, dv_ref) = reference_with_grads(q, k, v, visible, d_out,
                                                                torch.float32)
    out, (dq, _, _) = _poisoned_run(q, k, v, d_out, bounds, slice(0, 48), slice(0, 0), tiles)
    for name, got, ref in (("out", out, out_ref), ("dq", dq, dq_ref)):
        assert_close(OP, f"before the window {name}", got[:, 80:], ref[:, 80:],
                     **TOLERANCE[torch.float32])
    assert torch.isnan(out[:, 64:80]).all()          # those tiles did walk the poison
    _, (_, dk, dv) = _poisoned_run(q, k, v, d_out, bounds, slice(0, 0), slice(112, seq), tiles)
    for name, got, ref in (("dk", dk, dk_ref), ("dv", dv, dv_ref)):
        assert_close(OP, f"after the window {name}", got[:, :80], ref[:, :80],
                     **TOLERANCE[torch.float32])
    assert torch.isnan(dk[:, 80:96]).all()


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_key_blocks_inside_every_row_gap_are_skipped_not_masked():
    """A pair [prompt 20 | chosen 60 | rejected 70], 16 x 16 tiles: NaN in the chosen
    keys' whole blocks [32, 80). The rejected queries' tiles from 96 on (every row's gap
    is [20, 80)) skip them; their outputs and dQ, and dK/dV of the rejected keys from
    96 on, match the clean oracle."""
    tiles, seq = AttentionBlocks(16, 16, 4, 1), 150
    units, roles = layout([[("pair", 20, 60, 70)]], seq)
    visible = visible_from_definitions(units, roles)
    bounds = bounds_from_mask(visible)
    q, k, v = make_inputs(1, seq, 2, 1, 16, torch.float32)
    d_out = torch.randn(1, seq, 2, 16)
    out_ref, _, (dq_ref, dk_ref, dv_ref) = reference_with_grads(q, k, v, visible, d_out,
                                                                torch.float32)
    out, (dq, dk, dv) = _poisoned_run(q, k, v, d_out, bounds, slice(32, 80), slice(0, 0), tiles)
    for name, got, ref in (("out", out, out_ref), ("dq", dq, dq_ref), ("dk", dk, dk_ref),
                           ("dv", dv, dv_ref)):
        assert_close(OP, f"gap skip {name}", got[:, 96:], ref[:, 96:], **TOLERANCE[torch.float32])
    assert torch.isnan(out[:, 32:80]).all()          # the chosen queries did see the poison
