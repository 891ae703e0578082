"""Training recipes: one module per stage (sft, dpo; the next stage gets its own),
each holding one typed config, its data builder call and its objective, and
exposing ``run(config) -> RunResult``. The scripts (train_sft.py, train_dpo.py)
only parse flags into a config (anita_core.recipes.cli_*) and call ``run``.

Layer: above anita_core.train (it may import train, data, model, lora, hf, cli);
nothing below imports it."""
