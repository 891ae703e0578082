"""anita's DPO step against TRL 1.16's DPOTrainer on one batch: the same tiny
checkpoint (NF4 double-quantized on both sides, fp32 compute), the same
non-zero LoRA A/B on every projection, the same preference pairs, each side
tokenizing and collating them with its own pipeline. Compared: the loss, the
six metrics TRL logs for the batch (rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected) and the
gradient of every LoRA A and B.

TRL side: ``DPOTrainer.compute_loss`` on the collated batch, then
``loss.backward()``; metrics read from ``trainer._metrics["train"]``; the
reference is the PEFT model with its adapters disabled (``ref_model=None``).
anita side: ``DPOObjective.micro_step(batch, grad_scale=1/pairs)``, whose sums
divided by the number of pairs are TRL's batch means; the reference is the
base with the adapters off.

Both sides compute in fp32: TRL's cast of QLoRA adapters to bf16 is undone
(see tests/trl_reference.py).

Tokenizers: the bundled LLaMA-3 one (anita's --template llama3, TRL with the
tokenizer's LLaMA-3 chat template), and two built here that are not LLaMA-3's
(tests/chat_tokenizers.py): ChatML (SmolLM2's layout) and a SentencePiece-style
one with a Mistral-style [INST] template, where anita renders with --template
chat. The ChatML completion includes the newline the template writes after
<|im_end|> (TRL's split: what follows the prompt in the whole conversation).
"""
from __future__ import annotations

import json

import pytest
import torch

from anita_core.assets import TOKENIZER_DIR, sample_path
from anita_core.data import collate_pairs, load_tokenizer, tokenize_pairs
from anita_core.data.dpo_pack import collate_packed_pairs
from anita_core.data.rows import check_dpo_row
from anita_core.lora import LoRAAdapters, LoRAConfig
from anita_core.model import QLoRALlama
from anita_core.hf import load_model
from anita_core.train.objectives import DPOObjective
from tests.chat_tokenizers import CHATML, INST, write_tokenizer
from tests.helpers import assert_close, bitsandbytes_functional
from tests.model_factory import make_tiny_llama_dir

# trl, peft and transformers come with the test extra; bitsandbytes is a core
# dependency, absent only from the lent GPU machine, where this CPU test does not apply.
bitsandbytes_functional()

from tests.trl_reference import lora_weights, trl_batch, trl_dpo_loss, trl_dpo_twin  # noqa: E402

# Hidden 64 / MLP 100: bitsandbytes 0.50.2's CPU dequantize_4bit is wrong when
# in_features is a multiple of 16 but not of 64 (see test_model_vs_hf.py).
SHAPES = dict(hidden_size=64, intermediate_size=100, num_heads=4, num_kv_heads=2)

# (sample file, row): prompts of 18-22 tokens, completions of 5-15 tokens, the
# chosen answer longer in some pairs and shorter in another, one message-list
# row: every chosen and rejected row is padded somewhere in the batch.
PAIRS = (("dpo", 2), ("dpo", 19), ("dpo_messages", 1), ("dpo", 13))

# Relative error budget for fp32 on both sides. A summed completion log-prob
# (~-150 over 5-15 tokens, from two 2-layer forwards with different summation
# orders) agrees to <1e-7 relative, the loss to ~1e-6; 1e-5 leaves >=10x margin
# and is far below what a wrong token, mask, shift, beta or reference moves
# (>1e-3: one token less changes a log-prob by ~5%).
REL = 1e-5
# LoRA gradients, per tensor: |diff| <= GRAD_REL * (max|grad| + |grad|). fp32
# backward through two layers in different orders: <= 1e-5 of the tensor's
# largest element seen (worst element at 5% of this bound); a 1% error in the
# per-pair gradient scale fails by ~100x.
GRAD_REL = 1e-4


def _rows():
    by_file = {}
    for shape, index in PAIRS:
        if shape not in by_file:
            with open(sample_path(shape), encoding="utf-8") as f:
                by_file[shape] = [json.loads(line) for line in f]
    return [check_dpo_row(by_file[shape][index]) for shape, index in PAIRS]


# kind -> (chat template for tests.chat_tokenizers, or None for the bundled LLaMA-3 tokenizer;
# anita's --template)
TOKENIZERS = {"llama3": (None, "llama3"), "chatml": (CHATML, "chat"), "inst": (INST, "chat")}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


def _tokenizer_dir(kind, tmp_path):
    chat_template, _ = TOKENIZERS[kind]
    if chat_template is None:
        return TOKENIZER_DIR
    return str(write_tokenizer(tmp_path / f"tok-{kind}", "chatml" if kind == "chatml" else "inst",
                               chat_template))


def _anita_model(ckpt, seed: int) -> QLoRALlama:
    model = load_model(ckpt, progress=False)
    config = LoRAConfig(r=4, alpha=8, dropout=0.0, seed=seed)    # all 7 projections
    model.adapters = LoRAAdapters.init(config, model.config)
    with torch.no_grad():
        for layer, projection in model.adapters.adapted():
            _, B = model.adapters.get(layer, projection)
            B.copy_(torch.randn_like(B) * 0.5)        # non-zero B: policy != reference
    return model


def _same_batch(anita_batch, trl_collated) -> None:
    """Both pipelines feed the models the same tokens, masks and scored positions."""
    stacked = {k: torch.cat([anita_batch["chosen"][k], anita_batch["rejected"][k]])
               for k in ("input_ids", "targets", "segment_ids")}
    assert torch.equal(stacked["input_ids"], trl_collated["input_ids"])
    assert torch.equal((stacked["segment_ids"] >= 0).long(), trl_collated["attention_mask"])
    # TRL scores input_ids[:, t+1] at position t where completion_mask[:, t+1] is set
    scored = trl_collated["completion_mask"][:, 1:].bool()
    assert torch.equal(stacked["targets"][:, :-1] != -100, scored)
    assert torch.equal(stacked["targets"][:, :-1][scored], trl_collated["input_ids"][:, 1:][scored])


def _log_ratios(objective: DPOObjective, batch) -> torch.Tensor:
    """log pi(y|x) - log pi_ref(y|x) of every chosen and rejected sequence.

    The test's not-vacuous guard reads these per sequence, not as TRL's batch
    means: a mean of four signed log-ratios can nearly cancel
    (ANITA_TEST_SEED=354181775 put |rewards/chosen| at 0.34x the guard's
    threshold), while the largest single one stayed >= 45x the threshold in every
    one of 900 draws (this test's setup with ANITA_TEST_SEED = 0 ... 299 for each
    of the three tokenizers; measured 2026-12-02, median 160x). The threshold does
    not depend on beta: both sides of the comparison scale with it."""
    stacked = objective.stack_batch(batch)
    with torch.no_grad():
        policy, _ = objective.model.token_logprobs(
            stacked["input_ids"], stacked["targets"], stacked.get("position_ids"),
            stacked.get("segment_ids"), for_backward=False)
    return policy.sum(dim=1).double() - objective.reference_logps(stacked).double()


# hinge: beta small enough that beta * delta < 1 for some pairs, so the loss
# and its gradient are not zero (asserted below). The loss types do not depend on
# the tokenizer: the other tokenizers run with sigmoid (the recipe's).
# packed: anita's batch is data/dpo_pack.py's (pairs in rows of 48 tokens, each prompt
# once; the rejected answers' attention skips the chosen ones through the kernels' gap)
@pytest.mark.parametrize("kind,loss_type,beta,packed", [
    ("llama3", "sigmoid", 0.1, False), ("llama3", "ipo", 0.25, False),
    ("llama3", "hinge", 0.02, False), ("chatml", "sigmoid", 0.1, False),
    ("inst", "sigmoid", 0.1, False), ("llama3", "sigmoid", 0.1, True),
    ("llama3", "ipo", 0.25, True), ("chatml", "sigmoid", 0.1, True)])
def test_dpo_step_matches_trl_dpo_trainer(tmp_path, fresh_seed, kind, loss_type, beta, packed):
    rows = _rows()
    n_pairs = len(rows)
    tokenizer_dir = _tokenizer_dir(kind, tmp_path)
    tokenizer = load_tokenizer(tokenizer_dir)
    ckpt = make_tiny_llama_dir(tmp_path, vocab_size=tokenizer.vocab_size, seed=fresh_seed, **SHAPES)
    model = _anita_model(ckpt, seed=fresh_seed)

    trainer = trl_dpo_twin(ckpt, model.adapters, rows, tokenizer_dir, str(tmp_path / "trl"),
                           beta=beta, loss_type=loss_type)
    collated = trl_batch(trainer)
    trl_loss, trl_metrics = trl_dpo_loss(trainer, collated)

    pairs = tokenize_pairs(rows, tokenizer, template=TOKENIZERS[kind][1])
    batch = collate_pairs(pairs, pad_id=tokenizer.pad_id)
    _same_batch(batch, collated)
    objective = DPOObjective(model, beta=beta, loss_type=loss_type)
    if packed:
        batch = collate_packed_pairs(pairs, budget=48, pad_id=tokenizer.pad_id)
        assert batch["input_ids"].shape[0] > 1      # rows of several pairs and more than one row
    sums = objective.micro_step(batch, grad_scale=1.0 / n_pairs)
    ours = {k: v / n_pairs for k, v in sums.items()}

    # rewards, margins and the loss are beta * differences of log-probs of size
    # |logps|, so their error scales with beta * |logps|, not with their own size
    logp_scale = max(abs(trl_metrics["logps/chosen"]), abs(trl_metrics["logps/rejected"]))
    reward_atol = REL * beta * logp_scale
    for name in ("logps/chosen", "logps/rejected"):
        assert_close("dpo_vs_trl metrics", f"{loss_type} {name}", torch.tensor([ours[name]]),
                     torch.tensor([trl_metrics[name]]), atol=0.0, rtol=REL)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert_close("dpo_vs_trl metrics", f"{loss_type} {name}", torch.tensor([ours[name]]),
                     torch.tensor([trl_metrics[name]]), atol=reward_atol, rtol=REL)
    # a fraction of pairs: exact (each pair's log-ratio difference is O(1) here,
    # far from the ~1e-5 noise that could flip its comparison)
    assert ours["rewards/accuracies"] == trl_metrics["rewards/accuracies"]
    # sigmoid and hinge have slope <= beta in each log-prob; ipo's is
    # 2|ipo_delta - 1/(2 beta)| / n_tokens, covered by the relative term
    assert_close("dpo_vs_trl loss", loss_type, torch.tensor([ours["loss"]]),
                 trl_loss.reshape(1), atol=reward_atol, rtol=REL)
    # the comparison is not vacuous: the adapters move the policy off the
    # reference, and the loss has a gradient
    assert float(_log_ratios(objective, collate_pairs(pairs, pad_id=tokenizer.pad_id)).abs().max()
                 ) * beta > 100 * reward_atol
    assert float(trl_loss) > 0

    for layer, projection in model.adapters.adapted():
        A, B = model.adapters.get(layer, projection)
        hf_A, hf_B = lora_weights(trainer.model, layer, projection)
        for ours_w, theirs_w, which in ((A, hf_A, "A"), (B, hf_B, "B")):
            assert ours_w.grad is not None, f"layer {layer} {projection} {which}: no anita gradient"
            assert theirs_w.grad is not None, f"layer {layer} {projection} {which}: no TRL gradient"
            assert float(theirs_w.grad.abs().max()) > 0, f"{projection} {which}: zero TRL gradient"
            assert_close("dpo_vs_trl lora grads", f"{loss_type} L{layer}.{projection}.{which}",
                         ours_w.grad, theirs_w.grad,
                         atol=GRAD_REL * float(theirs_w.grad.abs().max()), rtol=GRAD_REL)
