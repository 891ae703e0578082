#!/usr/bin/env python
"""Direct preference optimization (DPO) with NF4 QLoRA.

    python train_dpo.py                                   # bundled tiny model + sample pairs (CPU, minutes)
    python train_dpo.py --preset dpo --model DIR --data pairs.jsonl --init-adapter runs/sft-sft/adapter \\
        --exclude-sources toxic-dpo

Rows: {prompt, chosen, rejected} as strings, or chosen/rejected as message lists
whose last message is the answer (the earlier ones are the prompt), as in
orpo-dpo-mix-40k. Policy = base + trainable LoRA; reference = the same base with
adapters off, or with --reference-adapter; reference log-probs take no gradient.
"""
from __future__ import annotations

import argparse
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the usage examples' line breaks and shows every default."""


def build_parser(argv):
    from anita_core.assets import sample_path
    from anita_core.train.cli import add_common_arguments, resolve_preset
    from anita_core.train.flag_types import int_at_least, non_negative_int, positive_float
    from anita_core.train.losses import DPO_LOSS_TYPES
    from anita_core.train.presets import DPO_PRESETS, PRESETS
    preset = resolve_preset(argv, demo="dpo-demo", real="dpo", allowed=DPO_PRESETS)
    d = PRESETS[preset]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_arguments(parser, preset, DPO_PRESETS)
    g = parser.add_argument_group("DPO")
    g.add_argument("--data", nargs="+", default=[sample_path("dpo")],
                   help="preference data file(s), folder(s) or hub name(s)")
    g.add_argument("--beta", type=positive_float, default=d["beta"], help="DPO temperature")
    g.add_argument("--loss-type", default=d["loss_type"], choices=DPO_LOSS_TYPES, help="preference loss")
    g.add_argument("--max-length", type=int_at_least(2), default=d["max_length"], help="prompt + answer tokens")
    g.add_argument("--max-prompt-length", type=non_negative_int, default=d["max_prompt_length"],
                   help="prompt tokens kept when a pair is too long (TRL <= 0.11 rule); 0: TRL 1.x rule")
    g.add_argument("--exclude-sources", nargs="*", default=[],
                   help="drop rows whose `source` column is one of these (the paper drops toxic-dpo)")
    g.add_argument("--reference-adapter", default=None,
                   help="reference = base + this frozen PEFT adapter (default: base, adapters off)")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from anita_core.train.cli import (build_data_or_report, eval_split_value, load_model_and_adapters,
                                      parse_command_line, per_epoch, rank_logger, resolve_model_dir,
                                      run_training, start_distributed, start_run, tokenizer_dir_for,
                                      train_config_from_args)
    from anita_core.train.distributed import setup_model
    from anita_core.train.run_identity import run_settings
    parser, args = parse_command_line(build_parser, argv)
    if args.max_prompt_length and args.max_prompt_length >= args.max_length:
        parser.error(f"argument --max-prompt-length: must be below --max-length "
                     f"({args.max_length}), or 0; got {args.max_prompt_length}")
    from anita_core.data import DPODataConfig, build_dpo_data, dpo_batches, load_tokenizer
    from anita_core.lora import load_peft
    from anita_core.train.objectives import DPOObjective
    from anita_core.train.trainer import Trainer
    dist = start_distributed(args)
    log = rank_logger(dist)
    output_dir = args.output_dir or f"runs/dpo-{args.preset}"
    run = start_run(args, output_dir, log, dist)

    # checked before the model loads: DPO prompts are rendered in LLaMA-3's chat format
    from anita_core.data.templates import LLAMA3_TOKENS
    tokenizer = load_tokenizer(tokenizer_dir_for(resolve_model_dir(args.model)))
    missing = [t for t in LLAMA3_TOKENS if not tokenizer.has_token(t)]
    if missing:
        log(f"error: {tokenizer.name}: no {missing[0]} token; train_dpo.py renders prompts in "
            "LLaMA-3's chat format, which needs it")
        return 2
    model_dir, model, adapters = load_model_and_adapters(args, log)
    reference = None
    if args.reference_adapter:
        try:
            reference = load_peft(args.reference_adapter, model.config, device=model.device)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--reference-adapter: {e}")
        for p in reference.parameters():
            p.requires_grad_(False)
    data_config = DPODataConfig(data=args.data, system_prompt=args.system_prompt,
                                max_length=args.max_length,
                                max_prompt_length=args.max_prompt_length or None,
                                exclude_sources=tuple(args.exclude_sources), max_samples=args.max_samples,
                                eval_split=eval_split_value(args.eval_split), seed=args.seed,
                                skip_bad_rows=args.skip_bad_rows)
    data = build_data_or_report(build_dpo_data, data_config, tokenizer, log, "preference pairs")
    if data is None:
        return 2

    epoch_batches = per_epoch(lambda epoch: dpo_batches(
        data.train, batch_size=args.batch_size, pad_id=tokenizer.pad_id, shuffle_seed=args.seed + epoch))

    eval_batches = (dpo_batches(data.eval, batch_size=args.batch_size, pad_id=tokenizer.pad_id)
                    if data.eval else None)
    objective = DPOObjective(model, beta=args.beta, loss_type=args.loss_type, reference_adapters=reference)
    settings = run_settings(args, "train_dpo.py", model_dir, adapters, data, dist.world_size)
    grad_buckets = setup_model(dist, model, adapters, sharded_base=args.sharded_base)
    trainer = Trainer(model, adapters, objective, epoch_batches,
                      train_config_from_args(args, output_dir, settings), eval_batches=eval_batches,
                      log=log, dist=dist, grad_buckets=grad_buckets,
                      split_eval=not args.sharded_base)
    log(f"{trainer.total_steps} optimizer steps, {trainer.batches_per_epoch} micro-batches per epoch, "
        f"output in {output_dir}" + (f"; {dist.world_size} ranks ({dist.backend}), "
        f"{'sharded' if args.sharded_base else 'whole'} base, global batch "
        f"{args.batch_size * args.gradient_accumulation_steps * dist.world_size}" if dist.active else ""))
    return run_training(trainer, args, model_dir, model, adapters, run, log, data.stats)


if __name__ == "__main__":
    import script_entry
    sys.exit(script_entry.run(main, "train_dpo.py"))
