"""Every numeric and choice flag is checked while the command line is parsed:
an argparse-style error naming the flag, exit code 2, before any model or data
loads; the other script's presets are refused with the valid ones listed."""
from __future__ import annotations

import resource
import time

import pytest

import train_dpo
import train_sft
from anita_core.recipes.cli_train import parse_command_line
from anita_core.recipes.dpo import DPO_PRESETS
from anita_core.recipes.sft import SFT_PRESETS
from tests.run_cli import run_script

BAD_COMMON = [
    ("--gradient-accumulation-steps", "-1"), ("--gradient-accumulation-steps", "0"),
    ("--max-steps", "0"), ("--max-steps", "-2"), ("--logging-steps", "0"), ("--batch-size", "0"),
    ("--lora-r", "0"), ("--lora-r", "2.5"), ("--lora-alpha", "-1"), ("--lora-dropout", "1"),
    ("--lora-dropout", "-0.1"), ("--learning-rate", "0"), ("--learning-rate", "nan"),
    ("--learning-rate", "inf"), ("--learning-rate", "1e39"), ("--weight-decay", "-0.01"), ("--warmup-steps", "-1"),
    ("--warmup-ratio", "1.5"), ("--max-grad-norm", "-1"), ("--num-epochs", "0"),
    ("--eval-steps", "-1"), ("--save-steps", "-5"), ("--save-minutes", "-1"),
    ("--save-total-limit", "-1"), ("--max-samples", "0"), ("--eval-split", "2.5"),
    ("--eval-split", "-1"), ("--seed", "-1"), ("--seed", "abc"), ("--target-modules", "q_proj,wrong"),
    ("--target-modules", ","), ("--dtype", "fp8"), ("--optimizer", "sgd"), ("--lr-scheduler", "step"),
]
BAD_SFT = [("--max-seq-length", "1"), ("--template", "chatml"), ("--data-shape", "tabular")]
BAD_DPO = [("--beta", "0"), ("--max-length", "0"), ("--max-prompt-length", "-1"),
           ("--loss-type", "nope")]


def parse_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2, argv
    return capsys.readouterr().err


@pytest.mark.parametrize("main,bad", [(train_sft.main, BAD_COMMON + BAD_SFT),
                                      (train_dpo.main, BAD_COMMON + BAD_DPO)],
                         ids=["sft", "dpo"])
def test_each_bad_flag_value_is_an_argparse_error_naming_the_flag(main, bad, capsys):
    for flag, value in bad:
        err = parse_error(main, [flag, value], capsys)
        assert f"error: argument {flag}" in err, (flag, value, err)
        assert "Traceback" not in err


def test_flags_that_contradict_each_other_are_refused(capsys):
    err = parse_error(train_sft.main, ["--resume", "--overwrite"], capsys)
    assert "error: argument --overwrite: not allowed with --resume" in err
    err = parse_error(train_dpo.main, ["--max-length", "64", "--max-prompt-length", "64"], capsys)
    assert "error: argument --max-prompt-length: must be below --max-length (64)" in err


def test_a_micro_batch_past_the_kernels_token_bound_is_refused(capsys):
    # 2^31 token rows (B x S counted in 32 bits); the bound is in the message
    err = parse_error(train_sft.main, ["--batch-size", "1024", "--max-seq-length", str(2**21)],
                      capsys)
    assert "error: argument --max-seq-length: 1024 rows x 2097152 = 2,147,483,648 tokens" in err
    assert "2,147,483,647" in err
    err = parse_error(train_dpo.main, ["--batch-size", "512", "--max-length", str(2**21)], capsys)
    assert "error: argument --max-length: 1024 rows x 2097152" in err
    _, args = parse_command_line(train_sft.build_parser, ["--batch-size", "1", "--max-seq-length",
                                                          str(2**31 - 1)])          # the bound: fits
    assert args.max_seq_length == 2**31 - 1


def test_valid_edge_values_are_accepted():
    args = train_sft.build_parser([]).parse_args(
        ["--max-steps", "-1", "--eval-split", "0.25", "--lora-dropout", "0", "--save-steps", "0",
         "--save-minutes", "0", "--max-grad-norm", "0", "--warmup-ratio", "0"])
    assert args.max_steps == -1 and args.eval_split == 0.25 and args.save_minutes == 0.0
    assert train_dpo.build_parser([]).parse_args(["--max-prompt-length", "0"]).max_prompt_length == 0


@pytest.mark.parametrize("script,preset,valid", [("train_sft.py", "dpo", "demo, sft, ita"),
                                                 ("train_dpo.py", "sft", "dpo-demo, dpo")])
def test_the_other_scripts_preset_is_a_clear_error_before_anything_loads(script, preset, valid):
    started = time.perf_counter()
    proc = run_script(script, "--preset", preset, "--max-steps", "0")
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    other = "train_dpo.py" if script == "train_sft.py" else "train_sft.py"
    assert f"error: argument --preset: invalid choice: '{preset}' ('{preset}' is a preset of {other})" \
        in proc.stderr
    assert f"choose from {valid}" in proc.stderr
    assert "Traceback" not in proc.stderr and "base model" not in proc.stderr
    print(f"{script} --preset {preset}: refused in {elapsed:.1f}s")


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_a_bad_flag_fails_in_seconds_without_loading_the_model():
    started, cpu_before = time.perf_counter(), child_cpu_seconds()
    proc = run_script("train_sft.py", "--gradient-accumulation-steps", "-1")
    elapsed, cpu = time.perf_counter() - started, child_cpu_seconds() - cpu_before
    assert proc.returncode == 2
    assert "train_sft.py: error: argument --gradient-accumulation-steps: must be an integer >= 1, " \
           "got -1" in proc.stderr
    assert "base model" not in proc.stderr and "Traceback" not in proc.stderr
    print(f"bad flag refused in {elapsed:.1f}s wall, {cpu:.1f}s CPU (interpreter start and imports)")
    # CPU time, not wall: a machine shared by other jobs stretches wall time, not work.
    # Importing torch + triton is ~3.5 s of it; loading the model and data would add far more.
    assert cpu < 10


def test_every_preset_checkpoints_periodically_by_default():
    for main, presets in ((train_sft, ("demo", "sft", "ita")), (train_dpo, ("dpo-demo", "dpo"))):
        for preset in presets:
            args = main.build_parser(["--preset", preset]).parse_args(["--preset", preset])
            assert args.save_minutes > 0 or args.save_steps > 0, preset
            assert {**SFT_PRESETS, **DPO_PRESETS}[preset].optim.save_minutes == args.save_minutes


@pytest.mark.parametrize("value", ["-1e-4", "-1E-4", "-.5", "-0.0001", "-5e+2", "-1_000", "-inf"])
def test_a_negative_number_in_any_notation_is_the_flags_value(value, capsys):
    """argparse reads -1 and -0.5 as values but -1e-4 or -inf as unknown flags ("expected
    one argument"); every notation, spaced or with '=', meets the flag's own check."""
    want = (f"must be in (0, 1], got {float(value)}" if value != "-inf"
            else "expected a finite number, got '-inf'")
    for argv in (["--learning-rate", value], [f"--learning-rate={value}"], ["--learning", value]):
        err = parse_error(train_sft.main, argv, capsys)
        assert err.splitlines() == [f"train_sft.py: error: argument --learning-rate: {want}",
                                    "(train_sft.py --help lists every flag and its default)"], argv
    err = parse_error(train_dpo.main, ["--beta", value, "--seed", "1"], capsys)
    assert err.startswith("train_dpo.py: error: argument --beta: ")


def test_a_flag_error_is_one_line_and_a_pointer_to_help_not_the_usage_block(capsys):
    for argv in (["--lora-r", "0"], ["--no-such-flag"], ["--learning-rate"], ["--dtype", "fp8"]):
        err = parse_error(train_sft.main, argv, capsys)
        lines = err.splitlines()
        assert len(lines) == 2 and lines[0].startswith("train_sft.py: error: "), (argv, err)
        assert lines[1] == "(train_sft.py --help lists every flag and its default)"
        assert "usage:" not in err
    # a value that merely starts with '-' and is not a number stays what argparse made of it
    err = parse_error(train_sft.main, ["--output-dir", "-x"], capsys)
    assert err.startswith("train_sft.py: error: argument --output-dir: expected one argument")


def test_what_the_fuzzer_found_in_the_flags_is_one_line(capsys):
    """tests/test_fuzz_inputs.py found each: an integer past 2**63 that a later check
    could not print (5,000 digits), argparse storing "--x=--" as an empty list, a
    control character or undecodable byte splitting or breaking the line."""
    err = parse_error(train_sft.main, ["--batch-size", "9" * 4298], capsys)
    line = err.splitlines()[0]
    assert line.startswith("train_sft.py: error: argument --batch-size: expected an integer below 2**63, "
                           "got '99999") and line.endswith("9999' (4,300 characters)") and len(line) < 200
    err = parse_error(train_sft.main, ["--batch-size=--"], capsys)
    assert err.splitlines()[0] == "train_sft.py: error: argument --batch-size: expected one argument, got '--'"
    err = parse_error(train_sft.main, ["--lora-r=\x0c", "--output-dir", "a\udcffb", "--junk\nmore"], capsys)
    assert err.splitlines()[0] == "train_sft.py: error: argument --lora-r: expected an integer, got '\\x0c'"
    err = parse_error(train_sft.main, ["--junk\nmore", "\udcff"], capsys)
    assert err.splitlines()[0] == "train_sft.py: error: unrecognized arguments: --junk\\nmore \\xff"
