"""Non-finite values stop the run wherever they appear (loss, gradient norm,
weights after the update, eval metrics): the message names the step and the
last good checkpoint, and the NaN state is never checkpointed or written as
the final adapter."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from anita_core.train.run_checkpoint import latest_checkpoint, load_checkpoint_state
from anita_core.train.trainer import TrainingDiverged
from tests.run_cli import REPO, TINY, metric_steps, script_env
from tests.test_trainer import make_trainer


NAN_AFTER_SECOND_UPDATE = """
import math, runpy, sys, torch
real_step = torch.optim.AdamW.step
calls = []
def step_then_poison(self, *args, **kwargs):     # test double: the 2nd update yields a NaN weight
    out = real_step(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 2:
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = math.nan
    return out
torch.optim.AdamW.step = step_then_poison
sys.argv = ["train_sft.py", *sys.argv[1:]]
runpy.run_path("train_sft.py", run_name="__main__")
"""


def test_weights_made_nan_by_an_update_stop_the_run_with_exit_3(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", NAN_AFTER_SECOND_UPDATE, *TINY, "--max-steps", "4",
                           "--save-steps", "1", "--output-dir", str(out)],
                          cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    good = out / "checkpoints" / "step-00000001"
    assert f"step 2 (epoch 0, batch 1): the LoRA weights are not finite after the update; " \
           f"stopping. Last good checkpoint: {good}" in proc.stderr
    assert "No adapter was written" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "adapter").exists(), "a NaN adapter was written as the final one"
    assert latest_checkpoint(out) == good and load_checkpoint_state(good)["step"] == 1
    for name, tensor in load_file(str(good / "adapter" / "adapter_model.safetensors")).items():
        assert torch.isfinite(tensor).all(), name
    assert metric_steps(out) == [1]


class Poisoned:
    """Test double around a real objective: poisons one thing after the real work."""

    def __init__(self, objective, adapters, what):
        self.objective, self.adapters, self.what = objective, adapters, what

    def units(self, batch):
        return self.objective.units(batch)

    def micro_step(self, batch, grad_scale):
        sums = self.objective.micro_step(batch, grad_scale)
        if self.what == "grad":     # a finite loss whose gradient overflowed
            self.adapters.parameters()[0].grad.view(-1)[0] = float("inf")
        return sums

    def evaluate(self, batches):
        result = self.objective.evaluate(batches)
        if self.what == "eval":
            result["eval_loss"] = math.nan
        return result


def test_an_infinite_gradient_norm_stops_before_the_update(tmp_path):
    holder = {}

    def wrap(objective):
        holder["w"] = Poisoned(objective, objective.model.adapters, "grad")
        return holder["w"]

    trainer = make_trainer(tmp_path, max_steps=2, dropout=0.0, objective_wrapper=wrap)
    before = [p.detach().clone() for p in trainer.adapters.parameters()]
    with pytest.raises(TrainingDiverged, match=r"step 1 .*gradient norm is (inf|nan); the update "
                                               r"was not applied; stopping\. Last good checkpoint: "
                                               r"none written yet"):
        trainer.train()
    for a, b in zip(before, trainer.adapters.parameters()):
        assert torch.equal(a, b)
    assert latest_checkpoint(tmp_path) is None


def test_non_finite_eval_metrics_stop_the_run_and_that_step_is_not_checkpointed(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, save_steps=1, dropout=0.0,
                           objective_wrapper=lambda o: Poisoned(o, o.model.adapters, "eval"))
    trainer.config.eval_steps = 2
    trainer.eval_batches = trainer.epoch_batches(0)[:1]
    with pytest.raises(TrainingDiverged, match=r"step 2: eval metrics are not finite \(eval_loss=nan\)"
                                               r"; stopping\. Last good checkpoint: .*step-00000001"):
        trainer.train()
    assert latest_checkpoint(tmp_path).name == "step-00000001"
