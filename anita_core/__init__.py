"""anita_core: the LLaMA-3 NF4 QLoRA model, its data pipeline and its trainer."""
