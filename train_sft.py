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
    from anita_core.assets import sample_path
    from anita_core.train.cli import add_common_arguments, resolve_preset
    from anita_core.train.flag_types import FlagParser, HelpFormatter, int_at_least
    from anita_core.train.presets import PRESETS, SFT_PRESETS
    preset = resolve_preset(argv, demo="demo", real="sft", allowed=SFT_PRESETS, prog="train_sft.py")
    d = PRESETS[preset]
    parser = FlagParser(prog="train_sft.py", description=__doc__, formatter_class=HelpFormatter)
    add_common_arguments(parser, preset, SFT_PRESETS)
    g = parser.add_argument_group("SFT data")
    g.add_argument("--data", nargs="+", default=[sample_path("text" if d["data_shape"] == "text" else "instruction")],
                   help="data file(s), folder(s) or hub name(s)")
    g.add_argument("--data-shape", default=d["data_shape"], choices=("auto", "instruction", "chat", "text"),
                   help="row shape (auto: detected from the columns)")
    g.add_argument("--template", default="llama3", choices=("llama3", "alpaca", "chat"),
                   help="how instruction and chat rows are rendered (chat: the tokenizer's own "
                        "chat_template from tokenizer_config.json; llama3 needs LLaMA-3's tokens)")
    g.add_argument("--max-seq-length", type=int_at_least(2), default=d["max_seq_length"], help="tokens per row")
    g.add_argument("--train-on-all-tokens", action="store_true",
                   help="loss on every token, not only the answers")
    g.add_argument("--no-packing", action="store_true", help="one example per row, padded")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from anita_core.train.cli import (EXIT_BAD_INPUT, build_data_or_report, default_output_dir,
                                      eval_split_value, load_model_and_adapters, parse_command_line,
                                      per_epoch, rank_logger, run_training, start_distributed,
                                      train_config_from_args)
    from anita_core.train.distributed import setup_model
    from anita_core.train.input_checks import check_inputs
    from anita_core.train.run_identity import run_settings
    from anita_core.train.run_start import start_run
    _, args = parse_command_line(build_parser, argv)
    from anita_core.data import SFTDataConfig, build_sft_data, largest_sft_batch, sft_batches
    from anita_core.train.objectives import SFTObjective
    from anita_core.train.trainer import Trainer
    dist = start_distributed(args)
    log = rank_logger(dist)
    # the model folder (config, file headers, tokenizer) and --init-adapter are checked
    # before the output folder is touched
    checked = check_inputs(args)
    tokenizer = checked.tokenizer
    output_dir = args.output_dir or default_output_dir(f"sft-{args.preset}")
    run = start_run(args, output_dir, log, dist)
    with run.undone_if_refused():        # a refusal from here to training leaves no trace
        # the data is built before the model loads: a tokenizer/template mismatch or
        # a bad row is reported without waiting for the base model
        data_config = SFTDataConfig(data=args.data, shape=args.data_shape, template=args.template,
                                    system_prompt=args.system_prompt, max_seq_length=args.max_seq_length,
                                    train_on_all_tokens=args.train_on_all_tokens,
                                    max_samples=args.max_samples,
                                    eval_split=eval_split_value(args.eval_split), seed=args.seed,
                                    skip_bad_rows=args.skip_bad_rows, progress=not args.no_progress)
        data = build_data_or_report(build_sft_data, data_config, tokenizer, log, "training examples")
        if data is None:
            run.abandon()
            return EXIT_BAD_INPUT
        model, adapters = load_model_and_adapters(args, checked.model_dir, log)

        def batches_for(documents, seed):
            return sft_batches(documents, batch_size=args.batch_size, seq_len=args.max_seq_length,
                               pad_id=tokenizer.pad_id, pack=not args.no_packing, shuffle_seed=seed)

        epoch_batches = per_epoch(lambda epoch: batches_for(data.train, args.seed + epoch))
        eval_batches = batches_for(data.eval, None) if data.eval else None
        settings = run_settings(args, "train_sft.py", checked.model_dir, adapters, data, dist.world_size)
        grad_buckets = setup_model(dist, model, adapters, sharded_base=args.sharded_base)
        trainer = Trainer(model, adapters, SFTObjective(model), epoch_batches,
                          train_config_from_args(args, output_dir, settings), eval_batches=eval_batches,
                          log=log, dist=dist, grad_buckets=grad_buckets,
                          split_eval=not args.sharded_base)
    log(f"{trainer.total_steps} optimizer steps, {trainer.batches_per_epoch} micro-batches per epoch, "
        f"output in {output_dir}" + (f"; {dist.world_size} ranks ({dist.backend}), "
        f"{'sharded' if args.sharded_base else 'whole'} base, global batch "
        f"{args.batch_size * args.gradient_accumulation_steps * dist.world_size}" if dist.active else ""))
    # packed widths follow each batch's longest row: plan for the widest any epoch can make
    largest = largest_sft_batch([len(d) for d in data.train], batch_size=args.batch_size,
                                seq_len=args.max_seq_length, pack=not args.no_packing)
    return run_training(trainer, args, checked, model, adapters, run, log, data.stats, largest)


if __name__ == "__main__":
    import script_entry
    sys.exit(script_entry.run(main, "train_sft.py"))
