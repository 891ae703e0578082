"""train_dpo.py's command line: its parser (the shared flags plus the DPO flags,
defaults from the chosen preset), the checks between its flags, and the parsed
flags as a DPOConfig."""
from __future__ import annotations

import argparse
from dataclasses import replace
from typing import List

from anita_core.cli.flag_types import (HelpFormatter, int_at_least, non_negative_float,
                                       non_negative_int, positive_float)
from anita_core.recipes.cli_train import (RecipeFlags, add_common_arguments, common_options,
                                          recipe_parser, resolve_preset)
from anita_core.recipes.dpo import DEMO, DPO_PRESETS, REAL, SCRIPT, DPOConfig
from anita_core.train.preference_losses import PREFERENCE_LOSSES, loss_options, losses_using

# the losses' hyperparameters besides beta: help text (TRL's names; defaults from the table)
LOSS_OPTION_HELP = {
    "label_smoothing": "assumed fraction of pairs with flipped labels, in [0, 0.5) (robust: "
                       "rDPO's epsilon; simpo: label smoothing of its sigmoid loss)",
    "simpo_gamma": "SimPO's target reward margin (its gamma / beta is the log-prob margin)",
    "cpo_alpha": "weight of the chosen answers' NLL added to SimPO (CPO-SimPO); 0: pure SimPO",
    "sigmoid_weight": "weight of the DPO (sigmoid) term (TRL's loss_weights[0])",
    "sft_weight": "weight of the chosen answers' NLL term (TRL's loss_weights[1])",
}


def build_parser(argv: List[str], description: str) -> argparse.ArgumentParser:
    from anita_core.data.dpo_render import DPO_TEMPLATES
    from anita_core.recipes.sft import SFT_PRESETS
    preset = resolve_preset(argv, demo=DEMO, real=REAL, allowed=tuple(DPO_PRESETS), prog=SCRIPT,
                            other_scripts={p: "train_sft.py" for p in SFT_PRESETS})
    d = DPO_PRESETS[preset]
    parser = recipe_parser(SCRIPT, description, RecipeFlags("--max-length", 2), HelpFormatter)
    add_common_arguments(parser, d, tuple(DPO_PRESETS))
    g = parser.add_argument_group("DPO")
    g.add_argument("--data", nargs="+", default=list(d.data.files),
                   help="preference data file(s), folder(s) or hub name(s)")
    g.add_argument("--template", default=d.template, choices=DPO_TEMPLATES,
                   help="how prompts and answers are rendered (chat: the tokenizer's own "
                        "chat_template from tokenizer_config.json; llama3 needs LLaMA-3's tokens; "
                        "none: raw text, answers end with the EOS token)")
    g.add_argument("--beta", type=positive_float, default=d.beta,
                   help="DPO temperature (orpo: the odds-ratio weight lambda; simpo: its beta)")
    g.add_argument("--loss-type", default=d.loss_type, choices=tuple(PREFERENCE_LOSSES),
                   help="preference loss (docs/preference-losses.md); orpo and simpo are "
                        "reference-free")
    for key in loss_options():
        users = losses_using(key)
        defaults = sorted({str(PREFERENCE_LOSSES[name].defaults[key]) for name in users})
        # SUPPRESS: absent unless given, so a flag given with a loss that ignores it is refused
        g.add_argument(f"--{key.replace('_', '-')}", type=non_negative_float,
                       default=argparse.SUPPRESS,
                       help=f"{LOSS_OPTION_HELP.get(key, key)}; for --loss-type {', '.join(users)} "
                            f"(default: {', '.join(defaults)})")
    g.add_argument("--max-length", type=int_at_least(2), default=d.max_length, help="prompt + answer tokens")
    g.add_argument("--max-prompt-length", type=non_negative_int, default=d.max_prompt_length,
                   help="prompt tokens kept when a pair is too long (TRL <= 0.11 rule); 0: TRL 1.x rule")
    g.add_argument("--exclude-sources", nargs="*", default=list(d.exclude_sources),
                   help="drop rows whose `source` column is one of these (the paper drops toxic-dpo)")
    g.add_argument("--reference-adapter", default=d.reference_adapter,
                   help="reference = base + this frozen PEFT adapter (default: base, adapters off)")
    # SUPPRESS: no attribute unless given, so the help shows the rule, not "None"
    g.add_argument("--precompute-reference", action=argparse.BooleanOptionalAction,
                   default=argparse.SUPPRESS,
                   help="compute the reference log-probs of the training and eval pairs once, "
                        "before training, and keep them in OUTPUT_DIR/reference_logps (a resume "
                        "reuses them); each step then runs only the policy (default: on when the "
                        "reference is the base with adapters off, off with --reference-adapter)")
    g.add_argument("--pack-pairs", action=argparse.BooleanOptionalAction, default=d.pack_pairs,
                   help="lay each micro-batch's pairs as [prompt | chosen | rejected] in rows of "
                        "2 x --max-length tokens, no padding, each prompt computed once "
                        "(--no-pack-pairs: chosen and rejected rows padded to the longest, "
                        "for comparison; default: on)")
    return parser


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks between DPO flags (argparse's error, exit code 2)."""
    if args.template == "none" and args.system_prompt:
        parser.error("argument --system-prompt: not allowed with --template none (raw text has no "
                     "system turn)")
    # a loss's hyperparameter given with another loss, or a reference with a reference-free one
    problem = config_from_args(args).loss_option_problem()
    if problem is not None:
        parser.error(f"argument {problem[0]}: {problem[1]}")
    if args.max_prompt_length and args.max_prompt_length >= args.max_length:
        parser.error(f"argument --max-prompt-length: must be below --max-length "
                     f"({args.max_length}), or 0; got {args.max_prompt_length}")


def config_from_args(args: argparse.Namespace) -> DPOConfig:
    run, lora, optim, data = common_options(args)
    # --precompute-reference is absent from the Namespace unless given (SUPPRESS)
    precompute = vars(args).get("precompute_reference")
    return replace(DPO_PRESETS[args.preset], preset=args.preset, run=run, lora=lora, optim=optim,
                   data=data, template=args.template, beta=args.beta, loss_type=args.loss_type,
                   max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                   exclude_sources=tuple(args.exclude_sources),
                   reference_adapter=args.reference_adapter, precompute_reference=precompute,
                   pack_pairs=args.pack_pairs,
                   # the losses' hyperparameters are absent unless given (SUPPRESS): None
                   **{k: vars(args).get(k) for k in loss_options()})
