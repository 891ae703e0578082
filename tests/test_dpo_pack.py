"""Packed DPO pairs (anita_core/data/dpo_pack.py): the layout, positions, attention
bounds and scores, checked against rules written out here independently of the
packer, and the whole layout against a float64 dense-mask computation: a tiny
transformers LLaMA in float64 run on each prompt + answer alone (no padding, no
packing) and on the packed rows with the dense mask of the bounds must give the
same summed completion log-probs."""
from __future__ import annotations

import random

import pytest
import torch

from anita_core.data.dpo import PreferencePair, truncate_pair
from anita_core.data.dpo_pack import (collate_packed_pairs, dense_visibility,
                                      dense_visibility_by_keys, pair_rows, padded_positions,
                                      packed_dpo_batches)

VOCAB = 50


def _pair(rng, p, c, r):
    ids = lambda n: [rng.randrange(1, VOCAB) for _ in range(n)]   # noqa: E731
    return PreferencePair(ids(p), ids(c), ids(r))


def _pairs(seed, n=7, longest=23):
    """Odd lengths, 1-token answers among them, a multi-turn-sized prompt."""
    rng = random.Random(seed)
    out = [_pair(rng, 1, 1, 1), _pair(rng, 5, 1, 9), _pair(rng, 31, 7, 1)]
    out += [_pair(rng, rng.randint(1, longest), rng.randint(1, longest), rng.randint(1, longest))
            for _ in range(n - len(out))]
    rng.shuffle(out)
    return out


def _expected(pairs, batch):
    """Per row, each token's (pair, role, offset) by walking the rows as the rule says."""
    roles = {}
    n = len(pairs)
    for r, row in enumerate(pair_rows(pairs, _budget(batch))):
        at = 0
        for k in row:
            for role, ids in (("p", pairs[k].prompt_ids), ("c", pairs[k].chosen_ids),
                              ("r", pairs[k].rejected_ids)):
                for t in range(len(ids)):
                    roles[(r, at)] = (k, role, t)
                    at += 1
    return roles, n


def _budget(batch):
    return batch["_budget"]


def _check_layout(pairs, budget, multiple=8):
    batch = collate_packed_pairs(pairs, budget=budget, pad_id=0, multiple=multiple)
    batch["_budget"] = budget
    roles, n = _expected(pairs, batch)
    B, S = batch["input_ids"].shape
    # every pair's prompt once, answers after it, padding only to the rounding
    assert len(roles) == sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    longest = max(sum(1 for (r, _) in roles if r == row) for row in range(B))
    assert S == max(min(-(-longest // multiple) * multiple, max(budget, longest)), longest)
    for (r, i), (k, role, t) in roles.items():
        ids = {"p": pairs[k].prompt_ids, "c": pairs[k].chosen_ids, "r": pairs[k].rejected_ids}[role]
        assert int(batch["input_ids"][r, i]) == ids[t]
        P = len(pairs[k].prompt_ids)
        assert int(batch["position_ids"][r, i]) == (t if role == "p" else P + t)
    # attention: the rule, token by token
    seen = dense_visibility(batch)
    assert torch.equal(seen, dense_visibility_by_keys(batch))
    for r in range(B):
        for i in range(S):
            for j in range(S):
                q, k_ = roles.get((r, i)), roles.get((r, j))
                want = (q is not None and k_ is not None and q[0] == k_[0] and j <= i
                        and not (q[1] == "r" and k_[1] == "c"))
                assert bool(seen[r, i, j]) == want, (r, i, j, q, k_)
    # scores: answer token t of pair k is scored where the previous token of its own
    # sequence sits (the prompt's last token for t = 0)
    want_scores = set()
    where = {v: key for key, v in roles.items()}
    for k, p in enumerate(pairs):
        for seq, role, ids in ((k, "c", p.chosen_ids), (n + k, "r", p.rejected_ids)):
            for t in range(len(ids)):
                r, i = where[(k, "p", len(p.prompt_ids) - 1)] if t == 0 else where[(k, role, t - 1)]
                want_scores.add((r * S + i, ids[t], seq))
    got = list(zip(batch["score_index"].tolist(), batch["score_targets"].tolist(),
                   batch["score_sequence"].tolist()))
    assert len(got) == len(want_scores) and set(got) == want_scores
    assert batch["completion_tokens"].tolist() == ([len(p.chosen_ids) for p in pairs]
                                                   + [len(p.rejected_ids) for p in pairs])
    return batch


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget", [40, 64, 1000])
def test_layout_bounds_and_scores_follow_the_rule(seed, budget):
    pairs = _pairs(seed)
    batch = _check_layout(pairs, budget)
    if budget == 40:    # the 39-token pair fits; a 45+ one would get a row of its own
        assert batch["input_ids"].shape[0] > 1


def test_a_pair_longer_than_the_budget_gets_a_row_of_its_own():
    rng = random.Random(5)
    pairs = [_pair(rng, 3, 2, 2), _pair(rng, 30, 11, 13), _pair(rng, 2, 2, 1)]
    batch = _check_layout(pairs, budget=20)
    assert pair_rows(pairs, 20) == [[0], [1], [2]]
    assert batch["input_ids"].shape == (3, 54)      # the long pair, whole; wider than the budget


def test_truncated_pairs_pack_as_they_are():
    rng = random.Random(9)
    raw = [_pair(rng, 40, 30, 25), _pair(rng, 7, 50, 3)]
    pairs = []
    for p in raw:
        kept, _ = truncate_pair(p.prompt_ids, p.chosen_ids, p.rejected_ids, max_length=32,
                                max_prompt_length=16)
        pairs.append(PreferencePair(*kept))
    _check_layout(pairs, budget=64)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="budget"):
        collate_packed_pairs([PreferencePair([1], [2], [3])], budget=0, pad_id=0)
    with pytest.raises(ValueError, match="pair 0 has an empty"):
        collate_packed_pairs([PreferencePair([1], [], [3])], budget=8, pad_id=0)


def test_padded_positions_counts_collate_pairs():
    from anita_core.data.dpo import collate_pairs
    pairs = _pairs(3)
    padded = collate_pairs(pairs, pad_id=0)
    assert padded_positions(pairs) == 2 * padded["chosen"]["input_ids"].numel()
    padded = collate_pairs(pairs, pad_id=0, pad_to_multiple_of=8)
    assert padded_positions(pairs, 8) == 2 * padded["chosen"]["input_ids"].numel()


# ------------------------------------------------------ float64 dense-mask check
def _hf_model(seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=10000.0, attn_implementation="eager")
    model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():     # large enough weights that positions and masks matter
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def _alone(model, pair):
    """Summed log p(answer | prompt) of each answer, run alone (float64)."""
    out = []
    for answer in (pair.chosen_ids, pair.rejected_ids):
        ids = torch.tensor([pair.prompt_ids + answer])
        logp = model(ids).logits[0].log_softmax(-1)
        P = len(pair.prompt_ids)
        out.append(sum(float(logp[P - 1 + t, tok]) for t, tok in enumerate(answer)))
    return out


def _packed(model, batch, n):
    # padding queries see only themselves here (a row seeing nothing is NaN in eager
    # attention); nothing scored sees a padding key, so this changes no score
    mask = dense_visibility(batch) | torch.eye(batch["input_ids"].shape[1], dtype=torch.bool)
    additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill_(~mask, -1e300)[:, None]
    logits = model(batch["input_ids"], attention_mask=additive,
                   position_ids=batch["position_ids"]).logits
    rows = logits.reshape(-1, VOCAB)[batch["score_index"]].log_softmax(-1)
    logp = rows.gather(1, batch["score_targets"][:, None])[:, 0]
    return torch.zeros(2 * n, dtype=torch.float64).index_add_(0, batch["score_sequence"], logp)


@pytest.mark.parametrize("budget", [48, 512])
def test_packed_log_probs_equal_each_sequence_alone_float64(budget, fresh_seed):
    model = _hf_model(fresh_seed)
    pairs = _pairs(fresh_seed, n=6)
    batch = collate_packed_pairs(pairs, budget=budget, pad_id=0, multiple=16)
    with torch.no_grad():
        got = _packed(model, batch, len(pairs))
        alone = [_alone(model, p) for p in pairs]
    want = torch.tensor([a[0] for a in alone] + [a[1] for a in alone], dtype=torch.float64)
    # float64 on both sides except transformers' eager softmax, which runs in fp32
    # (relative error ~6e-8 per probability): measured <= 1.4e-8 relative on the sums;
    # 1e-6 leaves ~70x, and a wrong mask, position or shift moves a sum by > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
    # not vacuous: the rejected answers would change if they saw the chosen ones
    leaky = dict(batch, gap_start=torch.zeros_like(batch["gap_start"]),
                 gap_end=torch.zeros_like(batch["gap_end"]))
    with torch.no_grad():
        wrong = _packed(model, leaky, len(pairs))
    assert float((wrong - want)[len(pairs):].abs().max()) > 1e-3


def test_packed_batches_keep_the_order_and_group_size():
    pairs = _pairs(4, n=7)
    batches = packed_dpo_batches(pairs, batch_size=3, budget=64, pad_id=0)
    assert [int(b["completion_tokens"].shape[0]) // 2 for b in batches] == [3, 3, 1]
    assert batches[2]["input_ids"][0, :len(pairs[6].prompt_ids)].tolist() == pairs[6].prompt_ids
