"""The README's promises match the scripts: its commands run without an
activated venv, every flag it names exists, and its stated defaults and exit
codes are the code's."""
from __future__ import annotations

import re

import train_dpo
import train_sft
from anita_core.cli import common as cli
from anita_core.recipes.dpo import DPO_PRESETS
from anita_core.recipes.sft import SFT_PRESETS
from tests.run_cli import REPO

README = (REPO / "README.md").read_text()
CODE_SPANS = re.findall(r"`([^`\n]+)`", README) + re.findall(r"^    (\S.*)$", README, re.M)


def script_commands():
    return [c for c in CODE_SPANS if re.search(r"train_(sft|dpo)\.py|-m pytest|-c \"", c)]


def test_every_command_uses_the_venv_interpreter_or_says_to_activate_it():
    commands = script_commands()
    assert len(commands) >= 6
    for command in commands:
        for word in re.findall(r"(?:^|&& )(\S*python\S*) (?!-m venv)", command):
            assert word == ".venv/bin/python", command
    assert "source .venv/bin/activate" in README


def test_every_flag_the_readme_names_exists():
    options = {}
    for name, parser in (("train_sft.py", train_sft.build_parser([])),
                         ("train_dpo.py", train_dpo.build_parser([]))):
        options[name] = {s for a in parser._actions for s in a.option_strings}
    for command in script_commands():
        # each trainer's part of a command line (pip's --no-deps in the setup line is pip's)
        for part in re.findall(r"(train_(?:sft|dpo)\.py[^&|;]*)", command):
            script = part[:len("train_sft.py")]
            for flag in re.findall(r"(--[a-z][a-z0-9-]+)", part):
                assert flag in options[script], (script, flag)
    # a flag named on its own belongs to one of the project's command lines: the two
    # trainers, chat.py, eval.py, or the CPU benchmark the README's timing table cites
    import chat
    from anita_core.eval import cli as eval_cli
    from bench import cpu_real_model
    other_parsers = (chat.build_parser(), cpu_real_model.build_parser(), eval_cli.build_parser())
    known = options["train_sft.py"] | options["train_dpo.py"] | {
        s for parser in other_parsers for a in parser._actions for s in a.option_strings}
    for flag in set(re.findall(r"`(--[a-z][a-z0-9-]+)", README)):
        assert flag in known, flag


def test_stated_defaults_and_exit_codes_are_the_codes():
    every_30 = "Every preset checkpoints every 30 minutes of wall time (`--save-minutes`)"
    assert every_30 in README
    presets = list(SFT_PRESETS.values()) + list(DPO_PRESETS.values())
    assert {p.optim.save_minutes for p in presets} == {30.0}
    assert f"exit code {cli.EXIT_DIVERGED}," in README
    assert f"stops the run with exit code {cli.EXIT_DISK_FULL} and one line" in README
    assert f"(exit code {cli.EXIT_BAD_INPUT})" in README
    assert "Ctrl-C (SIGINT) and SIGTERM" in README and "with code 130 and 143" in README
    assert "--skip-bad-rows" in README and "skipped, counted, and shown (the first 5" in README
    from anita_core.data.stats import MAX_REMEMBERED_PROBLEMS
    assert MAX_REMEMBERED_PROBLEMS == 5
    assert set(SFT_PRESETS) >= {"sft", "ita"}
