"""Supervised fine-tuning (and Italian language adaptation): its config, its
presets (config values), its data (anita_core.data's SFT pipeline) and its
objective (the fused cross-entropy of anita_core.train.objectives.SFTObjective).

The sft / ita presets carry the LLaMAntino-3-ANITA recipe's values (its training
scripts: SFT r 16, alpha 8, all 7 projections, lr 2e-4, weight decay 0.01,
linear schedule, 100 warmup steps, 8-bit paged AdamW, 8192-token sequences;
Italian adaptation on raw text, 3 epochs, lr 2e-4). Values the recipe does not
state (batch size, accumulation, epochs of SFT, clipping, LoRA dropout) are
anita's choices (the option groups' defaults). demo is the same recipe scaled to
the bundled tiny model, so that `python train_sft.py` finishes in minutes on a
CPU; it is what the script uses when no --model is given."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict

from anita_core.assets import sample_path
from anita_core.cli.common import EXIT_BAD_INPUT, default_output_dir
from anita_core.recipes.options import DataOptions, LoRAOptions, OptimOptions, RunOptions
from anita_core.recipes.result import RunResult

SCRIPT = "train_sft.py"


@dataclass(frozen=True)
class SFTConfig:
    preset: str = "demo"
    run: RunOptions = field(default_factory=RunOptions)
    lora: LoRAOptions = field(default_factory=LoRAOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    data: DataOptions = field(default_factory=DataOptions)
    data_shape: str = "auto"                # auto | instruction | chat | text
    template: str = "llama3"                # llama3 | alpaca | chat (the tokenizer's own)
    max_seq_length: int = 8192
    train_on_all_tokens: bool = False       # default: loss on the answers only
    packing: bool = True


_SFT_OPTIM = OptimOptions(learning_rate=2e-4, weight_decay=0.01, warmup_steps=100,
                          optimizer="paged_adamw_8bit", batch_size=1, gradient_accumulation_steps=8,
                          num_epochs=1.0)
_SFT = SFTConfig(preset="sft", lora=LoRAOptions(r=16, alpha=8.0, use_rslora=False), optim=_SFT_OPTIM,
                 data=DataOptions(files=(sample_path("instruction"),)), data_shape="auto",
                 max_seq_length=8192)

SFT_PRESETS: Dict[str, SFTConfig] = {
    "demo": replace(_SFT, preset="demo", max_seq_length=128,
                    optim=replace(_SFT_OPTIM, learning_rate=5e-3, warmup_steps=3, optimizer="adamw",
                                  batch_size=4, gradient_accumulation_steps=1, num_epochs=1.0,
                                  max_steps=40, eval_steps=10),
                    data=replace(_SFT.data, eval_split=8)),
    "sft": _SFT,
    "ita": replace(_SFT, preset="ita", data_shape="text", data=DataOptions(files=(sample_path("text"),)),
                   optim=replace(_SFT_OPTIM, num_epochs=3.0)),
}
DEMO, REAL = "demo", "sft"      # the preset without --model, and with one


def run(config: SFTConfig) -> RunResult:
    """Train one SFT run; the result's exit code is the script's."""
    from anita_core.data import SFTDataConfig, build_sft_data, largest_sft_batch, sft_batches
    from anita_core.recipes.finish import run_training
    from anita_core.recipes.session import (build_data_or_report, load_model_and_adapters, per_epoch,
                                            rank_logger, ranks_line, start_distributed, train_config)
    from anita_core.train.distributed import setup_model
    from anita_core.train.input_checks import check_inputs
    from anita_core.train.objectives import SFTObjective
    from anita_core.train.run_identity import run_settings
    from anita_core.train.run_start import start_run
    from anita_core.train.trainer import Trainer
    opts, optim, sharded = config.run, config.optim, config.run.distributed.sharded_base
    dist = start_distributed(opts.distributed.collective_timeout)
    log = rank_logger(dist)
    # the model folder (config, file headers, tokenizer) and --init-adapter are checked
    # before the output folder is touched
    checked = check_inputs(opts.model, opts.tokenizer, {"--init-adapter": opts.init_adapter})
    tokenizer = checked.tokenizer
    output_dir = opts.output_dir or default_output_dir(f"sft-{config.preset}")
    run_start = start_run(output_dir, log, dist, resume=opts.resume, overwrite=opts.overwrite)
    with run_start.undone_if_refused():   # a refusal from here to training leaves no trace
        # the data is built before the model loads: a tokenizer/template mismatch or
        # a bad row is reported without waiting for the base model
        data_config = SFTDataConfig(data=list(config.data.files), shape=config.data_shape,
                                    template=config.template, system_prompt=config.data.system_prompt,
                                    max_seq_length=config.max_seq_length,
                                    train_on_all_tokens=config.train_on_all_tokens,
                                    max_samples=config.data.max_samples,
                                    eval_split=config.data.eval_split, seed=opts.seed,
                                    skip_bad_rows=config.data.skip_bad_rows, progress=opts.progress)
        data = build_data_or_report(build_sft_data, data_config, tokenizer, log, "training examples")
        if data is None:
            run_start.abandon()
            return RunResult(EXIT_BAD_INPUT, output_dir)
        model, adapters = load_model_and_adapters(opts, config.lora, checked.model_dir, log)

        def batches_for(documents, seed):
            return sft_batches(documents, batch_size=optim.batch_size, seq_len=config.max_seq_length,
                               pad_id=tokenizer.pad_id, pack=config.packing, shuffle_seed=seed)

        epoch_batches = per_epoch(lambda epoch: batches_for(data.train, opts.seed + epoch))
        eval_batches = batches_for(data.eval, None) if data.eval else None
        settings = run_settings(SCRIPT, checked.model_dir, adapters, data, seed=opts.seed,
                                batch_size=optim.batch_size,
                                gradient_accumulation_steps=optim.gradient_accumulation_steps,
                                world_size=dist.world_size, sharded_base=sharded)
        grad_buckets = setup_model(dist, model, adapters, sharded_base=sharded)
        trainer = Trainer(model, adapters, SFTObjective(model), epoch_batches,
                          train_config(optim, opts, output_dir, settings), eval_batches=eval_batches,
                          log=log, dist=dist, grad_buckets=grad_buckets, split_eval=not sharded)
    log(ranks_line(trainer, output_dir, optim, sharded))
    # packed widths follow each batch's longest row: plan for the widest any epoch can make
    largest = largest_sft_batch([len(d) for d in data.train], batch_size=optim.batch_size,
                                seq_len=config.max_seq_length, pack=config.packing)
    code = run_training(trainer, opts, checked, model, adapters, run_start, log, data.stats, largest)
    return RunResult(code, output_dir)
