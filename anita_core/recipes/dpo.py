"""Direct preference optimization: its config, its presets (config values), its
data (anita_core.data's preference pairs) and its objective (DPOObjective with a
loss taken from the table name -> PreferenceLoss, anita_core.train.preference_losses;
docs/preference-losses.md says which to pick).

The dpo preset carries the LLaMAntino-3-ANITA recipe's values (DPO r 64, alpha
16, rsLoRA, lr 5e-5, beta 0.1, warmup ratio 0.1, no weight decay, max length
1024, max prompt length 512); batch size, accumulation and epochs are anita's.
dpo-demo is the same recipe scaled to the bundled tiny model (`python
train_dpo.py` finishes in minutes on a CPU); it is what the script uses when no
--model is given."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

from anita_core.assets import sample_path
from anita_core.cli.common import EXIT_BAD_INPUT, default_output_dir
from anita_core.recipes.options import DataOptions, LoRAOptions, OptimOptions, RunOptions
from anita_core.recipes.result import RunResult
from anita_core.train.preference_losses import (PREFERENCE_LOSSES, loss_options, losses_using,
                                                resolve_options)

SCRIPT = "train_dpo.py"


@dataclass(frozen=True)
class DPOConfig:
    preset: str = "dpo-demo"
    run: RunOptions = field(default_factory=RunOptions)
    lora: LoRAOptions = field(default_factory=LoRAOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    data: DataOptions = field(default_factory=DataOptions)
    template: str = "llama3"                # llama3 | chat | none (data.dpo_render)
    beta: float = 0.1                       # also ORPO's lambda and SimPO's beta
    loss_type: str = "sigmoid"              # a name of PREFERENCE_LOSSES
    # the losses' other hyperparameters (TRL's names); None: the loss's default. Each is
    # refused with a loss that does not take it (loss_option_problem)
    label_smoothing: Optional[float] = None     # robust, simpo
    simpo_gamma: Optional[float] = None         # simpo
    cpo_alpha: Optional[float] = None           # simpo
    sigmoid_weight: Optional[float] = None      # sigmoid_sft (TRL's loss_weights[0])
    sft_weight: Optional[float] = None          # sigmoid_sft (TRL's loss_weights[1])
    max_length: int = 1024                  # prompt + answer tokens
    max_prompt_length: int = 512            # 0: TRL 1.x's rule (no separate prompt cut)
    exclude_sources: Tuple[str, ...] = ()
    reference_adapter: Optional[str] = None     # None: the base with adapters off
    precompute_reference: Optional[bool] = None     # None: on for the base reference only
    # [prompt | chosen | rejected] per pair in rows of 2 x max_length tokens, the prompt
    # once (data/dpo_pack.py); False: the padded layout (chosen and rejected rows)
    pack_pairs: bool = True

    def pack_budget(self) -> Optional[int]:
        """The packed rows' token budget, or None for the padded layout."""
        return 2 * self.max_length if self.pack_pairs else None

    def given_loss_options(self) -> Dict[str, float]:
        """The hyperparameters set here besides beta (None fields left out)."""
        return {k: getattr(self, k) for k in loss_options() if getattr(self, k) is not None}

    def loss_options(self) -> Dict[str, float]:
        """beta and the given hyperparameters, as DPOObjective takes them."""
        return {"beta": self.beta, **self.given_loss_options()}

    def loss_option_problem(self) -> Optional[Tuple[str, str]]:
        """(flag, why) for the first setting the loss cannot use, or None."""
        if self.loss_type not in PREFERENCE_LOSSES:
            return "--loss-type", (f"invalid choice {self.loss_type!r} (choose from "
                                   f"{', '.join(PREFERENCE_LOSSES)})")
        record = PREFERENCE_LOSSES[self.loss_type]
        for key, value in self.given_loss_options().items():
            flag = f"--{key.replace('_', '-')}"
            if key not in record.defaults:
                return flag, (f"not used by --loss-type {self.loss_type} (used by "
                              f"{', '.join(losses_using(key))})")
            try:
                resolve_options(self.loss_type, {key: value})
            except ValueError as e:     # "preference loss 'x': why" -> why
                return flag, str(e).split(": ", 1)[-1]
        if not record.needs_reference:
            for flag, given in (("--reference-adapter", self.reference_adapter),
                                ("--precompute-reference", self.precompute_reference)):
                if given:
                    return flag, (f"not allowed with --loss-type {self.loss_type} (it is "
                                  "reference-free: no reference model)")
        return None

    def reference_line(self) -> Optional[str]:
        """The run summary's line for a reference-free loss."""
        if PREFERENCE_LOSSES[self.loss_type].needs_reference:
            return None
        return f"reference: none ({self.loss_type} is reference-free)"

    def precomputes_reference(self) -> bool:
        if not PREFERENCE_LOSSES[self.loss_type].needs_reference:
            return False
        if self.precompute_reference is None:
            return self.reference_adapter is None
        return self.precompute_reference


_DPO_OPTIM = OptimOptions(learning_rate=5e-5, weight_decay=0.0, warmup_steps=0, warmup_ratio=0.1,
                          optimizer="paged_adamw_8bit", batch_size=2, gradient_accumulation_steps=4,
                          num_epochs=1.0)
_DPO = DPOConfig(preset="dpo", lora=LoRAOptions(r=64, alpha=16.0, use_rslora=True), optim=_DPO_OPTIM,
                 data=DataOptions(files=(sample_path("dpo"),)), beta=0.1, loss_type="sigmoid",
                 max_length=1024, max_prompt_length=512)

DPO_PRESETS: Dict[str, DPOConfig] = {
    "dpo-demo": replace(_DPO, preset="dpo-demo", lora=replace(_DPO.lora, r=16), max_length=160,
                        max_prompt_length=96,
                        optim=replace(_DPO_OPTIM, learning_rate=5e-3, warmup_ratio=0.1,
                                      optimizer="adamw", batch_size=4, gradient_accumulation_steps=1,
                                      max_steps=30, eval_steps=10),
                        data=replace(_DPO.data, eval_split=8)),
    "dpo": _DPO,
}
DEMO, REAL = "dpo-demo", "dpo"      # the preset without --model, and with one


def run(config: DPOConfig) -> RunResult:
    """Train one DPO run; the result's exit code is the script's."""
    from anita_core.data import DPODataConfig, build_dpo_data
    from anita_core.data.dpo_render import check_dpo_template
    from anita_core.recipes.dpo_reference import load_reference_adapter, precompute_reference
    from anita_core.recipes.finish import run_training
    from anita_core.recipes.session import (build_data_or_report, load_model_and_adapters, per_epoch,
                                            rank_logger, ranks_line, start_distributed, train_config)
    from anita_core.train.distributed import setup_model
    from anita_core.train.input_checks import check_inputs
    from anita_core.train.objectives import DPOObjective
    from anita_core.train.reference_logprobs import StaleReferenceStore, indexed_dpo_batches
    from anita_core.train.run_identity import run_settings
    from anita_core.train.run_start import start_run
    from anita_core.train.trainer import Trainer
    opts, optim, sharded = config.run, config.optim, config.run.distributed.sharded_base
    dist = start_distributed(opts.distributed.collective_timeout)
    log = rank_logger(dist)
    # the model folder (config, file headers, tokenizer), --init-adapter and
    # --reference-adapter are checked before the output folder is touched
    checked = check_inputs(opts.model, opts.tokenizer, {"--init-adapter": opts.init_adapter,
                                                        "--reference-adapter": config.reference_adapter})
    tokenizer = checked.tokenizer
    output_dir = opts.output_dir or default_output_dir(f"dpo-{config.preset}")
    # ... and the tokenizer can render --template
    try:
        check_dpo_template(tokenizer, config.template)
    except ValueError as e:
        log(f"error: argument --template: {e}")
        return RunResult(EXIT_BAD_INPUT, output_dir)
    problem = config.loss_option_problem()
    if problem is not None:         # the CLI refuses these first; a config built in code too
        log(f"error: argument {problem[0]}: {problem[1]}")
        return RunResult(EXIT_BAD_INPUT, output_dir)
    config = _layout_for(config, checked.config, log)
    run_start = start_run(output_dir, log, dist, resume=opts.resume, overwrite=opts.overwrite)
    with run_start.undone_if_refused():   # a refusal from here to training leaves no trace
        # the pairs are built before the model loads: a bad file or row is reported without
        # waiting for the base model
        data_config = DPODataConfig(data=list(config.data.files), system_prompt=config.data.system_prompt,
                                    template=config.template, max_length=config.max_length,
                                    max_prompt_length=config.max_prompt_length or None,
                                    exclude_sources=config.exclude_sources,
                                    max_samples=config.data.max_samples,
                                    eval_split=config.data.eval_split, seed=opts.seed,
                                    skip_bad_rows=config.data.skip_bad_rows)
        data = build_data_or_report(build_dpo_data, data_config, tokenizer, log, "preference pairs")
        if data is None:
            run_start.abandon()
            return RunResult(EXIT_BAD_INPUT, output_dir)
        model, adapters = load_model_and_adapters(opts, config.lora, checked.model_dir, log)
        reference = load_reference_adapter(config.reference_adapter, model)
        if config.reference_line():
            log(config.reference_line())

        # batches carry their pairs' example indices: the precomputed reference is looked up by them
        epoch_batches = per_epoch(lambda epoch: indexed_dpo_batches(
            data.train, batch_size=optim.batch_size, pad_id=tokenizer.pad_id,
            shuffle_seed=opts.seed + epoch, pack_budget=config.pack_budget()))
        eval_batches = (indexed_dpo_batches(data.eval, batch_size=optim.batch_size,
                                            pad_id=tokenizer.pad_id, first_index=len(data.train),
                                            pack_budget=config.pack_budget())
                        if data.eval else None)
        objective = DPOObjective(model, beta=config.beta, loss_type=config.loss_type,
                                 reference_adapters=reference,
                                 options=config.given_loss_options())
        settings = run_settings(SCRIPT, checked.model_dir, adapters, data, seed=opts.seed,
                                batch_size=optim.batch_size,
                                gradient_accumulation_steps=optim.gradient_accumulation_steps,
                                world_size=dist.world_size, sharded_base=sharded)
        grad_buckets = setup_model(dist, model, adapters, sharded_base=sharded)
        trainer = Trainer(model, adapters, objective, epoch_batches,
                          train_config(optim, opts, output_dir, settings), eval_batches=eval_batches,
                          log=log, dist=dist, grad_buckets=grad_buckets, split_eval=not sharded)
        if config.precomputes_reference():
            try:
                precompute_reference(objective, trainer, epoch_batches, eval_batches, checked, data,
                                     reference, optim, opts, run_start, output_dir, log,
                                     pack_budget=config.pack_budget())
            except StaleReferenceStore as e:
                log(f"error: --resume: {e}")
                run_start.abandon()
                return RunResult(EXIT_BAD_INPUT, output_dir)
    log(ranks_line(trainer, output_dir, optim, sharded))
    code = run_training(trainer, opts, checked, model, adapters, run_start, log, data.stats)
    return RunResult(code, output_dir)


def _layout_for(config: DPOConfig, model_config, log) -> DPOConfig:
    """Packed pairs need full attention across a packed row (the rejected answer's
    positions restart after the prompt, so a window counted in row slots is not the
    model's): with a sliding window shorter than the rows (2 x max_length), the pairs
    are padded instead, and the run says so."""
    budget = config.pack_budget()
    windows = [w for w in model_config.windows if w is not None]
    if budget is None or not windows or min(windows) >= budget:
        return config
    log(f"note: {model_config.model_type}'s sliding window ({min(windows)} tokens) is shorter than "
        f"the packed rows (2 x --max-length = {budget}): pairs are padded (--no-pack-pairs)")
    return replace(config, pack_pairs=False)
