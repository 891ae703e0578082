"""The trainer's checkpoints: what one holds (step, data position, optimizer, RNG,
the run's settings), when a periodic one is due, and the resume that restores
all of it, refusing (ResumeRefused, one line) a checkpoint it cannot trust."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from anita_core.train.run_checkpoint import (ADAPTER_DIR, choose_resume_checkpoint, latest_checkpoint,
                                             load_checkpoint_state, position_problem, rng_restore,
                                             rng_snapshot, save_checkpoint, settings_differences)
from anita_core.train.run_folder import read_metrics, truncate_metrics


class ResumeRefused(ValueError):
    """The checkpoint cannot be resumed from: unreadable, a legacy pickle, written by
    a run with other settings, or holding a data position that is not its step's."""


class CheckpointState:
    """Mixed into Trainer: its save and resume (the attributes used are Trainer's)."""

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_index": self.batch_index,
                "optimizer": self.optimizer.state_dict(),
                "rng": rng_snapshot(getattr(self.model, "dropout_generator", None)),
                "settings": dict(self.config.run_settings),
                "config": asdict(self.config)}

    def save(self) -> Optional[Path]:
        """Rank 0 writes the checkpoint (the others hold the same state)."""
        self._last_save_time = time.monotonic()
        if not self.dist.is_main:
            return None
        path = save_checkpoint(self.output_dir, self.step, self.adapters, self.state_dict(),
                               keep=self.config.save_total_limit)
        self._last_save_time = time.monotonic()
        return path

    def _periodic_save_due(self) -> bool:
        c = self.config
        if c.save_steps and self.step % c.save_steps == 0:
            return True
        return bool(c.save_minutes) and time.monotonic() - self._last_save_time >= 60 * c.save_minutes

    def resume(self, checkpoint: Optional[Path] = None) -> Optional[Path]:
        """Restore adapters, optimizer, RNG and data position from ``checkpoint``
        (default: the run's newest intact one, each damaged newer one named in a
        warning). Returns the checkpoint used."""
        from anita_core.lora import load_peft
        if checkpoint is None:
            if latest_checkpoint(self.output_dir) is None:
                return None
            try:
                checkpoint = choose_resume_checkpoint(self.output_dir, None, self.log)
            except (ValueError, FileNotFoundError) as e:
                raise ResumeRefused(str(e)) from None
        try:
            state = load_checkpoint_state(checkpoint)
        except (ValueError, FileNotFoundError) as e:
            raise ResumeRefused(str(e)) from None
        differences = settings_differences(state.get("settings", {}), self.config.run_settings)
        if differences:
            raise ResumeRefused(
                f"{checkpoint} was written by a run with other settings:\n" + "\n".join(differences)
                + "\nResume with the checkpoint's settings, or start a new run (--overwrite, or "
                  "another --output-dir)")
        world = self.dist.world_size
        problem = position_problem(state, len(self.epoch_batches(0)),
                                   self.config.gradient_accumulation_steps * world, world)
        if problem:       # an edited state would replay or skip data on another step's weights
            raise ResumeRefused(f"{checkpoint}: {problem}; resume from another checkpoint")
        try:
            loaded = load_peft(Path(checkpoint) / ADAPTER_DIR, self.model.config,
                               device=self.params[0].device)
        except (ValueError, FileNotFoundError) as e:
            raise ResumeRefused(f"{checkpoint}: its adapter cannot be loaded: {e}") from None
        with torch.no_grad():
            for mine, theirs in zip(self.adapters.parameters(), loaded.parameters()):
                mine.copy_(theirs)
        try:        # a state that parses but is not one this trainer wrote: one line, not torch's
            self.optimizer.load_state_dict(state["optimizer"])
            rng_restore(state["rng"], getattr(self.model, "dropout_generator", None))
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise ResumeRefused(f"{checkpoint}: its optimizer or RNG state cannot be restored "
                                f"({type(e).__name__}: {e})") from None
        self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch_index"]
        # the steps after the checkpoint are replayed: their old records must go
        if self.dist.is_main:
            truncate_metrics(self.output_dir, self.step)
        for record in read_metrics(self.output_dir):
            if record.get("step") == self.step and any(k.startswith("eval_") for k in record):
                self._last_eval = {k: v for k, v in record.items() if k.startswith("eval_")}
                self._last_eval_step = self.step
        return Path(checkpoint)

