"""anita's reference-free DPO steps (--loss-type orpo, simpo) against TRL 1.16's
experimental ORPOTrainer and CPOTrainer (loss_type="simpo") on one batch, end to
end through anita's model path: the same tiny checkpoint (NF4 double-quantized
on both sides, fp32 compute), the same non-zero LoRA A/B on every projection,
the same token ids. Compared: the loss, the metrics TRL logs that are functions
of the per-sequence sums, and the gradient of every LoRA A and B.

TRL side: the trainer built with ``peft_config`` on transformers + bitsandbytes'
4-bit model (tests/trl_reference.py's twin, here for ORPO/CPO), tokenizing the
plain-text pairs itself; ``get_batch_loss_metrics`` on the collated batch (what
its compute_loss calls), then ``loss.backward()``. anita side: TRL's tokenized
pairs (prompt ids, and each answer's ids after the prompt) as PreferencePairs,
collated by anita (padded, and packed with each prompt once), and
``DPOObjective.micro_step(batch, grad_scale=1/pairs)``. ORPO's NLL term covers
the chosen sequence's prompt too (TRL scores every attended token after the
first): a prompt scored wrongly or not at all fails the loss by > 1e-2.

Tolerances: as tests/test_dpo_vs_trl.py (fp32 on both sides; REL = 1e-5 on
log-prob-sized values, GRAD_REL = 1e-4 on each LoRA tensor's gradient).
"""
from __future__ import annotations

import pytest
import torch

from anita_core.data import collate_pairs
from anita_core.data.dpo import PreferencePair
from anita_core.data.dpo_pack import collate_packed_pairs
from anita_core.model import ops
from anita_core.train.objectives import DPOObjective
from anita_core.train.preference_losses import PREFERENCE_LOSSES
from tests.chat_tokenizers import write_tokenizer
from tests.helpers import assert_close, bitsandbytes_functional
from tests.model_factory import load_hf_4bit, make_tiny_llama_dir

bitsandbytes_functional()

from tests.test_dpo_vs_trl import SHAPES, _anita_model  # noqa: E402
from tests.test_preference_losses import ROWS  # noqa: E402
from tests.trl_reference import lora_weights  # noqa: E402

REL = 1e-5
GRAD_REL = 1e-4

# case -> (TRL trainer, its config, anita loss, anita options)
CASES = {
    "orpo": ("orpo", dict(beta=0.3), "orpo", dict(beta=0.3)),
    "simpo": ("cpo", dict(loss_type="simpo", beta=2.0, simpo_gamma=0.3, cpo_alpha=0.4),
              "simpo", dict(beta=2.0, simpo_gamma=0.3, cpo_alpha=0.4)),
}


def _twin(kind, config, ckpt, adapters, tokenizer, output_dir):
    import datasets
    from peft import LoraConfig
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    lc = adapters.config
    peft_config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                             target_modules=list(lc.target_modules), use_rslora=lc.use_rslora,
                             bias="none", task_type="CAUSAL_LM")
    config_class, trainer_class = {"cpo": (CPOConfig, CPOTrainer), "orpo": (ORPOConfig, ORPOTrainer)}[kind]
    # bf16=False: no bf16 cast of the LoRA and head weights (fp32 on both sides)
    args = config_class(output_dir=output_dir, use_cpu=True, report_to="none", disable_tqdm=True,
                        max_length=256, bf16=False, **config)
    trainer = trainer_class(model=load_hf_4bit(ckpt), args=args, processing_class=tokenizer,
                            train_dataset=datasets.Dataset.from_list(ROWS), peft_config=peft_config)
    with torch.no_grad():
        for layer, projection in adapters.adapted():
            A, B = adapters.get(layer, projection)
            hf_A, hf_B = lora_weights(trainer.model, layer, projection)
            hf_A.data, hf_B.data = A.detach().clone(), B.detach().clone()
    return trainer


def _pairs(trainer):
    """TRL's tokenized pairs as anita's: the prompt, and each answer's ids after it."""
    pairs = []
    for row in trainer.train_dataset:
        prompt = list(row["prompt_input_ids"])
        P = len(prompt)
        assert row["chosen_input_ids"][:P] == prompt and row["rejected_input_ids"][:P] == prompt
        pairs.append(PreferencePair(prompt, list(row["chosen_input_ids"][P:]),
                                    list(row["rejected_input_ids"][P:])))
    return pairs


@pytest.mark.parametrize("case", list(CASES))
def test_reference_free_step_matches_trl(tmp_path, fresh_seed, case):
    from transformers import AutoTokenizer
    kind, trl_config, name, options = CASES[case]
    tokenizer = AutoTokenizer.from_pretrained(str(write_tokenizer(tmp_path / "tok", "chatml", None)))
    ckpt = make_tiny_llama_dir(tmp_path, vocab_size=len(tokenizer), seed=fresh_seed, **SHAPES)
    model = _anita_model(ckpt, seed=fresh_seed)
    trainer = _twin(kind, trl_config, ckpt, model.adapters, tokenizer, str(tmp_path / "trl"))
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    trl_loss.backward()
    trl_metrics = {k: float(v) for k, v in trl_metrics.items()}
    assert float(trl_loss) > 0

    pairs = _pairs(trainer)
    n = len(pairs)
    pad = tokenizer.pad_token_id
    layouts = {"padded": collate_pairs(pairs, pad_id=pad),
               "packed": collate_packed_pairs(pairs, budget=64, pad_id=pad, multiple=16)}
    extra = {k: v for k, v in options.items() if k != "beta"}
    # per-token averages: the metrics move with REL times the largest per-token log-prob
    scale = max(abs(trl_metrics["logps/chosen"]), abs(trl_metrics["logps/rejected"]),
                abs(trl_metrics.get("nll_loss", 0.0)))
    for layout, batch_ in layouts.items():
        for p in model.adapters.parameters():
            p.grad = None
        objective = DPOObjective(model, beta=options["beta"], loss_type=name, options=extra)
        with ops.use_backend("torch"):
            sums = objective.micro_step(batch_, grad_scale=1.0 / n)
        assert objective.reference_passes == 0
        where = f"{case} {layout}"
        assert_close("orpo/simpo vs trl", f"{where} loss", torch.tensor([float(sums["loss"]) / n]),
                     trl_loss.detach().reshape(1), atol=REL * scale, rtol=REL)
        for metric in PREFERENCE_LOSSES[name].metrics:
            ours = float(sums[metric]) / n
            if metric == "rewards/accuracies":
                assert ours == trl_metrics[metric], where
                continue
            slope = options["beta"] if metric.startswith("rewards/") else 1.0
            assert_close("orpo/simpo vs trl", f"{where} {metric}", torch.tensor([ours]),
                         torch.tensor([trl_metrics[metric]]), atol=REL * scale * slope, rtol=REL)
        for layer, projection in model.adapters.adapted():
            A, B = model.adapters.get(layer, projection)
            hf_A, hf_B = lora_weights(trainer.model, layer, projection)
            for ours_w, theirs_w, which in ((A, hf_A, "A"), (B, hf_B, "B")):
                assert float(theirs_w.grad.abs().max()) > 0, f"{projection} {which}: zero TRL gradient"
                assert_close("orpo/simpo vs trl grads", f"{where} L{layer}.{projection}.{which}",
                             ours_w.grad, theirs_w.grad,
                             atol=GRAD_REL * float(theirs_w.grad.abs().max()), rtol=GRAD_REL)
