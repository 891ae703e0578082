#!/usr/bin/env python
"""Supervised fine-tuning (and Italian language adaptation) with NF4 QLoRA.

    python train_sft.py                                   # bundled tiny model + sample data (CPU, minutes)
    python train_sft.py --preset sft --model DIR --data FILE
    python train_sft.py --preset ita --model DIR --data italian_text.jsonl

Data rows: {system, instruction, input, output}, {messages: [{role, content},
...]}, or {text}. --template llama3 (LLaMA-3's chat format), alpaca, or chat
(the tokenizer's own chat_template from tokenizer_config.json: SmolLM2,
LLaMA-2, Mistral-style and other LLaMA-architecture models); raw text is
{bos_token}{text}{eos_token} with the tokenizer's own tokens. Local JSON /
JSONL / Parquet / CSV files, folders of such shards, or a hub dataset name
when online; --max-samples N draws N rows at random (by --seed), streamed.
"""
from __future__ import annotations

import sys


def build_parser(argv):
    from anita_core.recipes.cli_sft import build_parser as sft_parser
    return sft_parser(argv, __doc__)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from anita_core.recipes.cli_sft import config_from_args
    from anita_core.recipes.cli_train import parse_command_line
    from anita_core.recipes.sft import run
    _, args = parse_command_line(build_parser, argv)
    return run(config_from_args(args)).exit_code


if __name__ == "__main__":
    import script_entry
    sys.exit(script_entry.run(main, "train_sft.py"))
