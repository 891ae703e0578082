#!/usr/bin/env python
"""Direct preference optimization (DPO) with NF4 QLoRA.

    python train_dpo.py                                   # bundled tiny model + sample pairs (CPU, minutes)
    python train_dpo.py --preset dpo --model DIR --data pairs.jsonl --init-adapter runs/sft-sft/adapter \\
        --exclude-sources toxic-dpo

Rows: {prompt, chosen, rejected} as strings, or chosen/rejected as message lists
whose last message is the answer (the earlier ones are the prompt), as in
orpo-dpo-mix-40k. --template llama3 (LLaMA-3's chat format), chat (the
tokenizer's own chat_template: SmolLM2's ChatML, Mistral-style and other chat
models) or none (raw text + EOS), each rendered and split into prompt and answer
as TRL's DPOTrainer does. Policy = base + trainable LoRA; reference = the same base with
adapters off, or with --reference-adapter; reference log-probs take no gradient.
With --precompute-reference (the default for the base reference) they are
computed for every training and held-out pair in one pass before training, kept in
OUTPUT_DIR/reference_logps, so each step runs only the policy and --resume
reuses them.
"""
from __future__ import annotations

import sys


def build_parser(argv):
    from anita_core.recipes.cli_dpo import build_parser as dpo_parser
    return dpo_parser(argv, __doc__)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from anita_core.recipes.cli_dpo import check_flags, config_from_args
    from anita_core.recipes.cli_train import parse_command_line
    from anita_core.recipes.dpo import run
    parser, args = parse_command_line(build_parser, argv)
    check_flags(parser, args)
    return run(config_from_args(args)).exit_code


if __name__ == "__main__":
    import script_entry
    sys.exit(script_entry.run(main, "train_dpo.py"))
