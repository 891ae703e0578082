"""TRL 1.16's DPOTrainer as a reference for anita's DPO objective.

``trl_dpo_twin`` builds the trainer the way a TRL QLoRA DPO run does: the
checkpoint loaded 4-bit (NF4, double quantization) by transformers +
bitsandbytes, ``peft_config`` handed to the trainer (so TRL wraps the model
itself and, with ``ref_model=None``, its reference is the base with the
adapters disabled), the preference rows given as conversational text and
tokenized by TRL. The adapters' A and B are then overwritten with anita's.

``trl_dpo_loss`` runs exactly one batch through ``DPOTrainer.compute_loss``
(the call ``Trainer.training_step`` makes, in the same context manager) and
back-propagates it, without an optimizer step.

One deliberate departure from a stock TRL run: for a quantized model TRL casts
the LoRA weights to bf16 (dpo_trainer.py, "When using QLoRA, the PEFT adapter
weights are converted to bf16"). bf16 arithmetic would swamp a comparison at
fp32 rounding level, and anita keeps fp32 adapter masters, so the twin's
adapters are put back to fp32.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from anita_core.model.weights import projection_module_path
from tests.model_factory import load_hf_4bit


def conversational_rows(rows: Sequence[dict]) -> List[dict]:
    """anita's validated rows ({prompt: [messages], chosen: str, rejected: str}) in
    TRL's conversational preference shape."""
    return [{"prompt": r["prompt"],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]


def lora_weights(peft_model, layer: int, projection: str) -> Tuple[torch.Tensor, torch.Tensor]:
    module = peft_model.base_model.model.get_submodule(projection_module_path(layer, projection))
    return module.lora_A["default"].weight, module.lora_B["default"].weight


def trl_dpo_twin(ckpt, adapters, rows: Sequence[dict], tokenizer_dir: str, output_dir: str, *,
                 beta: float, loss_type: str):
    """A DPOTrainer on ``ckpt`` whose LoRA weights equal ``adapters`` (anita
    LoRAAdapters, no dropout), with ``rows`` as its train dataset."""
    import datasets
    import trl
    from peft import LoraConfig
    from transformers import AutoTokenizer

    lc = adapters.config
    peft_config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                             target_modules=list(lc.target_modules), use_rslora=lc.use_rslora,
                             bias="none", task_type="CAUSAL_LM")
    args = trl.DPOConfig(output_dir=output_dir, use_cpu=True, beta=beta, loss_type=loss_type,
                         precompute_ref_log_probs=False, max_length=None,
                         activation_checkpointing=False, report_to="none", disable_tqdm=True)
    trainer = trl.DPOTrainer(model=load_hf_4bit(ckpt), ref_model=None, args=args,
                             train_dataset=datasets.Dataset.from_list(conversational_rows(rows)),
                             processing_class=AutoTokenizer.from_pretrained(tokenizer_dir),
                             peft_config=peft_config)
    assert trainer.ref_model is None, "TRL built a separate reference model; expected adapters-off"
    peft_model = trainer.model
    with torch.no_grad():
        for layer, projection in adapters.adapted():
            A, B = adapters.get(layer, projection)
            hf_A, hf_B = lora_weights(peft_model, layer, projection)
            # replace TRL's bf16 copies by fp32 ones (see module docstring)
            hf_A.data = A.detach().clone()
            hf_B.data = B.detach().clone()
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(adapters.adapted()), trainable
    return trainer


def trl_batch(trainer) -> Dict[str, torch.Tensor]:
    """TRL's collated batch of its whole (tokenized) train dataset."""
    dataset = trainer.train_dataset
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


def trl_dpo_loss(trainer, batch) -> Tuple[torch.Tensor, Dict[str, float]]:
    """(loss, metrics) of one batch, after loss.backward(); metrics are what
    DPOTrainer logged for this batch under their TRL names."""
    model = trainer.model
    assert model.training, "DPOTrainer logs under 'train' only in train mode"
    trainer._metrics["train"].clear()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, trainer._prepare_inputs(batch))
    loss.backward()
    logged = trainer._metrics["train"]
    metrics = {}
    for name, values in logged.items():
        if name != "num_tokens":   # a running total, not a per-batch value
            assert len(values) == 1, f"{name}: expected one logged value, got {values}"
            metrics[name] = values[0]
    return loss.detach(), metrics
