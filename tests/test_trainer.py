"""The training loop: exact resume, Ctrl-C, NaN, and a process killed while it
writes a checkpoint. Runs the real model (the bundled tiny base) on the bundled
sample data with short sequences, so each optimizer step is a real QLoRA step."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from anita_core.assets import sample_path
from anita_core.train.run_checkpoint import latest_checkpoint, load_checkpoint_state
from anita_core.cli.common import BUNDLED_MODEL
from anita_core.data import SFTDataConfig, build_sft_data, load_tokenizer, sft_batches
from anita_core.lora import LoRAAdapters, LoRAConfig, load_peft
from anita_core.hf import load_model
from anita_core.train.objectives import SFTObjective
from anita_core.train.trainer import TrainConfig, Trainer, TrainingDiverged

REPO = Path(__file__).resolve().parents[1]


def make_trainer(output_dir, *, max_steps=4, save_steps=1, dropout=0.1, objective_wrapper=None):
    tokenizer = load_tokenizer(BUNDLED_MODEL)
    data = build_sft_data(SFTDataConfig(sample_path("instruction"), max_seq_length=48,
                                        max_samples=24, seed=0), tokenizer)
    model = load_model(BUNDLED_MODEL, progress=False, dropout_seed=7)
    model.adapters = LoRAAdapters.init(LoRAConfig(r=4, alpha=8, dropout=dropout, seed=3), model.config)
    cache = {}

    def epoch_batches(epoch):
        if epoch not in cache:
            cache[epoch] = sft_batches(data.train, batch_size=2, seq_len=48,
                                       pad_id=tokenizer.pad_id, shuffle_seed=100 + epoch)
        return cache[epoch]

    objective = SFTObjective(model)
    if objective_wrapper is not None:
        objective = objective_wrapper(objective)
    config = TrainConfig(output_dir=str(output_dir), learning_rate=5e-3, warmup_steps=1,
                         gradient_accumulation_steps=2, max_steps=max_steps, save_steps=save_steps,
                         save_total_limit=10, progress=False)
    return Trainer(model, model.adapters, objective, epoch_batches, config, log=lambda m: None)


def logged_losses(output_dir):
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


class InterruptAt:
    """Test double: an objective that raises KeyboardInterrupt (as Ctrl-C would)
    on a chosen micro-batch, after part of that optimizer step has run."""

    def __init__(self, objective, micro_batch_index):
        self.objective, self.target, self.calls = objective, micro_batch_index, 0

    def units(self, batch):
        return self.objective.units(batch)

    def micro_step(self, batch, grad_scale):
        self.calls += 1
        if self.calls == self.target:
            raise KeyboardInterrupt
        return self.objective.micro_step(batch, grad_scale)

    def evaluate(self, batches):
        return self.objective.evaluate(batches)


def test_ctrl_c_checkpoints_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    """With LoRA dropout on (so RNG state matters), an interrupted-then-resumed
    run logs exactly the losses of an uninterrupted one (bit for bit on CPU)."""
    full = make_trainer(tmp_path / "full")
    full.train()
    expected = logged_losses(tmp_path / "full")
    assert len(expected) == 4

    # Ctrl-C in the middle of step 3 (its second micro-batch, after the first ran)
    interrupted = make_trainer(tmp_path / "cut", objective_wrapper=lambda o: InterruptAt(o, 6))
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    checkpoint = latest_checkpoint(tmp_path / "cut")
    assert checkpoint is not None and checkpoint.name == "step-00000002"

    torch.manual_seed(12345)        # a fresh process would not share our RNG state
    resumed = make_trainer(tmp_path / "cut")
    resumed.train(resume_from=checkpoint)
    got = logged_losses(tmp_path / "cut")
    assert got == expected, f"resumed losses {got} != uninterrupted {expected}"
    for a, b in zip(full.adapters.parameters(), resumed.adapters.parameters()):
        assert torch.equal(a, b)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, dropout=0.0)
    trainer.train()
    good = latest_checkpoint(tmp_path)
    assert good.name == "step-00000002"
    with torch.no_grad():
        trainer.adapters.parameters()[1].fill_(float("nan"))   # B of layer 0 q_proj
    before = [p.detach().clone() for p in trainer.adapters.parameters()]
    trainer.total_steps = 4
    # the loss is read back once, at the step's end, before the update
    with pytest.raises(TrainingDiverged, match=r"step 3 \(epoch \d+, batch \d+\): loss is nan; the "
                                               r"update was not applied; stopping\. Last good "
                                               r"checkpoint: .*step-00000002"):
        trainer.train()
    for a, b in zip(before, trainer.adapters.parameters()):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), "an update was applied"
    assert latest_checkpoint(tmp_path) == good
    restored = load_peft(good / "adapter", trainer.model.config)
    assert all(torch.isfinite(p).all() for p in restored.parameters())


KILLED_WHILE_SAVING = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    import torch
    from test_trainer import make_trainer
    import anita_core.train.run_checkpoint as ck
    real_write = ck.write_state
    def dying_write(folder, state):
        if state["step"] == 3:
            with open(folder / ck.STATE_TENSORS, "wb") as f:
                f.write(b"partial bytes of a trainer state")
            os._exit(137)           # the process dies mid-write, like SIGKILL
        return real_write(folder, state)
    ck.write_state = dying_write    # test double inside a throwaway subprocess
    make_trainer({out!r}, max_steps=4, dropout=0.0).train()
""")


def test_process_killed_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    script = KILLED_WHILE_SAVING.format(repo=str(REPO), tests=str(REPO / "tests"), out=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 137, proc.stderr[-2000:]
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.name == "step-00000002"
    state = load_checkpoint_state(checkpoint)
    assert state["step"] == 2
    model = load_model(BUNDLED_MODEL, progress=False)
    load_peft(checkpoint / "adapter", model.config)
    resumed = make_trainer(tmp_path, max_steps=4, dropout=0.0)
    resumed.train(resume_from=checkpoint)
    assert sorted(logged_losses(tmp_path)) == [1, 2, 3, 4]
