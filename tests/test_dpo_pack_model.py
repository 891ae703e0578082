"""Packed DPO pairs through the model (anita_core/model/pair_rows.py, DPOObjective's
packed path): the loss, the six metrics and every LoRA gradient of one micro-step
equal the padded layout's, and so does the precomputed reference store. The torch
backend (plain-torch kernels); one small case through the Triton interpreter.

Pairs: the bundled ones (single-turn strings) and message-list rows (multi-turn
prompts) with the bundled tokenizer, TRL-truncated ones, random ones with 1-token
answers and odd lengths, and a pair longer than the row budget (a row of its own).

Tolerances (fp32 on both sides, the same kernels, different layouts): each summed
completion log-prob (|value| up to ~300 over up to ~60 tokens) is computed from
attention over other key ranges and blocks and summed in another order; fp32 rounding
gives ~1e-7 relative per token and two layers: REL = 1e-5 on log-probs and the loss
(>= 10x margin; one token scored wrongly moves a sum by > 1e-2 relative). Gradients:
|diff| <= GRAD_REL (max|grad| + |grad|), GRAD_REL = 1e-4, as tests/test_dpo_vs_trl.py
(same fp32 backward, other summation orders).
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from anita_core.assets import TOKENIZER_DIR, sample_path
from anita_core.data import collate_pairs, load_tokenizer, tokenize_pairs
from anita_core.data.dpo import PreferencePair, truncate_pair
from anita_core.data.dpo_pack import collate_packed_pairs
from anita_core.data.rows import check_dpo_row
from anita_core.hf import load_model
from anita_core.lora import LoRAAdapters, LoRAConfig
from anita_core.model import ops
from anita_core.train.objectives import DPOObjective
from anita_core.train.reference_logprobs import compute_reference_logps, indexed_dpo_batches
from tests.helpers import assert_close
from tests.model_factory import make_tiny_llama_dir

REL = 1e-5
GRAD_REL = 1e-4
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


def _rows(shape, indices):
    with open(sample_path(shape), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [check_dpo_row(rows[i]) for i in indices]


def _real_pairs(tokenizer):
    """Bundled string rows and multi-turn message rows, one of them TRL-truncated."""
    pairs = tokenize_pairs(_rows("dpo", (2, 19, 13)) + _rows("dpo_messages", (0, 1, 2)), tokenizer)
    p = pairs[0]
    kept, truncated = truncate_pair(p.prompt_ids, p.chosen_ids, p.rejected_ids,
                                    max_length=len(p.prompt_ids) + 3, max_prompt_length=8)
    assert truncated
    return pairs + [PreferencePair(*kept)]


def _random_pairs(seed, vocab):
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(vocab) for _ in range(n)]     # noqa: E731
    shapes = [(7, 1, 1), (13, 1, 9), (1, 5, 1), (29, 17, 23), (60, 31, 3)]   # the last: > budget
    return [PreferencePair(ids(p), ids(c), ids(r)) for p, c, r in shapes]


def tiny_dpo_model(tmp_path, vocab, seed, b_scale: float = 0.5):
    """A tiny LLaMA of ``vocab`` tokens with rank-4 adapters on every projection, their
    B drawn at ``b_scale`` so the policy differs from the reference (adapters off)."""
    ckpt = make_tiny_llama_dir(tmp_path, vocab_size=vocab, seed=seed, hidden_size=64,
                               intermediate_size=100, num_heads=4, num_kv_heads=2)
    model = load_model(ckpt, progress=False)
    model.adapters = LoRAAdapters.init(LoRAConfig(r=4, alpha=8, dropout=0.0, seed=seed), model.config)
    with torch.no_grad():
        for layer, projection in model.adapters.adapted():
            _, B = model.adapters.get(layer, projection)
            B.copy_(torch.randn_like(B) * b_scale)        # policy != reference
    return model


def _step(model, batch, n, loss_type):
    for p in model.adapters.parameters():
        p.grad = None
    objective = DPOObjective(model, beta=0.1, loss_type=loss_type)
    sums = objective.micro_step(batch, grad_scale=1.0 / n)
    grads = {key: tuple(w.grad.clone() for w in model.adapters.get(*key))
             for key in model.adapters.adapted()}
    return sums, grads


def _compare(padded, packed, n):
    (s_pad, g_pad), (s_pack, g_pack) = padded, packed
    scale = max(abs(float(s_pad["logps/chosen"])), abs(float(s_pad["logps/rejected"]))) / n
    for name in METRICS:
        assert_close("dpo packed vs padded", name, torch.tensor([float(s_pack[name])]),
                     torch.tensor([float(s_pad[name])]), atol=REL * scale * n, rtol=REL)
    assert float(s_pack["rewards/accuracies"]) == float(s_pad["rewards/accuracies"])
    assert_close("dpo packed vs padded", "loss", torch.tensor([float(s_pack["loss"])]),
                 torch.tensor([float(s_pad["loss"])]), atol=REL * 0.1 * scale * n, rtol=REL)
    assert float(s_pad["loss"]) > 0
    for key, pad in g_pad.items():
        for ours, theirs, which in zip(g_pack[key], pad, "AB"):
            assert float(theirs.abs().max()) > 0, (key, which)
            assert_close("dpo packed vs padded grads", f"{key}.{which}", ours, theirs,
                         atol=GRAD_REL * float(theirs.abs().max()), rtol=GRAD_REL)
    # the work: fewer positions computed than the padded batch
    assert s_pack["positions/computed"] < s_pad["positions/computed"]
    assert s_pack["positions/padded"] == s_pad["positions/computed"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_packed_step_equals_padded_step_real_pairs(tmp_path, fresh_seed, tokenizer, loss_type):
    pairs = _real_pairs(tokenizer)
    model = tiny_dpo_model(tmp_path, tokenizer.vocab_size, fresh_seed)
    with ops.use_backend("torch"):
        padded = _step(model, collate_pairs(pairs, pad_id=tokenizer.pad_id), len(pairs), loss_type)
        packed = _step(model, collate_packed_pairs(pairs, budget=128, pad_id=tokenizer.pad_id),
                       len(pairs), loss_type)
    _compare(padded, packed, len(pairs))


def test_packed_step_equals_padded_step_odd_and_oversized_pairs(tmp_path, fresh_seed):
    pairs = _random_pairs(fresh_seed, 131)
    model = tiny_dpo_model(tmp_path, 131, fresh_seed)
    batch = collate_packed_pairs(pairs, budget=48, pad_id=0, multiple=16)
    assert batch["input_ids"].shape[0] >= 3      # the 94-token pair alone, wider than the budget
    with ops.use_backend("torch"):
        _compare(_step(model, collate_pairs(pairs, pad_id=0), len(pairs), "sigmoid"),
                 _step(model, batch, len(pairs), "sigmoid"), len(pairs))


def test_packed_reference_store_equals_padded(tmp_path, fresh_seed, tokenizer):
    pairs = _real_pairs(tokenizer)
    model = tiny_dpo_model(tmp_path, tokenizer.vocab_size, fresh_seed)
    objective = DPOObjective(model)
    stores = []
    with ops.use_backend("torch"):
        for budget in (None, 256):
            batches = indexed_dpo_batches(pairs, batch_size=3, pad_id=tokenizer.pad_id,
                                          shuffle_seed=fresh_seed, pack_budget=budget)
            stores.append(compute_reference_logps(objective, batches, len(pairs), progress=False))
    padded, packed = stores
    assert padded.complete and packed.complete
    assert_close("dpo packed reference store", "logps", packed.logps, padded.logps,
                 atol=0.0, rtol=REL)


def test_packed_step_equals_padded_step_triton_interpreter(tmp_path, fresh_seed):
    """One small case through the Triton kernels (the interpreter on a CPU)."""
    pairs = _random_pairs(fresh_seed, 131)[:3]
    model = tiny_dpo_model(tmp_path, 131, fresh_seed)
    with ops.use_backend("triton"):
        _compare(_step(model, collate_pairs(pairs, pad_id=0), len(pairs), "sigmoid"),
                 _step(model, collate_packed_pairs(pairs, budget=32, pad_id=0, multiple=16),
                       len(pairs), "sigmoid"), len(pairs))
