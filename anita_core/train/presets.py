"""Named hyper-parameter sets. Flags given on the command line override them.

sft / dpo / ita carry the LLaMAntino-3-ANITA recipe's values (its training
scripts: SFT r 16, alpha 8, all 7 projections, lr 2e-4, weight decay 0.01,
linear schedule, 100 warmup steps, 8-bit paged AdamW, 8192-token sequences;
DPO r 64, alpha 16, rsLoRA, lr 5e-5, beta 0.1, warmup ratio 0.1, no weight
decay, max length 1024, max prompt length 512; Italian adaptation on raw text,
3 epochs, lr 2e-4). Values the recipe does not state (batch size, accumulation,
epochs of SFT/DPO, clipping, LoRA dropout) are anita's choices and marked so.

demo / dpo-demo are the same recipes scaled to the bundled tiny model so that
`python train_sft.py` / `python train_dpo.py` finish in minutes on a CPU; they
are what the scripts use when no --model is given.
"""
from __future__ import annotations

from typing import Dict

from anita_core.model.weights import PROJECTIONS

_ALL = ",".join(PROJECTIONS)

_COMMON = dict(
    target_modules=_ALL, lora_dropout=0.0,        # anita's choice: no LoRA dropout
    max_grad_norm=1.0,                            # anita's choice
    lr_scheduler="linear", seed=42, logging_steps=1,
    save_minutes=30.0,                            # anita's choice: a checkpoint every 30 min of wall time
)

PRESETS: Dict[str, Dict] = {
    "sft": dict(_COMMON, lora_r=16, lora_alpha=8.0, use_rslora=False, learning_rate=2e-4,
                weight_decay=0.01, warmup_steps=100, warmup_ratio=0.0, optimizer="paged_adamw_8bit",
                max_seq_length=8192, data_shape="auto",
                batch_size=1, gradient_accumulation_steps=8, num_epochs=1.0),   # batch/accum/epochs: anita's
    "ita": dict(_COMMON, lora_r=16, lora_alpha=8.0, use_rslora=False, learning_rate=2e-4,
                weight_decay=0.01, warmup_steps=100, warmup_ratio=0.0, optimizer="paged_adamw_8bit",
                max_seq_length=8192, data_shape="text",
                batch_size=1, gradient_accumulation_steps=8, num_epochs=3.0),
    "dpo": dict(_COMMON, lora_r=64, lora_alpha=16.0, use_rslora=True, learning_rate=5e-5,
                weight_decay=0.0, warmup_steps=0, warmup_ratio=0.1, optimizer="paged_adamw_8bit",
                beta=0.1, loss_type="sigmoid", max_length=1024, max_prompt_length=512,
                batch_size=2, gradient_accumulation_steps=4, num_epochs=1.0),   # batch/accum/epochs: anita's
}
PRESETS["demo"] = dict(PRESETS["sft"], learning_rate=5e-3, warmup_steps=3, optimizer="adamw",
                       max_seq_length=128, batch_size=4, gradient_accumulation_steps=1,
                       num_epochs=1.0, max_steps=40, eval_split=8, eval_steps=10)
PRESETS["dpo-demo"] = dict(PRESETS["dpo"], lora_r=16, learning_rate=5e-3, warmup_ratio=0.1,
                           optimizer="adamw", max_length=160, max_prompt_length=96,
                           batch_size=4, gradient_accumulation_steps=1, max_steps=30,
                           eval_split=8, eval_steps=10)

SFT_PRESETS = ("demo", "sft", "ita")
DPO_PRESETS = ("dpo-demo", "dpo")
