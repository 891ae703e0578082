"""What train_sft.py and train_dpo.py share: flags, presets, model and adapter
setup, the run summary. The scripts themselves only pick the data and the objective."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, NoReturn, Optional, Sequence

import torch

from anita_core.assets import ASSETS_DIR
from anita_core.train.flag_types import (FlagParser, check_token_rows, comma_subset,
                                         count_or_fraction, int_between, learning_rate,
                                         non_negative_float, non_negative_int, one_line,
                                         positive_float, positive_int, printable, probability_0_1,
                                         seed_int, steps_or_off, utf8_text)
from anita_core.train.presets import DPO_PRESETS, PRESETS, SFT_PRESETS
from anita_core.train.memory_budget import add_memory_arguments, check_memory_environment
from anita_core.train.report import add_report_arguments, check_installed
from anita_core.train.run_checkpoint import exit_on_disk_full
from anita_core.train.storage_faults import EXIT_DISK_FULL, disk_full_guard
from anita_core.model.weights import PROJECTIONS

EXIT_BAD_INPUT = 2          # bad flag, file, row or output folder (argparse's code too)
EXIT_DIVERGED = 3           # a non-finite loss, gradient, weight or eval metric
EXIT_RANK_FAILED = 4        # another rank died, or a collective timed out
# EXIT_DISK_FULL = 5       a write met a full disk or quota; --resume once there is space
#                           (defined in storage_faults, imported above)

BUNDLED_MODEL = os.path.join(ASSETS_DIR, "tiny-llama3")
RUNS_DIR_ENV = "ANITA_RUNS_DIR"     # where default output folders go (default: ./runs)
MAX_THREADS = 1024          # --threads: torch starts that many threads at its next parallel op


def resolve_preset(argv: List[str], demo: str, real: str, allowed: Sequence[str],
                   prog: Optional[str] = None) -> str:
    """--preset if given (one of ``allowed``, this script's presets); otherwise the
    demo preset when no --model is given."""
    pre = FlagParser(prog=prog, add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--model")
    known, _ = pre.parse_known_args(argv)
    if known.preset is not None:
        if known.preset not in allowed:
            other = {**{p: "train_sft.py" for p in SFT_PRESETS},
                     **{p: "train_dpo.py" for p in DPO_PRESETS}}.get(known.preset)
            hint = f" ({known.preset!r} is a preset of {other})" if other else ""
            pre.error(f"argument --preset: invalid choice: {known.preset!r}{hint}; "
                      f"choose from {', '.join(allowed)}")
        return known.preset
    return demo if known.model is None else real


def add_common_arguments(parser: argparse.ArgumentParser, preset: str, presets: tuple) -> None:
    d = PRESETS[preset]
    g = parser.add_argument_group("run")
    g.add_argument("--preset", default=preset, choices=presets,
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
    g.add_argument("--seed", type=seed_int, default=d["seed"], help="seed for data order, LoRA init, dropout")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_threads_argument(g)
    add_memory_arguments(g)

    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=positive_int, default=d["lora_r"], help="rank")
    g.add_argument("--lora-alpha", type=positive_float, default=d["lora_alpha"], help="alpha (scale = alpha / r)")
    g.add_argument("--lora-dropout", type=probability_0_1, default=d["lora_dropout"], help="dropout on the LoRA input")
    g.add_argument("--rslora", action=argparse.BooleanOptionalAction, default=d["use_rslora"],
                   help="rank-stabilized scale alpha / sqrt(r)")
    g.add_argument("--target-modules", default=d["target_modules"], type=comma_subset(PROJECTIONS),
                   help=f"comma-separated subset of {','.join(PROJECTIONS)}")

    g = parser.add_argument_group("optimization")
    g.add_argument("--learning-rate", type=learning_rate, default=d["learning_rate"], help="peak learning rate")
    g.add_argument("--weight-decay", type=non_negative_float, default=d["weight_decay"], help="AdamW weight decay")
    g.add_argument("--optimizer", default=d["optimizer"], choices=("adamw", "paged_adamw_8bit"),
                   help="paged_adamw_8bit needs CUDA + bitsandbytes, else falls back to adamw")
    g.add_argument("--lr-scheduler", default=d["lr_scheduler"], choices=("linear", "cosine", "constant"),
                   help="decay after warmup")
    g.add_argument("--warmup-steps", type=non_negative_int, default=d["warmup_steps"], help="warmup steps (wins over ratio)")
    g.add_argument("--warmup-ratio", type=probability_0_1, default=d["warmup_ratio"], help="warmup as a fraction of steps")
    g.add_argument("--batch-size", type=positive_int, default=d["batch_size"], help="rows (SFT) or pairs (DPO) per micro-batch")
    g.add_argument("--gradient-accumulation-steps", type=positive_int, default=d["gradient_accumulation_steps"],
                   help="micro-batches per optimizer step")
    g.add_argument("--max-grad-norm", type=non_negative_float, default=d["max_grad_norm"], help="gradient clipping (0: off)")
    g.add_argument("--num-epochs", type=positive_float, default=d["num_epochs"], help="passes over the training data")
    g.add_argument("--max-steps", type=steps_or_off, default=d.get("max_steps", -1), help="optimizer steps (wins over epochs; -1: off)")
    g.add_argument("--logging-steps", type=positive_int, default=d["logging_steps"], help="metrics.jsonl every N steps")
    g.add_argument("--eval-steps", type=non_negative_int, default=d.get("eval_steps", 0), help="evaluate every N steps (0: at the end)")
    g.add_argument("--save-steps", type=non_negative_int, default=d.get("save_steps", 0),
                   help="checkpoint every N steps (0: off)")
    g.add_argument("--save-minutes", type=non_negative_float, default=d["save_minutes"],
                   help="also checkpoint every M minutes of wall time (0: off; with --save-steps 0 "
                        "only the final checkpoint and the one a stop writes are kept)")
    g.add_argument("--save-total-limit", type=non_negative_int, default=2,
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
    g.add_argument("--collective-timeout", type=positive_float, default=600.0,
                   help="seconds a rank waits for the others in a collective before the job stops")

    g = parser.add_argument_group("data")
    g.add_argument("--max-samples", type=positive_int, default=None,
                   help="draw this many rows uniformly at random (with --seed) from all of --data, "
                        "streamed: a folder of shards or a hub dataset larger than memory is fine")
    g.add_argument("--eval-split", type=count_or_fraction, default=d.get("eval_split", 0),
                   help="held-out rows: a count (>= 1) or a fraction (< 1)")
    g.add_argument("--skip-bad-rows", action="store_true",
                   help="skip, count and show malformed rows (bad JSON, bad encoding, missing or "
                        "wrong fields) instead of stopping at the first")
    g.add_argument("--system-prompt", default=None, type=utf8_text, help="default system prompt for rows without one")


def add_tokenizer_argument(group) -> None:
    """--tokenizer: the trainers and chat.py; without it the model folder's own."""
    group.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="the model's tokenizer: a folder holding its tokenizer.json (and "
                            "tokenizer_config.json), or the file itself; default: the --model "
                            "folder's, which is then required")


def add_threads_argument(group) -> None:
    """--threads N: torch.set_num_threads, for the trainers, chat.py and eval.py."""
    group.add_argument("--threads", type=int_between(1, MAX_THREADS), default=None, metavar="N",
                       help="CPU threads torch computes with (torch.set_num_threads; default: "
                            "torch's, one per core). On a CPU shared with other jobs, 1 avoids "
                            "threads waiting for each other's descheduled peers")


def apply_threads(args) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def check_model_flag(parser, model: str) -> None:
    """--model is a local folder or a hub name ("owner/name"); anything else stops here
    with argparse's one-line error (exit 2), before the output folder is touched."""
    if os.path.isdir(model):
        return
    if os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") != 1:
        parser.error(f"argument --model: {model}: no such model directory (and not a hub "
                     "name owner/name)")


def parse_command_line(build_parser, argv: List[str]):
    """(parser, args): flags parsed and checked, each alone (their argparse types)
    and together; a bad one exits with an argparse error (code 2)."""
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    check_model_flag(parser, args.model)
    apply_threads(args)
    if args.resume and args.overwrite:
        parser.error("argument --overwrite: not allowed with --resume (one continues the run "
                     "in --output-dir, the other replaces it)")
    if args.sharded_base and args.merge_export:
        parser.error("argument --merge-export: not allowed with --sharded-base (no rank holds the "
                     "whole base); merge the saved adapter in a later single-process run")
    check_token_rows(parser, args)
    if args.global_batch_size is not None:
        from anita_core.train.distributed import check_global_batch
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        try:
            args.gradient_accumulation_steps = check_global_batch(args.global_batch_size,
                                                                  args.batch_size, world)
        except ValueError as e:
            parser.error(f"argument --global-batch-size: {e}")
    check_memory_environment(parser)
    try:
        check_installed(args.report_to)     # before the output folder and the model
    except ValueError as e:
        usage_error(str(e))
    return parser, args


def start_distributed(args):
    """The process group of a torchrun launch (SINGLE without one); a backend that
    is missing or a rendezvous that fails is a one-line error."""
    from anita_core.train.distributed import DistributedError, init_from_env
    try:
        return init_from_env(args.collective_timeout)
    except DistributedError as e:
        usage_error(str(e))


def rank_logger(dist):
    """Rank 0 logs everything; the other ranks only their errors, marked with the rank."""
    if not dist.active or dist.is_main:
        return log_to_stderr
    return lambda m: log_to_stderr(f"[rank {dist.rank}] {m}") if m.startswith("error") else None


def usage_error(message: str) -> NoReturn:
    log_to_stderr(f"error: {one_line(message)}")
    raise SystemExit(EXIT_BAD_INPUT)


def default_output_dir(name: str) -> str:
    """runs/<name>, or $ANITA_RUNS_DIR/<name> (the tests point it at a folder of their own,
    so a suite never writes into, nor reads, a user's runs/)."""
    return os.path.join(os.environ.get(RUNS_DIR_ENV) or "runs", name)


def eval_split_value(x: float):
    return int(x) if x >= 1 else x


def compute_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name == "bf16":
        import csrc_triton
        if csrc_triton.INTERPRETING:
            log_to_stderr("warning: --dtype bf16 under the Triton interpreter: its fp32 -> bf16 "
                          "stores truncate instead of rounding, so results differ from a GPU's; "
                          "use fp32 (or fp16) on a CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def lora_config_from_args(args):
    from anita_core.lora import LoRAConfig
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    return LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      target_modules=targets, use_rslora=args.rslora, seed=args.seed)


def load_model_and_adapters(args, model_dir: str, log):
    """The NF4 base model of ``model_dir`` (checked by input_checks.check_inputs) with
    trainable adapters (fresh, or from --init-adapter)."""
    from anita_core.lora import LoRAAdapters, load_peft
    from anita_core.hf import load_model
    if args.merge_export and os.path.exists(args.merge_export):
        usage_error(f"--merge-export {args.merge_export}: already exists; choose a new directory "
                    "(checked before training so the run's result is not lost)")
    from anita_core.train import stop_points
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stop_points.reached("loading")
    started = time.perf_counter()
    try:
        model = load_model(model_dir, compute_dtype=compute_dtype(args.dtype), device=device,
                                           progress=not args.no_progress,
                                           dropout_seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        usage_error(f"--model {model_dir}: cannot load the base model: {e}")
    log(f"base model {model_dir}: {model.config.num_hidden_layers} layers, hidden "
        f"{model.config.hidden_size}, vocab {model.config.vocab_size}, NF4 on {device} "
        f"({time.perf_counter() - started:.1f}s)")
    if args.init_adapter:
        try:
            adapters = load_peft(args.init_adapter, model.config, device=device)
        except (ValueError, FileNotFoundError) as e:   # its values (its layout was checked)
            usage_error(f"--init-adapter {args.init_adapter}: {e}")
        log(f"adapter from {args.init_adapter} (r {adapters.config.r})")
    else:
        adapters = LoRAAdapters.init(lora_config_from_args(args), model.config, device=device)
    model.adapters = adapters
    log(f"trainable LoRA parameters: {adapters.num_parameters():,} "
        f"(r {adapters.config.r}, alpha {adapters.config.alpha}, scale {adapters.scale:.4g})")
    return model, adapters


def train_config_from_args(args, output_dir: str, settings: Optional[dict] = None):
    from anita_core.train.trainer import TrainConfig
    return TrainConfig(
        output_dir=output_dir, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        optimizer=args.optimizer, lr_scheduler=args.lr_scheduler, warmup_steps=args.warmup_steps,
        warmup_ratio=args.warmup_ratio, gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else float("inf"),
        num_epochs=args.num_epochs, max_steps=args.max_steps, logging_steps=args.logging_steps,
        eval_steps=args.eval_steps, save_steps=args.save_steps, save_minutes=args.save_minutes,
        save_total_limit=args.save_total_limit, seed=args.seed, progress=not args.no_progress,
        run_settings=settings or {})


def run_training(trainer, args, checked, model, adapters, run, log,
                 data_stats=None, largest_batch=None) -> int:
    """Plan the memory (for ``largest_batch`` (rows, seq) if given), train, save the final
    adapter (and the merged export), print a summary. Returns the process exit code;
    the run folder's lock is released. A refusal here (the memory plan) leaves the folder
    as the run found it; past it, --overwrite's earlier run is removed (RunStart.begin)."""
    from anita_core.memory.budget import apply_memory_plan, reset_peak_memory
    from anita_core.memory.planner import MemoryBudgetError
    from anita_core.train.curves import draw_run_curves
    from anita_core.train.distributed import shutdown
    from anita_core.train.memory_budget import memory_request
    from anita_core.train.report import report_backends
    try:
        try:
            apply_memory_plan(memory_request(args), model, trainer.epoch_batches(0), log,
                              largest_batch)
        except MemoryBudgetError as e:
            log(f"error: {e.flag}: {e}")
            run.abandon()
            return EXIT_BAD_INPUT
        run.begin()
        if trainer.dist.is_main:        # the other ranks report nothing
            trainer.reporter.backends = report_backends(args, run.output_dir, trainer.config)
        reset_peak_memory(model.device)     # the plan predicts from here: loading is done
        with exit_on_disk_full(run.output_dir, log):
            code = _train_and_report(trainer, args, checked, model, adapters, run, log, data_stats)
        if trainer.dist.is_main and code != EXIT_BAD_INPUT:     # it trained, however it ended
            draw_run_curves(run.output_dir, log)
        if model.device.type == "cuda":
            log(f"measured peak device memory: {torch.cuda.max_memory_allocated(model.device) / 2**30:.2f} "
                f"GiB (torch.cuda.max_memory_allocated since the first step)")
        else:
            log("measured peak device memory: not measured on CPU")
        return code
    finally:
        if run.lock is not None:
            run.lock.release()
        shutdown(trainer.dist)


def _train_and_report(trainer, args, checked, model, adapters, run, log, data_stats) -> int:
    from anita_core.lora import save_peft
    from anita_core.train.distributed import DistributedError
    from anita_core.train.file_manifest import write_manifest
    from anita_core.train.report import ReportError
    from anita_core.train.trainer import Interrupted, ResumeRefused, TrainingDiverged, stop_on_signals
    output_dir = run.output_dir
    started = time.perf_counter()
    try:
        with stop_on_signals(log):
            trainer.train(resume_from=run.resume_from)
    except TrainingDiverged as e:
        log(f"error: {e}. No adapter was written for this run.")
        return EXIT_DIVERGED
    except ResumeRefused as e:
        log(f"error: --resume: {e}")
        return EXIT_BAD_INPUT
    except ReportError as e:
        log(f"error: --report-to {e}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as e:
        return 128 + (e.signum if isinstance(e, Interrupted) else 2)
    except DistributedError as e:
        log(f"error: {e}. The job stops; its last checkpoint is intact (resume with --resume).")
        return EXIT_RANK_FAILED
    wall = time.perf_counter() - started
    if not trainer.dist.is_main:
        return 0
    adapter_dir = Path(output_dir) / "adapter"
    with disk_full_guard("the adapter", adapter_dir, 4 * adapters.num_parameters()):
        save_peft(adapters, adapter_dir, base_model_name_or_path=args.model, finish=write_manifest)
    log(f"adapter (PEFT format): {adapter_dir}")
    if args.merge_export:
        from anita_core.hf.export import export_merged, merged_export_bytes
        deltas = {key: adapters.delta(*key) for key in adapters.adapted()}
        with disk_full_guard("the merged export", args.merge_export, merged_export_bytes(model.config)):
            export_merged(model.config, model.base, deltas, args.merge_export,
                          tokenizer_dir=checked.tokenizer_dir)
        log(f"merged HF checkpoint: {args.merge_export}")
    from anita_core.train.run_folder import read_metrics
    records = read_metrics(output_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if losses:
        k = min(5, len(losses))
        log(f"train loss: first {losses[0]:.4f}, last {losses[-1]:.4f}; mean of the first {k} steps "
            f"{sum(losses[:k]) / k:.4f}, of the last {k} {sum(losses[-k:]) / k:.4f} "
            f"({len(losses)} steps, {wall:.1f}s)")
    if evals:
        log("eval loss by step: " + ", ".join(f"{s}: {v:.4f}" for s, v in evals))
    if trainer.tokens_computed:
        padding = trainer.tokens_computed - trainer.tokens_trained
        log(f"tokens computed: {trainer.tokens_computed:,}, of which padding {padding:,} "
            f"({100 * padding / trainer.tokens_computed:.1f}%)")
    if data_stats is not None and data_stats.skipped_bad_rows:
        log(data_stats.skipped_rows_report())
    return 0


def build_data_or_report(build, config, tokenizer, log, what: str):
    """Run a data builder; on a bad file or row, log it (the message names the
    file and row) and return None. Also None when nothing is left to train on."""
    from anita_core.data import BadRowError
    try:
        data = build(config, tokenizer)
    except (BadRowError, ValueError, FileNotFoundError) as e:
        log(f"error: {e}")
        return None
    log(data.stats.summary())
    if data.stats.skipped_bad_rows:
        log(data.stats.skipped_rows_report())
    if data.stats.identical_pairs:
        log(f"warning: {data.stats.identical_pairs} preference pair(s) whose chosen and rejected "
            f"answers are the same after templating were skipped (they carry no preference signal): "
            + ", ".join(data.stats.identical_pair_rows)
            + (", ..." if data.stats.identical_pairs > len(data.stats.identical_pair_rows) else ""))
    if not data.train:
        log(f"error: no {what} left after filtering")
        return None
    return data


def per_epoch(make_batches):
    """epoch -> that epoch's batch list, built once (the trainer asks for the same
    epoch many times) and only the current epoch kept in memory."""
    cache = {}

    def epoch_batches(epoch: int):
        if epoch not in cache:
            cache.clear()
            cache[epoch] = make_batches(epoch)
        return cache[epoch]
    return epoch_batches


def log_to_stderr(message: str) -> None:
    print(printable(message), file=sys.stderr, flush=True)
