"""train_sft.py's command line: its parser (the shared flags plus the SFT data
flags, defaults from the chosen preset) and the parsed flags as an SFTConfig."""
from __future__ import annotations

import argparse
from dataclasses import replace
from typing import List

from anita_core.cli.flag_types import HelpFormatter, int_at_least
from anita_core.recipes.cli_train import (RecipeFlags, add_common_arguments, common_options,
                                          recipe_parser, resolve_preset)
from anita_core.recipes.sft import DEMO, REAL, SCRIPT, SFT_PRESETS, SFTConfig


def build_parser(argv: List[str], description: str) -> argparse.ArgumentParser:
    from anita_core.recipes.dpo import DPO_PRESETS
    preset = resolve_preset(argv, demo=DEMO, real=REAL, allowed=tuple(SFT_PRESETS), prog=SCRIPT,
                            other_scripts={p: "train_dpo.py" for p in DPO_PRESETS})
    d = SFT_PRESETS[preset]
    parser = recipe_parser(SCRIPT, description, RecipeFlags("--max-seq-length", 1), HelpFormatter)
    add_common_arguments(parser, d, tuple(SFT_PRESETS))
    g = parser.add_argument_group("SFT data")
    g.add_argument("--data", nargs="+", default=list(d.data.files),
                   help="data file(s), folder(s) or hub name(s)")
    g.add_argument("--data-shape", default=d.data_shape, choices=("auto", "instruction", "chat", "text"),
                   help="row shape (auto: detected from the columns)")
    g.add_argument("--template", default=d.template, choices=("llama3", "alpaca", "chat"),
                   help="how instruction and chat rows are rendered (chat: the tokenizer's own "
                        "chat_template from tokenizer_config.json; llama3 needs LLaMA-3's tokens)")
    g.add_argument("--max-seq-length", type=int_at_least(2), default=d.max_seq_length, help="tokens per row")
    g.add_argument("--train-on-all-tokens", action="store_true",
                   help="loss on every token, not only the answers")
    g.add_argument("--no-packing", action="store_true", help="one example per row, padded")
    return parser


def config_from_args(args: argparse.Namespace) -> SFTConfig:
    run, lora, optim, data = common_options(args)
    return replace(SFT_PRESETS[args.preset], preset=args.preset, run=run, lora=lora, optim=optim,
                   data=data, data_shape=args.data_shape, template=args.template,
                   max_seq_length=args.max_seq_length, train_on_all_tokens=args.train_on_all_tokens,
                   packing=not args.no_packing)
