"""DPOObjective with every preference loss of the table (train.preference_losses),
in both batch layouts (padded chosen/rejected rows, packed [prompt | chosen |
rejected] rows): one micro-step's loss, metrics and LoRA gradients against the
loss function applied to log-probs computed here, independently of the
objective's scoring (the torch backend).

Independent side: each sequence (prompt + answer) alone in its own unpadded
forward through the model's full logits (QLoRALlama.logits, log_softmax,
gather), policy with the adapters on, reference with them off; the completion
sums score the answer tokens, ORPO's chosen NLL every token after the first
(TRL's ORPOTrainer); preference_loss gives the loss, the metrics and
u = d(loss)/d(per-sequence sums). Its LoRA gradient is sum_i u_i d(sum_i)/dθ,
built here token by token (a row per sequence, each scored token carrying its
sequences' u) and pushed through the model's token-logprobs backward, whose own
correctness is tests/test_model_backward.py's and test_linear_loss.py's.

Tolerances: fp32 on both sides, the same 2-layer model, other layouts and
summation orders: a per-sequence log-prob sum (|sum| up to ~200 over up to 60
tokens) agrees to ~1e-7 relative, so REL = 1e-5 on log-probs (>= 10x margin; a
token scored wrongly moves a sum by > 1e-2). The loss and metrics are
compared with atol = REL * sum_i |u_i| |s_i| (how far the sums' rounding can
move them) and rewards with beta times the log-prob scale. Gradients:
|diff| <= GRAD_REL (max|g| + |g|), GRAD_REL = 1e-4, as tests/test_dpo_vs_trl.py.
"""
from __future__ import annotations

import random

import pytest
import torch

from anita_core.data import collate_pairs
from anita_core.data.dpo import PreferencePair
from anita_core.data.dpo_pack import collate_packed_pairs
from anita_core.model import IGNORE_INDEX, ops
from anita_core.train.losses import PreferenceLogps
from anita_core.train.objectives import DPOObjective
from anita_core.train.preference_losses import PREFERENCE_LOSSES, SequenceLogps, preference_loss
from tests.helpers import assert_close
from tests.test_dpo_pack_model import tiny_dpo_model

REL = 1e-5
GRAD_REL = 1e-4
VOCAB = 131

# name -> options: non-default hyperparameters where a loss has them, so a dropped
# option shows; betas that keep every loss off its flat parts on these log-probs
CASES = {
    "sigmoid": dict(beta=0.1),
    "hinge": dict(beta=0.005),
    "ipo": dict(beta=0.25),
    "robust": dict(beta=0.1, label_smoothing=0.2),
    "apo_zero": dict(beta=0.05),
    "sigmoid_sft": dict(beta=0.1, sigmoid_weight=0.7, sft_weight=0.3),
    "simpo": dict(beta=2.0, simpo_gamma=0.3, cpo_alpha=0.4, label_smoothing=0.1),
    "orpo": dict(beta=0.3),
}


def test_every_table_loss_is_a_case():
    assert set(CASES) == set(PREFERENCE_LOSSES)


def _pairs(seed):
    """Odd lengths, 1-token answers, chosen longer and shorter; one pair longer than
    the packed rows' budget (a row of its own)."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(VOCAB) for _ in range(n)]     # noqa: E731
    shapes = [(7, 1, 4), (13, 6, 9), (1, 5, 1), (29, 17, 23), (40, 11, 3)]
    return [PreferencePair(ids(p), ids(c), ids(r)) for p, c, r in shapes]


def _model(tmp_path, seed):
    return tiny_dpo_model(tmp_path, VOCAB, seed, b_scale=0.3)


def _token_logps(model, ids):
    """log p(ids[t+1] | ids[:t+1]) of one sequence alone, from the full logits."""
    x = torch.tensor([ids])
    logits = model.logits(x, torch.arange(len(ids))[None], torch.zeros_like(x))
    return torch.log_softmax(logits[0, :-1].double(), dim=-1).gather(-1, x[0, 1:, None])[:, 0]


def _sums(model, pairs, with_nll):
    """Per pair: chosen and rejected completion sums (and the chosen NLL sums)."""
    chosen, rejected, nll = [], [], []
    for p in pairs:
        P = len(p.prompt_ids)
        lc = _token_logps(model, p.prompt_ids + p.chosen_ids)
        lr = _token_logps(model, p.prompt_ids + p.rejected_ids)
        chosen.append(lc[P - 1:].sum())
        rejected.append(lr[P - 1:].sum())
        nll.append(lc.sum())                # every token after the first
    return torch.stack(chosen), torch.stack(rejected), torch.stack(nll)


def _expected(model, pairs, name, options):
    """(loss, metrics, u_chosen, u_rejected, u_nll) from the independent sums."""
    record = PREFERENCE_LOSSES[name]
    tc = torch.tensor([len(p.chosen_ids) for p in pairs])
    tr = torch.tensor([len(p.rejected_ids) for p in pairs])
    with torch.no_grad():
        c, r, nll = _sums(model, pairs, record.needs_sequence_logps)
        reference = None
        if record.needs_reference:
            with model.adapters.disabled():
                rc, rr, _ = _sums(model, pairs, False)
            reference = PreferenceLogps(rc, rr, tc, tr)
    leaves = [t.clone().requires_grad_() for t in (c, r, nll)]
    if record.needs_sequence_logps:
        policy = SequenceLogps(leaves[0], leaves[1], tc, tr, chosen_nll_logps=leaves[2],
                               chosen_nll_tokens=torch.tensor([len(p.prompt_ids) - 1 + len(p.chosen_ids)
                                                               for p in pairs]))
    else:
        policy = PreferenceLogps(leaves[0], leaves[1], tc, tr)
    loss, metrics = preference_loss(name, policy, reference, **options)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    u = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves)]
    scale = float(torch.cat([c, r, nll]).abs().max())
    atol = REL * float(sum((g.abs() * s.abs()).sum() for g, s in zip(u, (c, r, nll))))
    return loss.detach(), metrics, u, scale, atol


def _expected_grads(model, pairs, u):
    """sum_i u_i d(sum_i)/dθ through the model's token-logprobs backward: a row per
    sequence, each scored token's upstream gradient its sequences' u."""
    u_c, u_r, u_nll = (x.float() for x in u)
    rows, ups = [], []
    for k, p in enumerate(pairs):
        P = len(p.prompt_ids)
        for answer, u_answer, u_whole in ((p.chosen_ids, u_c[k], u_nll[k]),
                                          (p.rejected_ids, u_r[k], 0.0)):
            ids = p.prompt_ids + answer
            up = [float(u_whole) + (float(u_answer) if t >= P - 1 else 0.0)
                  for t in range(len(ids) - 1)]
            rows.append(ids)
            ups.append(up)
    width = max(len(ids) for ids in rows)
    n = len(rows)
    ids_t = torch.zeros(n, width, dtype=torch.int64)
    targets = torch.full((n, width), IGNORE_INDEX, dtype=torch.int64)
    segments = torch.full((n, width), -1, dtype=torch.int64)
    positions = torch.zeros(n, width, dtype=torch.int64)
    d_logp = torch.zeros(n, width)
    for i, (ids, up) in enumerate(zip(rows, ups)):
        L = len(ids)
        ids_t[i, :L] = torch.tensor(ids)
        targets[i, :L - 1] = torch.tensor(ids[1:])
        segments[i, :L] = 0
        positions[i, :L] = torch.arange(L)
        d_logp[i, :L - 1] = torch.tensor(up)
    for w in model.adapters.parameters():
        w.grad = None
    _, saved = model.token_logprobs(ids_t, targets, positions, segments, for_backward=True)
    model.logprobs_backward(d_logp, saved)
    grads = {key: tuple(w.grad.clone() for w in model.adapters.get(*key))
             for key in model.adapters.adapted()}
    for w in model.adapters.parameters():
        w.grad = None
    return grads


@pytest.mark.parametrize("name", list(CASES))
def test_objective_step_matches_the_loss_on_independent_logps(tmp_path, fresh_seed, name):
    options = CASES[name]
    pairs = _pairs(fresh_seed)
    n = len(pairs)
    model = _model(tmp_path, fresh_seed)
    with ops.use_backend("torch"):
        loss, metrics, u, scale, atol = _expected(model, pairs, name, options)
        expected_grads = _expected_grads(model, pairs, u)
        assert any(float(g.abs().max()) > 0 for gs in expected_grads.values() for g in gs)
        batches = {"padded": collate_pairs(pairs, pad_id=0),
                   "packed": collate_packed_pairs(pairs, budget=64, pad_id=0, multiple=16)}
        assert batches["packed"]["input_ids"].shape[0] >= 2
        for layout, batch in batches.items():
            objective = DPOObjective(model, beta=options["beta"], loss_type=name,
                                     options={k: v for k, v in options.items() if k != "beta"})
            sums = objective.micro_step(batch, grad_scale=1.0 / n)
            assert objective.reference_passes == int(PREFERENCE_LOSSES[name].needs_reference)
            where = f"{name} {layout}"
            assert_close("dpo objective losses", f"{where} loss", torch.tensor([float(sums["loss"]) / n]),
                         loss.reshape(1), atol=atol, rtol=REL)
            assert set(metrics) == set(PREFERENCE_LOSSES[name].metrics) <= set(sums)
            for metric, value in metrics.items():
                ours = torch.tensor([float(sums[metric]) / n])
                if metric == "rewards/accuracies":
                    assert float(ours) == float(value), (where, metric)
                    continue
                slope = options["beta"] if metric.startswith("rewards/") else 1.0
                assert_close("dpo objective losses", f"{where} {metric}", ours, value.reshape(1),
                             atol=REL * scale * slope, rtol=REL)
            for key, (ex_a, ex_b) in expected_grads.items():
                ours = model.adapters.get(*key)
                for w, ex, which in zip(ours, (ex_a, ex_b), "AB"):
                    assert_close("dpo objective losses grads", f"{where} {key}.{which}", w.grad, ex,
                                 atol=GRAD_REL * float(ex.abs().max()), rtol=GRAD_REL)
                    w.grad = None


def test_only_orpo_scores_the_prompts(tmp_path, fresh_seed):
    """The prompt scores are gathered for a loss that needs_sequence_logps only: the
    other losses send no prompt scores to the device and score nothing extra."""
    pairs = _pairs(fresh_seed)
    model = _model(tmp_path, fresh_seed)
    packed = collate_packed_pairs(pairs, budget=64, pad_id=0, multiple=16)
    padded = collate_pairs(pairs, pad_id=0)
    for name, record in PREFERENCE_LOSSES.items():
        objective = DPOObjective(model, loss_type=name)
        host_packed = objective.stack_batch(packed)     # what goes to the device
        host_padded = objective.stack_batch(padded)
        completion = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        prompt = sum(len(p.prompt_ids) - 1 for p in pairs)
        if record.needs_sequence_logps:
            assert "prompt_score_index" in host_packed
            assert int((host_padded["targets"] != IGNORE_INDEX).sum()) == completion + prompt
        else:
            assert "prompt_score_index" not in host_packed
            assert "prompt_targets" not in host_padded
            assert int((host_padded["targets"] != IGNORE_INDEX).sum()) == completion


def test_packed_prompt_scores_are_each_prompt_token_after_the_first(fresh_seed):
    """data/dpo_pack.py's prompt scores: pair k's prompt position t scores prompt token
    t + 1, each prompt once, whichever row the pair lands in."""
    pairs = _pairs(fresh_seed)
    batch = collate_packed_pairs(pairs, budget=64, pad_id=0, multiple=16)
    ids = batch["input_ids"].reshape(-1)
    index, targets, pair = (batch[k] for k in ("prompt_score_index", "prompt_score_targets",
                                               "prompt_score_pair"))
    assert torch.equal(targets, ids[index + 1])
    for k, p in enumerate(pairs):
        mine = index[pair == k]
        assert targets[pair == k].tolist() == p.prompt_ids[1:]
        # consecutive slots at the pair's prompt positions 0 .. P-2
        assert batch["position_ids"].reshape(-1)[mine].tolist() == list(range(len(p.prompt_ids) - 1))
        if len(mine):
            assert mine.tolist() == list(range(int(mine[0]), int(mine[0]) + len(mine)))
