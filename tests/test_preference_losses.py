"""anita's preference losses (anita_core.train.preference_losses) against TRL 1.16.

For each loss, TRL's own trainer is built (offline, no training) on a tiny
random fp32 LlamaForCausalLM and four plain-text pairs of odd, mixed lengths,
and TRL's loss code path runs on the model: DPOTrainer.compute_loss (metrics
read from trainer._metrics), experimental ORPOTrainer / CPOTrainer
.get_batch_loss_metrics (the method their compute_loss calls). Its loss is
back-propagated into the model's parameters.

anita's side takes TRL's collated token tensors only, runs the same model with
a plain forward (transformers' logits, log_softmax, gather: not TRL's fused
head), sums the completion log-probs per sequence, and applies the anita loss
to those sums. Compared: the loss, every metric TRL logs that is a function of
the per-sequence sums, d(loss)/d(per-sequence sums), and d(loss)/d(every model
parameter).

TRL does not expose its gradient w.r.t. the per-sequence sums; it is recovered
from TRL's parameter gradient g = J^T u, with J the Jacobian of the sequence
sums w.r.t. the parameters (k rows, tens of thousands of columns), by least
squares; the recovery is exact up to cond(J) times g's rounding error, and
cond(J) is asserted small.
"""
from __future__ import annotations

import pytest
import torch

from anita_core.train.losses import DPO_LOSS_TYPES, PreferenceLogps, dpo_loss, dpo_metrics
from anita_core.train.preference_losses import (PREFERENCE_LOSSES, SequenceLogps,
                                                preference_loss)
from tests.chat_tokenizers import write_tokenizer
from tests.helpers import assert_close
from tests.model_factory import make_tiny_llama

# Plain-text pairs: the chosen answer longer in some pairs, shorter in others,
# prompts of different lengths, so every row is padded somewhere in the batch.
ROWS = [
    {"prompt": "What colour is the sky on a clear day?",
     "chosen": " Blue, because air scatters short wavelengths more.", "rejected": " Green."},
    {"prompt": "Name a prime.", "chosen": " Seven.",
     "rejected": " Nine is a prime number, I think, or maybe it is not."},
    {"prompt": "Translate 'gato' into English, please, in one word.", "chosen": " Cat.",
     "rejected": " Dog, obviously."},
    {"prompt": "2 + 3 =", "chosen": " 5, since two plus three is five.", "rejected": " 6"},
]

# Error budgets for fp32 on both sides (two forwards of the same 2-layer model,
# TRL's fused tiled LM head against a plain log_softmax): a per-sequence log-prob
# sum (|sum| ~ 100-500 over 2-30 tokens) agrees to ~1e-7 relative. REL = 1e-5
# leaves >= 10x margin and is far below what a wrong token, mask, length
# normalization or hyperparameter moves (>1e-3).
REL = 1e-5
# Parameter gradients, per tensor: |diff| <= GRAD_REL * (max|g| + |g|): fp32
# backward through the same model in different orders, ~1e-6 of the tensor's
# largest element; a 1% error in any per-pair gradient fails by ~100x.
GRAD_REL = 1e-4
# The per-sequence gradient recovered from TRL's parameter gradient g is within
# ~cond(J) * (g's relative error, ~1e-6 measured as the least-squares residual)
# of TRL's own; it is checked to GRAD_REL / 10 * cond(J) of its largest
# element (10x that), and J must be well conditioned (measured 3-8) for the
# recovery to mean anything.
MAX_COND = 1e3

# The metrics TRL logs that are not functions of the per-sequence log-prob
# sums (they need the logits, the token entropy or a running token count):
# logged by anita's model, not by a loss.
NOT_FROM_SUMS = {"logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy", "num_tokens"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer
    folder = write_tokenizer(tmp_path_factory.mktemp("tok"), "chatml", None)
    return AutoTokenizer.from_pretrained(str(folder))


def _models(vocab: int, seed: int):
    """(policy, reference): the reference is the policy moved a little, so the
    log-ratios are O(1) and no loss saturates."""
    policy = make_tiny_llama(vocab_size=vocab, seed=seed)
    reference = make_tiny_llama(vocab_size=vocab, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.03 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return policy, reference


# case -> (TRL trainer kind, TRL config kwargs, anita loss name, anita options)
CASES = {
    "sigmoid": ("dpo", dict(loss_type="sigmoid", beta=0.1), "sigmoid", dict(beta=0.1)),
    "hinge": ("dpo", dict(loss_type="hinge", beta=0.02), "hinge", dict(beta=0.02)),
    "ipo": ("dpo", dict(loss_type="ipo", beta=0.25), "ipo", dict(beta=0.25)),
    "robust": ("dpo", dict(loss_type="robust", beta=0.1, label_smoothing=0.2), "robust",
               dict(beta=0.1, label_smoothing=0.2)),
    "apo_zero": ("dpo", dict(loss_type="apo_zero", beta=0.1), "apo_zero", dict(beta=0.1)),
    "sigmoid_sft": ("dpo", dict(loss_type=["sigmoid", "sft"], loss_weights=[0.7, 0.3], beta=0.1),
                    "sigmoid_sft", dict(beta=0.1, sigmoid_weight=0.7, sft_weight=0.3)),
    "simpo": ("cpo", dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0), "simpo",
              dict(beta=2.0, simpo_gamma=0.5)),
    "simpo_cpo_alpha": ("cpo", dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.4),
                        "simpo", dict(beta=2.0, simpo_gamma=0.5, cpo_alpha=0.4)),
    "orpo": ("orpo", dict(beta=0.3), "orpo", dict(beta=0.3)),
}


def _trl_trainer(kind, config, policy, reference, tokenizer, output_dir):
    import datasets
    import trl
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    common = dict(output_dir=output_dir, use_cpu=True, report_to="none", disable_tqdm=True)
    data = datasets.Dataset.from_list(ROWS)
    if kind == "dpo":
        args = trl.DPOConfig(max_length=None, precompute_ref_log_probs=False, **common, **config)
        return trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data,
                              processing_class=tokenizer)
    config_class, trainer_class = {"cpo": (CPOConfig, CPOTrainer),
                                   "orpo": (ORPOConfig, ORPOTrainer)}[kind]
    args = config_class(max_length=256, **common, **config)
    return trainer_class(model=policy, args=args, train_dataset=data, processing_class=tokenizer)


def _trl_loss(kind, trainer, batch):
    """TRL's (loss, metrics) for the batch, from TRL's own loss code path."""
    if kind == "dpo":
        trainer._metrics["train"].clear()
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
        metrics = {}
        for name, values in trainer._metrics["train"].items():
            if name != "num_tokens":
                assert len(values) == 1, f"{name}: one logged value expected, got {values}"
                metrics[name] = float(values[0])
        return loss, metrics
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    return loss, {k: float(v) for k, v in metrics.items()}


def _sequences(kind, trainer, batch):
    """TRL's token tensors: (input_ids, attention_mask, scored completion mask,
    scored whole-sequence mask), each row of the masks marking the positions t
    whose next token input_ids[:, t + 1] is scored; rows are chosen then rejected."""
    if kind == "dpo":
        ids, attention = batch["input_ids"], batch["attention_mask"]
        completion = batch["completion_mask"][:, 1:].bool()
    else:
        cat = trainer.concatenated_inputs(batch, is_encoder_decoder=False,
                                          padding_value=trainer.padding_value
                                          if kind == "orpo" else trainer.pad_token_id,
                                          device=torch.device("cpu"))
        ids, attention = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
        completion = cat["concatenated_labels"][:, 1:] != -100
    whole = attention[:, 1:].bool()
    return ids, attention, completion, whole


def _token_logps(model, ids, attention):
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) from transformers' logits."""
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(
        -1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def _params(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("case", list(CASES))
def test_loss_matches_trl(tmp_path, fresh_seed, tokenizer, case):
    kind, trl_config, name, options = CASES[case]
    record = PREFERENCE_LOSSES[name]
    pairs = len(ROWS)
    policy_model, reference_model = _models(len(tokenizer), fresh_seed)
    trainer = _trl_trainer(kind, trl_config, policy_model, reference_model if kind == "dpo" else None,
                           tokenizer, str(tmp_path / "trl"))
    model = trainer.model
    model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(pairs)])

    # --- TRL ---
    trl_loss, trl_metrics = _trl_loss(kind, trainer, batch)
    model.zero_grad(set_to_none=True)
    trl_loss.backward()
    params = _params(model)
    trl_grads = [p.grad.detach().clone() for _, p in params]
    model.zero_grad(set_to_none=True)

    # --- anita, on the same model's per-sequence sums ---
    ids, attention, completion, whole = _sequences(kind, trainer, batch)
    token_logps = _token_logps(model, ids, attention)
    sums = (token_logps * completion).sum(dim=1)
    counts = completion.sum(dim=1)
    quantities = [sums]                       # what the loss is a function of, per sequence
    leaves = sums.detach().clone().requires_grad_(True)
    policy = PreferenceLogps(leaves[:pairs], leaves[pairs:], counts[:pairs], counts[pairs:])
    if record.needs_sequence_logps:
        nll_sums = (token_logps * whole).sum(dim=1)[:pairs]
        quantities.append(nll_sums)
        nll_leaves = nll_sums.detach().clone().requires_grad_(True)
        policy = SequenceLogps(leaves[:pairs], leaves[pairs:], counts[:pairs], counts[pairs:],
                               chosen_nll_logps=nll_leaves,
                               chosen_nll_tokens=whole.sum(dim=1)[:pairs])
        leaf_list = [leaves, nll_leaves]
    else:
        leaf_list = [leaves]
    reference = None
    if record.needs_reference:
        with torch.no_grad():
            ref_sums = (_token_logps(trainer.ref_model, ids, attention) * completion).sum(dim=1)
        reference = PreferenceLogps(ref_sums[:pairs], ref_sums[pairs:], counts[:pairs],
                                    counts[pairs:])
    loss, metrics = preference_loss(name, policy, reference, **options)
    per_seq_grads = torch.autograd.grad(loss, leaf_list)
    torch.autograd.backward(quantities, list(per_seq_grads), retain_graph=True)
    our_grads = [p.grad.detach().clone() for _, p in params]

    # --- loss and metrics ---
    u = torch.cat(per_seq_grads).double()
    q = torch.cat([x.detach() for x in quantities]).double()
    # |d loss| <= sum_i |dL/ds_i| |ds_i| with |ds_i| <= REL |s_i|
    loss_atol = REL * float((u.abs() * q.abs()).sum())
    assert_close(f"pref_losses {case} loss", "loss", loss.detach().reshape(1), trl_loss.detach().reshape(1),
                 atol=loss_atol, rtol=REL)
    expected_names = set(trl_metrics) - NOT_FROM_SUMS
    assert set(metrics) == expected_names == set(record.metrics), (
        f"{case}: anita metrics {sorted(metrics)}, TRL's {sorted(expected_names)}")
    beta = options["beta"]
    per_token = kind != "dpo"             # CPO/ORPO rewards and logps are per-token averages
    scale = float(q.abs().max()) / (float(counts.min()) if per_token else 1.0)
    for metric in sorted(expected_names):
        ours, theirs = metrics[metric], trl_metrics[metric]
        if metric == "rewards/accuracies":
            # a fraction of pairs: exact (per-pair reward gaps are far above rounding)
            assert float(ours) == theirs, f"{case} {metric}: {float(ours)} != {theirs}"
            continue
        # rewards are beta * (log-prob-sized values); logps, nll and log-odds have slope <= ~1
        atol = REL * scale * (beta if metric.startswith("rewards/") else 1.0)
        assert_close(f"pref_losses {case} metrics", metric, ours.reshape(1).double(),
                     torch.tensor([theirs], dtype=torch.float64), atol=atol, rtol=REL)

    # --- gradients w.r.t. the model's parameters ---
    assert any(float(g.abs().max()) > 0 for g in trl_grads), f"{case}: TRL's gradient is zero"
    for (pname, _), ours_g, theirs_g in zip(params, our_grads, trl_grads):
        assert_close(f"pref_losses {case} param grads", pname, ours_g, theirs_g,
                     atol=GRAD_REL * float(theirs_g.abs().max()), rtol=GRAD_REL)

    # --- gradient w.r.t. the per-sequence sums: TRL's, recovered from its parameter gradient ---
    model.zero_grad(set_to_none=True)
    flat_q = torch.cat(quantities)
    rows = []
    for i in range(flat_q.numel()):
        grads = torch.autograd.grad(flat_q[i], [p for _, p in params], retain_graph=True,
                                    allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, (_, p) in zip(grads, params)]))
    jacobian = torch.stack(rows).double()                     # [k sequences, parameters]
    cond = float(torch.linalg.cond(jacobian))
    assert cond < MAX_COND, f"{case}: Jacobian too ill-conditioned to recover TRL's gradient ({cond:.3g})"
    g_trl = torch.cat([g.reshape(-1) for g in trl_grads]).double()
    u_trl = torch.linalg.lstsq(jacobian.T, g_trl.unsqueeze(1)).solution.squeeze(1)
    residual = float((jacobian.T @ u_trl - g_trl).norm() / g_trl.norm())
    # TRL's loss is a function of these sums only: its gradient lies in J's row space
    print(f"[{case}] cond(J)={cond:.3g} relative residual={residual:.3g}")
    assert residual < GRAD_REL, f"{case}: TRL's gradient is not J^T u (relative residual {residual:.3g})"
    assert_close(f"pref_losses {case} d/dsums", "per-sequence", u, u_trl,
                 atol=GRAD_REL * cond * float(u.abs().max()) / 10, rtol=GRAD_REL)


# --- the table and its checks ------------------------------------------------------------

def _logps(pairs=3, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    chosen = -torch.rand(pairs, generator=gen, dtype=torch.float64) * 40 - 1
    rejected = -torch.rand(pairs, generator=gen, dtype=torch.float64) * 40 - 1
    tokens_c = torch.randint(1, 30, (pairs,), generator=gen)
    tokens_r = torch.randint(1, 30, (pairs,), generator=gen)
    return SequenceLogps(chosen.requires_grad_(requires_grad), rejected.requires_grad_(requires_grad),
                         tokens_c, tokens_r, chosen_nll_logps=chosen * 1.5,
                         chosen_nll_tokens=tokens_c + 7)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_family_is_losses_dpo_loss(loss_type):
    """sigmoid, hinge and ipo are today's dpo_loss / dpo_metrics, bit for bit."""
    policy, reference = _logps(5, requires_grad=True, seed=1), _logps(5, seed=2)
    loss, metrics = preference_loss(loss_type, policy, reference, beta=0.3)
    (ours,) = torch.autograd.grad(loss, [policy.chosen])
    expected = dpo_loss(policy, reference, 0.3, loss_type)
    (theirs,) = torch.autograd.grad(expected, [policy.chosen])
    assert torch.equal(loss, expected) and torch.equal(ours, theirs)
    assert metrics.keys() == dpo_metrics(policy, reference, 0.3).keys()
    assert all(torch.equal(v, dpo_metrics(policy, reference, 0.3)[k]) for k, v in metrics.items())


def test_table_records():
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "hinge", "ipo", "robust", "apo_zero", "sigmoid_sft",
                                      "simpo", "orpo"}
    free = {n for n, r in PREFERENCE_LOSSES.items() if not r.needs_reference}
    assert free == {"simpo", "orpo"}
    for name, record in PREFERENCE_LOSSES.items():
        assert record.defaults["beta"] > 0, name
        policy, reference = _logps(4, seed=3), _logps(4, seed=4)
        loss, metrics = preference_loss(name, policy, reference)
        assert loss.dim() == 0 and torch.isfinite(loss), name
        assert set(metrics) == set(record.metrics), name
        assert all(v.dim() == 0 for v in metrics.values()), name


def test_bad_loss_name_names_the_choices():
    with pytest.raises(ValueError) as err:
        preference_loss("dpo", _logps(), _logps())
    message = str(err.value)
    assert "\n" not in message and "'dpo'" in message
    assert all(name in message for name in PREFERENCE_LOSSES)


@pytest.mark.parametrize("name", list(PREFERENCE_LOSSES))
@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_beta_must_be_positive(name, beta):
    with pytest.raises(ValueError, match="beta"):
        preference_loss(name, _logps(), _logps(), beta=beta)


@pytest.mark.parametrize("name,options,word", [
    ("robust", dict(label_smoothing=0.5), "label_smoothing"),
    ("robust", dict(label_smoothing=-0.1), "label_smoothing"),
    ("simpo", dict(cpo_alpha=-1.0), "cpo_alpha"),
    ("sigmoid_sft", dict(sft_weight=-1.0), "sft_weight"),
    ("sigmoid", dict(label_smoothing=0.1), "unknown option"),   # not an option of plain DPO
])
def test_bad_options_refused(name, options, word):
    with pytest.raises(ValueError, match=word):
        preference_loss(name, _logps(), _logps(), **options)


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_losses_take_none(name):
    policy = _logps(4, seed=5)
    with_none = preference_loss(name, policy, None)
    with_reference = preference_loss(name, policy, _logps(4, seed=6))   # given, not used
    assert torch.equal(with_none[0], with_reference[0])
    assert all(torch.equal(with_none[1][k], with_reference[1][k]) for k in with_none[1])


@pytest.mark.parametrize("name", [n for n, r in PREFERENCE_LOSSES.items() if r.needs_reference])
def test_reference_losses_need_a_reference(name):
    with pytest.raises(ValueError, match="needs the reference model"):
        preference_loss(name, _logps(), None)


def test_orpo_needs_the_sequence_logps():
    p = _logps()
    plain = PreferenceLogps(p.chosen, p.rejected, p.chosen_tokens, p.rejected_tokens)
    with pytest.raises(ValueError, match="SequenceLogps"):
        preference_loss("orpo", plain)
