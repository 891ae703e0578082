"""How every recipe's run ends: the memory plan (a refusal leaves the output folder
as the run found it), training under the stop-signal handler, the adapter and the
merged export, the run's summary lines and its curves, and the exit code."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from anita_core.cli.common import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_RANK_FAILED
from anita_core.recipes.options import RunOptions
from anita_core.train.run_checkpoint import exit_on_disk_full
from anita_core.train.storage_faults import disk_full_guard


def run_training(trainer, options: RunOptions, checked, model, adapters, run, log,
                 data_stats=None, largest_batch=None) -> int:
    """``options``: the recipe config's run options; ``run``: the claimed output folder
    (train.run_start.RunStart). Plan the memory (for ``largest_batch`` (rows, seq) if
    given), train, save the final adapter (and the merged export), print a summary. Returns the process exit code;
    the run folder's lock is released. A refusal here (the memory plan) leaves the folder
    as the run found it; past it, --overwrite's earlier run is removed (RunStart.begin)."""
    from anita_core.memory.budget import apply_memory_plan, reset_peak_memory
    from anita_core.memory.planner import MemoryBudgetError
    from anita_core.train.curves import draw_run_curves
    from anita_core.train.distributed import shutdown
    from anita_core.train.report import report_backends
    try:
        try:
            apply_memory_plan(options.memory, model, trainer.epoch_batches(0), log, largest_batch)
        except MemoryBudgetError as e:
            log(f"error: {e.flag}: {e}")
            run.abandon()
            return EXIT_BAD_INPUT
        run.begin()
        if trainer.dist.is_main:        # the other ranks report nothing
            report = options.report
            trainer.reporter.backends = report_backends(report.report_to, run.output_dir, trainer.config,
                                                        wandb_project=report.wandb_project,
                                                        run_name=report.run_name)
        reset_peak_memory(model.device)     # the plan predicts from here: loading is done
        with exit_on_disk_full(run.output_dir, log):
            code = _train_and_report(trainer, options, checked, model, adapters, run, log, data_stats)
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


def _train_and_report(trainer, options, checked, model, adapters, run, log, data_stats) -> int:
    from anita_core.lora import save_peft
    from anita_core.train.distributed import DistributedError
    from anita_core.train.file_manifest import write_manifest
    from anita_core.train.report import ReportError
    from anita_core.train.stop_signals import Interrupted, stop_on_signals
    from anita_core.train.trainer import TrainingDiverged
    from anita_core.train.trainer_state import ResumeRefused
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
        save_peft(adapters, adapter_dir, base_model_name_or_path=options.model, finish=write_manifest)
    log(f"adapter (PEFT format): {adapter_dir}")
    if options.merge_export:
        from anita_core.hf.export import export_merged, merged_export_bytes
        deltas = {key: adapters.delta(*key) for key in adapters.adapted()}
        with disk_full_guard("the merged export", options.merge_export, merged_export_bytes(model.config)):
            export_merged(model.config, model.base, deltas, options.merge_export,
                          tokenizer_dir=checked.tokenizer_dir)
        log(f"merged HF checkpoint: {options.merge_export}")
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
