"""The flags train_sft.py and train_dpo.py share, their defaults taken from the
chosen preset (a recipe config value), and the parsed command line turned into
the config's option groups. Only this layer (cli_*.py) sees an argparse Namespace."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional, Sequence

from anita_core.cli import environment
from anita_core.cli.common import (BUNDLED_MODEL, add_threads_argument, add_tokenizer_argument,
                                   apply_threads, check_model_flag, usage_error)
from anita_core.cli.flag_types import (FlagParser, check_token_rows, comma_subset, count_or_fraction,
                                       learning_rate, non_negative_float, non_negative_int,
                                       positive_float, positive_int, probability_0_1, seed_int,
                                       steps_or_off, utf8_text)
from anita_core.model.weights import PROJECTIONS
from anita_core.recipes.options import (DataOptions, DistributedOptions, LoRAOptions,
                                        OptimOptions, ReportOptions, RunOptions)
from anita_core.memory.budget import MemoryRequest
from anita_core.train.memory_budget import add_memory_arguments, check_memory_environment
from anita_core.train.report import add_report_arguments, check_installed


@dataclass(frozen=True)
class RecipeFlags:
    """What a script's parser declares about its recipe, for the checks made after parsing:
    the flag bounding a row's length, and token rows per batch item (a DPO pair is two)."""
    length_flag: str            # e.g. "--max-seq-length"
    rows_per_item: int


def recipe_parser(prog: str, description: str, flags: RecipeFlags, formatter_class) -> FlagParser:
    parser = FlagParser(prog=prog, description=description, formatter_class=formatter_class)
    parser.recipe_flags = flags
    return parser


def resolve_preset(argv: List[str], demo: str, real: str, allowed: Sequence[str],
                   prog: Optional[str] = None, other_scripts: Mapping[str, str] = None) -> str:
    """--preset if given (one of ``allowed``, this script's presets); otherwise the
    demo preset when no --model is given. ``other_scripts``: preset -> the script it
    belongs to, named in the error for another script's preset."""
    pre = FlagParser(prog=prog, add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--model")
    known, _ = pre.parse_known_args(argv)
    if known.preset is not None:
        if known.preset not in allowed:
            other = (other_scripts or {}).get(known.preset)
            hint = f" ({known.preset!r} is a preset of {other})" if other else ""
            pre.error(f"argument --preset: invalid choice: {known.preset!r}{hint}; "
                      f"choose from {', '.join(allowed)}")
        return known.preset
    return demo if known.model is None else real


def add_common_arguments(parser: argparse.ArgumentParser, preset, presets: Sequence[str]) -> None:
    """The shared flags; defaults from ``preset`` (an SFTConfig / DPOConfig value)."""
    run, lora, optim, data = preset.run, preset.lora, preset.optim, preset.data
    g = parser.add_argument_group("run")
    g.add_argument("--preset", default=preset.preset, choices=tuple(presets),
                   help="hyper-parameter set; flags override it (defaults shown are this preset's)")
    g.add_argument("--model", default=BUNDLED_MODEL,
                   help="base model: a local HF LLaMA checkpoint directory (or a hub name when online)")
    add_tokenizer_argument(g)
    g.add_argument("--output-dir", default=None, help="where checkpoints, metrics and the adapter go "
                   "(default: runs/<script>-<preset>, runs/ being $ANITA_RUNS_DIR when set)")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from a checkpoint directory, or the run's latest one if no path")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output-dir (its metrics, checkpoints and adapter)")
    g.add_argument("--init-adapter", default=None, help="start from this PEFT adapter (e.g. an SFT adapter)")
    g.add_argument("--merge-export", default=None, metavar="DIR",
                   help="also write the base with the adapter merged in, as a HF checkpoint")
    g.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="compute dtype (auto: bf16 on a GPU, fp32 on the CPU)")
    g.add_argument("--seed", type=seed_int, default=run.seed, help="seed for data order, LoRA init, dropout")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_threads_argument(g)
    add_memory_arguments(g)

    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=positive_int, default=lora.r, help="rank")
    g.add_argument("--lora-alpha", type=positive_float, default=lora.alpha, help="alpha (scale = alpha / r)")
    g.add_argument("--lora-dropout", type=probability_0_1, default=lora.dropout, help="dropout on the LoRA input")
    g.add_argument("--rslora", action=argparse.BooleanOptionalAction, default=lora.use_rslora,
                   help="rank-stabilized scale alpha / sqrt(r)")
    g.add_argument("--target-modules", default=lora.target_modules, type=comma_subset(PROJECTIONS),
                   help=f"comma-separated subset of {','.join(PROJECTIONS)}")

    g = parser.add_argument_group("optimization")
    g.add_argument("--learning-rate", type=learning_rate, default=optim.learning_rate, help="peak learning rate")
    g.add_argument("--weight-decay", type=non_negative_float, default=optim.weight_decay, help="AdamW weight decay")
    g.add_argument("--optimizer", default=optim.optimizer, choices=("adamw", "paged_adamw_8bit"),
                   help="paged_adamw_8bit needs CUDA + bitsandbytes, else falls back to adamw")
    g.add_argument("--lr-scheduler", default=optim.lr_scheduler, choices=("linear", "cosine", "constant"),
                   help="decay after warmup")
    g.add_argument("--warmup-steps", type=non_negative_int, default=optim.warmup_steps, help="warmup steps (wins over ratio)")
    g.add_argument("--warmup-ratio", type=probability_0_1, default=optim.warmup_ratio, help="warmup as a fraction of steps")
    g.add_argument("--batch-size", type=positive_int, default=optim.batch_size, help="rows (SFT) or pairs (DPO) per micro-batch")
    g.add_argument("--gradient-accumulation-steps", type=positive_int, default=optim.gradient_accumulation_steps,
                   help="micro-batches per optimizer step")
    g.add_argument("--max-grad-norm", type=non_negative_float, default=optim.max_grad_norm, help="gradient clipping (0: off)")
    g.add_argument("--num-epochs", type=positive_float, default=optim.num_epochs, help="passes over the training data")
    g.add_argument("--max-steps", type=steps_or_off, default=optim.max_steps, help="optimizer steps (wins over epochs; -1: off)")
    g.add_argument("--logging-steps", type=positive_int, default=optim.logging_steps, help="metrics.jsonl every N steps")
    g.add_argument("--eval-steps", type=non_negative_int, default=optim.eval_steps, help="evaluate every N steps (0: at the end)")
    g.add_argument("--save-steps", type=non_negative_int, default=optim.save_steps,
                   help="checkpoint every N steps (0: off)")
    g.add_argument("--save-minutes", type=non_negative_float, default=optim.save_minutes,
                   help="also checkpoint every M minutes of wall time (0: off; with --save-steps 0 "
                        "only the final checkpoint and the one a stop writes are kept)")
    g.add_argument("--save-total-limit", type=non_negative_int, default=optim.save_total_limit,
                   help="checkpoints kept (0: all)")

    add_report_arguments(parser.add_argument_group("watching a run"))

    g = parser.add_argument_group("distributed (launch with torchrun)")
    g.add_argument("--sharded-base", action="store_true",
                   help="each rank keeps 1/world of every layer's NF4 base and gathers a layer just "
                        "before it runs (for bases one GPU cannot hold); default: every rank holds "
                        "the whole base (data parallel). On one process nothing is sharded")
    g.add_argument("--global-batch-size", type=positive_int, default=None,
                   help="rows (SFT) or pairs (DPO) per optimizer step over all ranks; sets "
                        "--gradient-accumulation-steps to it / (--batch-size x world size)")
    g.add_argument("--collective-timeout", type=positive_float, default=run.distributed.collective_timeout,
                   help="seconds a rank waits for the others in a collective before the job stops")

    g = parser.add_argument_group("data")
    g.add_argument("--max-samples", type=positive_int, default=data.max_samples,
                   help="draw this many rows uniformly at random (with --seed) from all of --data, "
                        "streamed: a folder of shards or a hub dataset larger than memory is fine")
    g.add_argument("--eval-split", type=count_or_fraction, default=data.eval_split,
                   help="held-out rows: a count (>= 1) or a fraction (< 1)")
    g.add_argument("--skip-bad-rows", action="store_true",
                   help="skip, count and show malformed rows (bad JSON, bad encoding, missing or "
                        "wrong fields) instead of stopping at the first")
    g.add_argument("--system-prompt", default=None, type=utf8_text, help="default system prompt for rows without one")


def parse_command_line(build_parser: Callable[[List[str]], FlagParser], argv: List[str]):
    """(parser, args): flags parsed and checked, each alone (their argparse types)
    and together; a bad one exits with an argparse error (code 2)."""
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    check_model_flag(parser, args.model)
    apply_threads(args.threads)
    if args.resume and args.overwrite:
        parser.error("argument --overwrite: not allowed with --resume (one continues the run "
                     "in --output-dir, the other replaces it)")
    if args.sharded_base and args.merge_export:
        parser.error("argument --merge-export: not allowed with --sharded-base (no rank holds the "
                     "whole base); merge the saved adapter in a later single-process run")
    flags: RecipeFlags = parser.recipe_flags
    length = getattr(args, flags.length_flag[2:].replace("-", "_"))
    check_token_rows(parser, flags.length_flag, args.batch_size * flags.rows_per_item, length)
    if args.global_batch_size is not None:
        from anita_core.train.distributed import check_global_batch
        try:
            args.gradient_accumulation_steps = check_global_batch(args.global_batch_size,
                                                                  args.batch_size,
                                                                  environment.world_size())
        except ValueError as e:
            parser.error(f"argument --global-batch-size: {e}")
    check_memory_environment(parser)
    try:
        check_installed(args.report_to)     # before the output folder and the model
    except ValueError as e:
        usage_error(str(e))
    return parser, args


def eval_split_value(x: float):
    return int(x) if x >= 1 else x


def common_options(args: argparse.Namespace):
    """(run, lora, optim, data options) of a parsed command line; data.files is the
    script's --data."""
    run = RunOptions(
        model=args.model, tokenizer=args.tokenizer, output_dir=args.output_dir, resume=args.resume,
        overwrite=args.overwrite, init_adapter=args.init_adapter, merge_export=args.merge_export,
        dtype=args.dtype, seed=args.seed, progress=not args.no_progress,
        memory=MemoryRequest(strategy=args.recompute,
                             offload_activations=bool(args.offload_activations),
                             memory_budget_gib=args.memory_budget,
                             host_memory_budget_gib=args.host_memory_budget),
        report=ReportOptions(report_to=tuple(args.report_to), wandb_project=args.wandb_project,
                             run_name=args.run_name),
        distributed=DistributedOptions(sharded_base=args.sharded_base,
                                       collective_timeout=args.collective_timeout))
    lora = LoRAOptions(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                       use_rslora=args.rslora, target_modules=args.target_modules)
    optim = OptimOptions(
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, optimizer=args.optimizer,
        lr_scheduler=args.lr_scheduler, warmup_steps=args.warmup_steps, warmup_ratio=args.warmup_ratio,
        batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm, num_epochs=args.num_epochs, max_steps=args.max_steps,
        logging_steps=args.logging_steps, eval_steps=args.eval_steps, save_steps=args.save_steps,
        save_minutes=args.save_minutes, save_total_limit=args.save_total_limit)
    data = DataOptions(files=tuple(args.data), max_samples=args.max_samples,
                       eval_split=eval_split_value(args.eval_split), skip_bad_rows=args.skip_bad_rows,
                       system_prompt=args.system_prompt)
    return run, lora, optim, data
