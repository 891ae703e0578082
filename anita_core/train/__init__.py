"""Training: the loop, the SFT and DPO objectives and losses, the optimizer and
schedules, run checkpoints (resume state, not HF formats), presets and the
flags the two scripts share.

Layer: the top of anita_core; imports model, lora, hf and data. Nothing in
anita_core imports it; the CLIs (train_sft.py, train_dpo.py) and bench/ do.
Import the module you need (anita_core.train.trainer, .objectives, .cli, ...):
this package's __init__ loads nothing so that `--help` stays fast.
"""
