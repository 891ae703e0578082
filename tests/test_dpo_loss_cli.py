"""train_dpo.py with the reference-free losses (torch backend): ORPO as stage 2 straight
from the base model (no --init-adapter) and SimPO with its hyperparameters each run 2
steps, exit 0, write an adapter and no reference store; and the loss flags' errors: a
hyperparameter given for a loss that does not take it, a reference given to a
reference-free loss, a value out of range, each one argparse line naming the flags."""
from __future__ import annotations

import json
import math

import pytest

from anita_core.recipes.dpo import DPOConfig
from anita_core.train.preference_losses import PREFERENCE_LOSSES, loss_options
from anita_core.train.reference_logprobs import STORE_DIR
from tests.run_cli import run_script

RUN = ("--no-progress", "--eval-split", "2", "--batch-size", "2", "--max-samples", "10",
       "--max-length", "48", "--max-prompt-length", "0", "--gradient-accumulation-steps", "1",
       "--max-steps", "2")


@pytest.mark.parametrize("loss,extra", [
    ("orpo", ("--beta", "0.2")),                                          # packed pairs
    ("simpo", ("--beta", "2.0", "--simpo-gamma", "0.3", "--cpo-alpha", "0.1", "--no-pack-pairs")),
])
def test_reference_free_loss_trains_from_the_base(tmp_path, monkeypatch, loss, extra):
    monkeypatch.setenv("ANITA_BACKEND", "torch")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    proc = run_script("train_dpo.py", *RUN, "--loss-type", loss, *extra, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--init-adapter" not in proc.stderr
    assert f"reference: none ({loss} is reference-free)" in proc.stderr
    assert "reference log-probs" not in proc.stderr
    assert not (out / STORE_DIR).exists()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "eval_loss" not in r]
    assert len(steps) == 2
    for r in steps:       # the loss's own metrics are logged, and finite
        for metric in ("loss",) + PREFERENCE_LOSSES[loss].metrics:
            assert math.isfinite(r[metric]), (metric, r)


def _flag_error(capsys, *argv):
    """The one error line of train_dpo.py's command line checks (exit code 2)."""
    import train_dpo
    with pytest.raises(SystemExit) as exit_info:
        train_dpo.main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-2]     # the last is the --help hint


@pytest.mark.parametrize("argv,message", [
    (("--loss-type", "sigmoid", "--simpo-gamma", "1"),
     "argument --simpo-gamma: not used by --loss-type sigmoid (used by simpo)"),
    (("--cpo-alpha", "0.5"), "argument --cpo-alpha: not used by --loss-type sigmoid (used by simpo)"),
    (("--loss-type", "ipo", "--label-smoothing", "0.1"),
     "argument --label-smoothing: not used by --loss-type ipo (used by robust, simpo)"),
    (("--loss-type", "orpo", "--sft-weight", "0.5"),
     "argument --sft-weight: not used by --loss-type orpo (used by sigmoid_sft)"),
    (("--loss-type", "orpo", "--reference-adapter", "some/folder"),
     "argument --reference-adapter: not allowed with --loss-type orpo (it is reference-free: "
     "no reference model)"),
    (("--loss-type", "simpo", "--precompute-reference"),
     "argument --precompute-reference: not allowed with --loss-type simpo (it is reference-free: "
     "no reference model)"),
    (("--loss-type", "robust", "--label-smoothing", "0.5"),
     "argument --label-smoothing: label_smoothing must lie in [0, 0.5), got 0.5"),
    (("--loss-type", "simpo", "--simpo-gamma", "-1"), "argument --simpo-gamma: must be >= 0, got -1.0"),
    (("--loss-type", "kto",), "argument --loss-type: invalid choice: 'kto'"),
])
def test_loss_flag_errors(capsys, argv, message):
    assert message in _flag_error(capsys, *argv)


def test_loss_flags_reach_the_config():
    """Each hyperparameter of the table is a DPOConfig field and a flag; given ones reach
    the objective's options, the others keep the loss's defaults."""
    import train_dpo
    from anita_core.recipes.cli_dpo import config_from_args
    fields = set(DPOConfig.__dataclass_fields__)
    assert set(loss_options()) <= fields
    argv = ["--loss-type", "simpo", "--beta", "2.5", "--simpo-gamma", "0.7"]
    config = config_from_args(train_dpo.build_parser(argv).parse_args(argv))
    assert config.loss_options() == {"beta": 2.5, "simpo_gamma": 0.7}
    assert config.loss_option_problem() is None and not config.precomputes_reference()
    argv = ["--loss-type", "sigmoid_sft", "--sigmoid-weight", "0.7", "--sft-weight", "0.3"]
    config = config_from_args(train_dpo.build_parser(argv).parse_args(argv))
    assert config.loss_options() == {"beta": 0.1, "sigmoid_weight": 0.7, "sft_weight": 0.3}
    assert config.precomputes_reference()
