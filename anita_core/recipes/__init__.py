"""Training recipes: one module per stage (sft, dpo), each holding one typed
config (a frozen dataclass made of recipes.options' groups), its presets (config
values: ``SFT_PRESETS["demo"]`` is an SFTConfig), its data builder call and its
objective, and exposing ``run(config) -> RunResult``. The scripts (train_sft.py,
train_dpo.py) only parse flags into a config (recipes.cli_sft / cli_dpo, over
cli_train's shared flags) and call ``run``.

The next stage (e.g. ORPO, KTO) is: recipes/<stage>.py with its config, presets
and run (session.py and finish.py are the start and end every run shares), its
loss as an entry of train.preference_losses if it is a preference loss,
recipes/cli_<stage>.py (build_parser, config_from_args), and a script shim.

Layer: above anita_core.train (it may import train, data, model, lora, hf, cli);
nothing below imports it."""
