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

import argparse
import sys


def build_parser(argv):
    from anita_core.assets import sample_path
    from anita_core.data.dpo_render import DPO_TEMPLATES
    from anita_core.train.cli import add_common_arguments, resolve_preset
    from anita_core.train.flag_types import (FlagParser, HelpFormatter, int_at_least, non_negative_int,
                                             positive_float)
    from anita_core.train.losses import DPO_LOSS_TYPES
    from anita_core.train.presets import DPO_PRESETS, PRESETS
    preset = resolve_preset(argv, demo="dpo-demo", real="dpo", allowed=DPO_PRESETS, prog="train_dpo.py")
    d = PRESETS[preset]
    parser = FlagParser(prog="train_dpo.py", description=__doc__, formatter_class=HelpFormatter)
    add_common_arguments(parser, preset, DPO_PRESETS)
    g = parser.add_argument_group("DPO")
    g.add_argument("--data", nargs="+", default=[sample_path("dpo")],
                   help="preference data file(s), folder(s) or hub name(s)")
    g.add_argument("--template", default="llama3", choices=DPO_TEMPLATES,
                   help="how prompts and answers are rendered (chat: the tokenizer's own "
                        "chat_template from tokenizer_config.json; llama3 needs LLaMA-3's tokens; "
                        "none: raw text, answers end with the EOS token)")
    g.add_argument("--beta", type=positive_float, default=d["beta"], help="DPO temperature")
    g.add_argument("--loss-type", default=d["loss_type"], choices=DPO_LOSS_TYPES, help="preference loss")
    g.add_argument("--max-length", type=int_at_least(2), default=d["max_length"], help="prompt + answer tokens")
    g.add_argument("--max-prompt-length", type=non_negative_int, default=d["max_prompt_length"],
                   help="prompt tokens kept when a pair is too long (TRL <= 0.11 rule); 0: TRL 1.x rule")
    g.add_argument("--exclude-sources", nargs="*", default=[],
                   help="drop rows whose `source` column is one of these (the paper drops toxic-dpo)")
    g.add_argument("--reference-adapter", default=None,
                   help="reference = base + this frozen PEFT adapter (default: base, adapters off)")
    # SUPPRESS: no attribute unless given, so the help shows the rule, not "None"
    g.add_argument("--precompute-reference", action=argparse.BooleanOptionalAction,
                   default=argparse.SUPPRESS,
                   help="compute the reference log-probs of the training and eval pairs once, "
                        "before training, and keep them in OUTPUT_DIR/reference_logps (a resume "
                        "reuses them); each step then runs only the policy (default: on when the "
                        "reference is the base with adapters off, off with --reference-adapter)")
    g.add_argument("--pack-pairs", action=argparse.BooleanOptionalAction, default=True,
                   help="lay each micro-batch's pairs as [prompt | chosen | rejected] in rows of "
                        "2 x --max-length tokens, no padding, each prompt computed once "
                        "(--no-pack-pairs: chosen and rejected rows padded to the longest, "
                        "for comparison; default: on)")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from anita_core.train.cli import (EXIT_BAD_INPUT, build_data_or_report, default_output_dir,
                                      eval_split_value, exit_on_disk_full, load_model_and_adapters,
                                      parse_command_line, per_epoch, rank_logger, run_training,
                                      start_distributed, train_config_from_args, usage_error)
    from anita_core.train.distributed import setup_model
    from anita_core.train.input_checks import check_inputs
    from anita_core.train.run_identity import data_fingerprint, model_fingerprint, run_settings
    from anita_core.train.run_start import start_run
    parser, args = parse_command_line(build_parser, argv)
    if args.template == "none" and args.system_prompt:
        parser.error("argument --system-prompt: not allowed with --template none (raw text has no "
                     "system turn)")
    if args.max_prompt_length and args.max_prompt_length >= args.max_length:
        parser.error(f"argument --max-prompt-length: must be below --max-length "
                     f"({args.max_length}), or 0; got {args.max_prompt_length}")
    from anita_core.data import DPODataConfig, build_dpo_data
    from anita_core.train.reference_logprobs import (BASE_REFERENCE, StaleReferenceStore,
                                                     adapters_fingerprint, indexed_dpo_batches,
                                                     prepare_reference_logps, reference_key)
    from anita_core.lora import load_peft
    from anita_core.train.objectives import DPOObjective
    from anita_core.train.trainer import Trainer
    dist = start_distributed(args)
    log = rank_logger(dist)
    # the model folder (config, file headers, tokenizer), --init-adapter and
    # --reference-adapter are checked before the output folder is touched
    checked = check_inputs(args)
    tokenizer = checked.tokenizer
    # ... and the tokenizer can render --template
    from anita_core.data.dpo_render import check_dpo_template
    try:
        check_dpo_template(tokenizer, args.template)
    except ValueError as e:
        log(f"error: argument --template: {e}")
        return EXIT_BAD_INPUT
    output_dir = args.output_dir or default_output_dir(f"dpo-{args.preset}")
    run = start_run(args, output_dir, log, dist)
    with run.undone_if_refused():        # a refusal from here to training leaves no trace
        # the pairs are built before the model loads: a bad file or row is reported without
        # waiting for the base model
        data_config = DPODataConfig(data=args.data, system_prompt=args.system_prompt,
                                    template=args.template, max_length=args.max_length,
                                    max_prompt_length=args.max_prompt_length or None,
                                    exclude_sources=tuple(args.exclude_sources),
                                    max_samples=args.max_samples,
                                    eval_split=eval_split_value(args.eval_split), seed=args.seed,
                                    skip_bad_rows=args.skip_bad_rows)
        data = build_data_or_report(build_dpo_data, data_config, tokenizer, log, "preference pairs")
        if data is None:
            run.abandon()
            return EXIT_BAD_INPUT
        model, adapters = load_model_and_adapters(args, checked.model_dir, log)
        reference = None
        if args.reference_adapter:
            try:            # its values (its layout was checked with the model folder)
                reference = load_peft(args.reference_adapter, model.config, device=model.device)
            except (ValueError, FileNotFoundError) as e:
                usage_error(f"--reference-adapter {args.reference_adapter}: {e}")
            for p in reference.parameters():
                p.requires_grad_(False)

        # batches carry their pairs' example indices: the precomputed reference is looked up by them
        pack_budget = 2 * args.max_length if args.pack_pairs else None
        epoch_batches = per_epoch(lambda epoch: indexed_dpo_batches(
            data.train, batch_size=args.batch_size, pad_id=tokenizer.pad_id,
            shuffle_seed=args.seed + epoch, pack_budget=pack_budget))

        eval_batches = (indexed_dpo_batches(data.eval, batch_size=args.batch_size,
                                            pad_id=tokenizer.pad_id, first_index=len(data.train),
                                            pack_budget=pack_budget)
                        if data.eval else None)
        objective = DPOObjective(model, beta=args.beta, loss_type=args.loss_type,
                                 reference_adapters=reference)
        settings = run_settings(args, "train_dpo.py", checked.model_dir, adapters, data, dist.world_size)
        grad_buckets = setup_model(dist, model, adapters, sharded_base=args.sharded_base)
        trainer = Trainer(model, adapters, objective, epoch_batches,
                          train_config_from_args(args, output_dir, settings), eval_batches=eval_batches,
                          log=log, dist=dist, grad_buckets=grad_buckets,
                          split_eval=not args.sharded_base)
        precompute = getattr(args, "precompute_reference", args.reference_adapter is None)
        if precompute:
            # the micro-batches this run reads: epoch 0's up to its last step (later epochs
            # hold the same pairs), and the eval batches. Every rank computes them all (the
            # sharded base gathers layers in lockstep); only rank 0 writes the store.
            reached = trainer.total_steps * args.gradient_accumulation_steps * dist.world_size
            key = reference_key(model=model_fingerprint(checked.model_dir),
                                reference=adapters_fingerprint(reference) if reference else BASE_REFERENCE,
                                data=data_fingerprint(data.train, data.eval), dtype=model.dtype,
                                batch_size=args.batch_size, seed=args.seed, pack_budget=pack_budget,
                                n_examples=len(data.train) + len(data.eval))
            try:
                with exit_on_disk_full(output_dir, log):
                    objective.reference_store = prepare_reference_logps(
                        objective, epoch_batches(0)[:reached] + (eval_batches or []), output_dir, key,
                        resume=run.resume_from is not None, save=dist.is_main,
                        log=log, progress=not args.no_progress and dist.is_main)
            except StaleReferenceStore as e:
                log(f"error: --resume: {e}")
                run.abandon()
                return EXIT_BAD_INPUT
    log(f"{trainer.total_steps} optimizer steps, {trainer.batches_per_epoch} micro-batches per epoch, "
        f"output in {output_dir}" + (f"; {dist.world_size} ranks ({dist.backend}), "
        f"{'sharded' if args.sharded_base else 'whole'} base, global batch "
        f"{args.batch_size * args.gradient_accumulation_steps * dist.world_size}" if dist.active else ""))
    return run_training(trainer, args, checked, model, adapters, run, log, data.stats)


if __name__ == "__main__":
    import script_entry
    sys.exit(script_entry.run(main, "train_dpo.py"))
