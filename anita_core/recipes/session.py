"""What every recipe does around its own data and objective: join the process
group, check the input folders, claim the output folder, build the data (a bad
file or row is one line), load the NF4 base with its adapters, and the trainer's
config and the per-epoch batches. The end of a run is in recipes/finish.py."""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, Optional

import torch

from anita_core.cli.common import compute_dtype, log_to_stderr, usage_error
from anita_core.recipes.options import LoRAOptions, OptimOptions, RunOptions


def start_distributed(collective_timeout: float):
    """The process group of a torchrun launch (SINGLE without one); a backend that
    is missing or a rendezvous that fails is a one-line error."""
    from anita_core.train.distributed import DistributedError, init_from_env
    try:
        return init_from_env(collective_timeout)
    except DistributedError as e:
        usage_error(str(e))


def rank_logger(dist):
    """Rank 0 logs everything; the other ranks only their errors, marked with the rank."""
    if not dist.active or dist.is_main:
        return log_to_stderr
    return lambda m: log_to_stderr(f"[rank {dist.rank}] {m}") if m.startswith("error") else None


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


def lora_config(lora: LoRAOptions, seed: int):
    from anita_core.lora import LoRAConfig
    return LoRAConfig(r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                      target_modules=lora.targets(), use_rslora=lora.use_rslora, seed=seed)


def load_model_and_adapters(run: RunOptions, lora: LoRAOptions, model_dir: str, log):
    """The NF4 base model of ``model_dir`` (checked by input_checks.check_inputs) with
    trainable adapters (fresh, or from --init-adapter)."""
    from anita_core.lora import LoRAAdapters, load_peft
    from anita_core.hf import load_model
    if run.merge_export and os.path.exists(run.merge_export):
        usage_error(f"--merge-export {run.merge_export}: already exists; choose a new directory "
                    "(checked before training so the run's result is not lost)")
    from anita_core.train import stop_points
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stop_points.reached("loading")
    started = time.perf_counter()
    try:
        model = load_model(model_dir, compute_dtype=compute_dtype(run.dtype), device=device,
                           progress=run.progress, dropout_seed=run.seed)
    except (ValueError, FileNotFoundError) as e:
        usage_error(f"--model {model_dir}: cannot load the base model: {e}")
    log(f"base model {model_dir}: {model.config.num_hidden_layers} layers, hidden "
        f"{model.config.hidden_size}, vocab {model.config.vocab_size}, NF4 on {device} "
        f"({time.perf_counter() - started:.1f}s)")
    if run.init_adapter:
        try:
            adapters = load_peft(run.init_adapter, model.config, device=device)
        except (ValueError, FileNotFoundError) as e:   # its values (its layout was checked)
            usage_error(f"--init-adapter {run.init_adapter}: {e}")
        log(f"adapter from {run.init_adapter} (r {adapters.config.r})")
    else:
        adapters = LoRAAdapters.init(lora_config(lora, run.seed), model.config, device=device)
    model.adapters = adapters
    log(f"trainable LoRA parameters: {adapters.num_parameters():,} "
        f"(r {adapters.config.r}, alpha {adapters.config.alpha}, scale {adapters.scale:.4g})")
    return model, adapters


def train_config(optim: OptimOptions, run: RunOptions, output_dir: str,
                 settings: Optional[Dict[str, object]] = None):
    from anita_core.train.trainer import TrainConfig
    return TrainConfig(
        output_dir=output_dir, learning_rate=optim.learning_rate, weight_decay=optim.weight_decay,
        optimizer=optim.optimizer, lr_scheduler=optim.lr_scheduler, warmup_steps=optim.warmup_steps,
        warmup_ratio=optim.warmup_ratio, gradient_accumulation_steps=optim.gradient_accumulation_steps,
        max_grad_norm=optim.max_grad_norm if optim.max_grad_norm > 0 else float("inf"),
        num_epochs=optim.num_epochs, max_steps=optim.max_steps, logging_steps=optim.logging_steps,
        eval_steps=optim.eval_steps, save_steps=optim.save_steps, save_minutes=optim.save_minutes,
        save_total_limit=optim.save_total_limit, seed=run.seed, progress=run.progress,
        run_settings=settings or {})


def per_epoch(make_batches: Callable[[int], list]):
    """epoch -> that epoch's batch list, built once (the trainer asks for the same
    epoch many times) and only the current epoch kept in memory."""
    cache = {}

    def epoch_batches(epoch: int):
        if epoch not in cache:
            cache.clear()
            cache[epoch] = make_batches(epoch)
        return cache[epoch]
    return epoch_batches


def ranks_line(trainer, output_dir: str, optim: OptimOptions, sharded_base: bool) -> str:
    """The line that starts training: steps, micro-batches, output, and the ranks."""
    dist = trainer.dist
    return (f"{trainer.total_steps} optimizer steps, {trainer.batches_per_epoch} micro-batches per "
            f"epoch, output in {output_dir}" + (
                f"; {dist.world_size} ranks ({dist.backend}), "
                f"{'sharded' if sharded_base else 'whole'} base, global batch "
                f"{optim.batch_size * optim.gradient_accumulation_steps * dist.world_size}"
                if dist.active else ""))
