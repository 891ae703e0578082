"""The DPO recipe's reference model: the frozen --reference-adapter, and the
reference log-probs computed once before training (OUTPUT_DIR/reference_logps)."""
from __future__ import annotations

from typing import Optional

from anita_core.cli.common import usage_error
from anita_core.recipes.options import OptimOptions, RunOptions


def load_reference_adapter(folder: Optional[str], model):
    """The frozen reference adapters of ``folder`` (None: the base, adapters off)."""
    if not folder:
        return None
    from anita_core.lora import load_peft
    try:            # its values (its layout was checked with the model folder)
        reference = load_peft(folder, model.config, device=model.device)
    except (ValueError, FileNotFoundError) as e:
        usage_error(f"--reference-adapter {folder}: {e}")
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def precompute_reference(objective, trainer, epoch_batches, eval_batches, checked, data, reference,
                         optim: OptimOptions, opts: RunOptions, run_start, output_dir: str, log) -> None:
    """The micro-batches this run reads: epoch 0's up to its last step (later epochs
    hold the same pairs), and the eval batches. Every rank computes them all (the
    sharded base gathers layers in lockstep); only rank 0 writes the store.
    StaleReferenceStore when --resume finds a store made for other inputs."""
    from anita_core.train.reference_logprobs import (BASE_REFERENCE, adapters_fingerprint,
                                                     prepare_reference_logps, reference_key)
    from anita_core.train.run_checkpoint import exit_on_disk_full
    from anita_core.train.run_identity import data_fingerprint, model_fingerprint
    dist = trainer.dist
    reached = trainer.total_steps * optim.gradient_accumulation_steps * dist.world_size
    key = reference_key(model=model_fingerprint(checked.model_dir),
                        reference=adapters_fingerprint(reference) if reference else BASE_REFERENCE,
                        data=data_fingerprint(data.train, data.eval), dtype=objective.model.dtype,
                        batch_size=optim.batch_size, seed=opts.seed,
                        n_examples=len(data.train) + len(data.eval))
    with exit_on_disk_full(output_dir, log):
        objective.reference_store = prepare_reference_logps(
            objective, epoch_batches(0)[:reached] + (eval_batches or []), output_dir, key,
            resume=run_start.resume_from is not None, save=dist.is_main,
            log=log, progress=opts.progress and dist.is_main)
