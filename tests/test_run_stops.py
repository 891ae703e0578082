"""Every way a run stops keeps its work, driven through the real train_sft.py:
SIGTERM checkpoints like Ctrl-C (exit 143), time-based periodic checkpoints,
explicit off, and kill -9 mid-step and mid-checkpoint followed by --resume ending
bit-identical to an uninterrupted run, with metrics.jsonl holding each step once
and half-written checkpoint folders cleaned up. Also: resume refuses a
checkpoint whose settings differ, and a missing resume path.

Every stop happens at a chosen point (ANITA_STOP_AT, anita_core/train/stop_points.py),
never at a moment a clock or the machine's load picks."""
from __future__ import annotations

import errno
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from anita_core.train.run_checkpoint import latest_checkpoint, load_checkpoint_state
from tests.run_cli import TINY, metric_steps, run_script

STEPS = 4


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """A 4-step run with periodic checkpoints explicitly off."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = run_script("train_sft.py", *TINY, "--max-steps", STEPS, "--save-steps", 0,
                      "--save-minutes", 0, "--save-total-limit", 0, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def checkpoint_step(out: Path) -> int:
    checkpoint = latest_checkpoint(out)
    return load_checkpoint_state(checkpoint)["step"] if checkpoint else 0


def test_explicitly_off_periodic_saving_keeps_only_the_final_checkpoint(uninterrupted):
    saved = sorted(p.name for p in (uninterrupted / "checkpoints").glob("step-*"))
    assert saved == [f"step-{STEPS:08d}"]
    assert metric_steps(uninterrupted) == list(range(1, STEPS + 1))


def test_kill_9_mid_step_and_mid_checkpoint_then_resume_matches_the_uninterrupted_run(
        uninterrupted, tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--max-steps", STEPS, "--save-steps", 1, "--output-dir", out]
    # kill -9 inside step 2, after its first micro-batch: checkpoint 1 is the last one
    proc = run_script("train_sft.py", *args, stop_at="SIGKILL@step:2.1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert checkpoint_step(out) == 1
    assert (out / "run.lock").is_file()         # the dead holder's lock file stays, and must not block
    # resumed, then kill -9 while checkpoint 3 is written: its files are complete in the
    # hidden temp folder, not yet renamed into place
    proc = run_script("train_sft.py", *args, "--resume", stop_at="SIGKILL@checkpoint:3")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert checkpoint_step(out) == 2
    orphans = list((out / "checkpoints").glob(".step-00000003.*"))
    assert len(orphans) == 1 and (orphans[0] / "trainer_state.json").is_file(), orphans
    proc = run_script("train_sft.py", *args, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"removed {orphans[0]}" in proc.stderr and not orphans[0].exists()
    assert f"resumed from {out / 'checkpoints' / 'step-00000002'} at step 2" in proc.stderr
    assert metric_steps(out) == list(range(1, STEPS + 1)), "metrics.jsonl must hold each step once"
    assert f"({STEPS} steps," in proc.stderr                 # the summary counts each step once
    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    expected = load_file(str(uninterrupted / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    for name in expected:       # bit for bit: the project's CPU promise for resume
        assert got[name].equal(expected[name]), name


def test_sigterm_checkpoints_like_ctrl_c_and_time_based_saves_run_between(tmp_path):
    out = tmp_path / "run"
    # --save-minutes 1e-9 (60 ns): every step is past the interval, so each one is saved;
    # SIGTERM arrives once step 2 is done (and saved)
    proc = run_script("train_sft.py", *TINY, "--max-steps", 200, "--save-steps", 0,
                      "--save-minutes", 1e-9, "--save-total-limit", 0, "--output-dir", out,
                      stop_at="SIGTERM@step:2")
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "SIGTERM received: stopping" in proc.stderr
    assert "interrupted: checkpoint of step 2" in proc.stderr
    assert checkpoint_step(out) == 2
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert saved == [1, 2], saved        # time-based saves, then the stop's own (of step 2 again)
    assert metric_steps(out) == [1, 2]
    assert not (out / "adapter").exists()                    # a stopped run has no final adapter


def test_sigterm_inside_a_step_rolls_the_step_back(tmp_path):
    """A stop in the middle of step 3 checkpoints step 2, and --resume replays step 3 whole
    (the torch kernel backend: this is about the loop, and the interpreter is slow)."""
    out = tmp_path / "run"
    args = [*TINY, "--gradient-accumulation-steps", 2, "--save-steps", 0, "--save-minutes", 0,
            "--max-steps", 4, "--output-dir", out]
    proc = run_script("train_sft.py", *args, stop_at="SIGTERM@step:3.1", ANITA_BACKEND="torch")
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "interrupted: checkpoint of step 2" in proc.stderr
    assert checkpoint_step(out) == 2 and metric_steps(out) == [1, 2]
    straight = tmp_path / "straight"
    runs = [run_script("train_sft.py", *args, "--resume", ANITA_BACKEND="torch"),
            run_script("train_sft.py", *args[:-1], straight, ANITA_BACKEND="torch")]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    expected = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    for name in expected:
        assert got[name].equal(expected[name]), name


def test_resume_refuses_other_settings_listing_each_and_a_missing_path(uninterrupted, tmp_path):
    proc = run_script("train_sft.py", *TINY, "--max-steps", STEPS + 1, "--output-dir", uninterrupted,
                      "--resume", "--lora-r", 8, "--seed", 7, "--max-samples", 30)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "was written by a run with other settings" in proc.stderr
    for setting in ("lora: checkpoint 'r=16", "seed: checkpoint 42, this run 7", "data: checkpoint"):
        assert setting in proc.stderr, setting
    assert "batch_size" not in proc.stderr and "model:" not in proc.stderr   # only what differs
    assert metric_steps(uninterrupted) == list(range(1, STEPS + 1))            # the run is untouched

    proc = run_script("train_sft.py", "--resume", str(tmp_path / "nowhere"), "--output-dir",
                      tmp_path / "other")
    assert proc.returncode == 2
    assert f"error: --resume {tmp_path / 'nowhere'}: no such checkpoint folder" in proc.stderr
    assert "base model" not in proc.stderr


def test_a_signal_inside_an_update_waits_for_the_update_to_finish():
    """So a stop never checkpoints half-updated weights; a second signal is ignored."""
    import os
    from anita_core.train.stop_signals import Interrupted, signals_deferred, stop_on_signals
    order, log = [], []
    with pytest.raises(Interrupted) as e:
        with stop_on_signals(log.append):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
                order.append("update finished")
            order.append("next step")
    assert e.value.signum == signal.SIGTERM and order == ["update finished"]
    assert log == ["SIGINT received while stopping; finishing the checkpoint"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL     # handlers restored


@pytest.mark.parametrize("point", ["import", "loading"])
@pytest.mark.parametrize("script", ["train_sft.py", "train_dpo.py"])
def test_ctrl_c_while_loading_ends_with_one_line_not_a_traceback(tmp_path, script, point):
    # import: while torch imports (SIGINT is deferred there, see script_entry.py);
    # loading: just before the base model loads. Nothing has trained either way.
    proc = run_script(script, "--no-progress", "--output-dir", tmp_path / "run", timeout=300,
                      stop_at=f"SIGINT@{point}")
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{script}: interrupted before training started; nothing to save" in proc.stderr


def test_stop_points_refuse_a_malformed_spec_and_fire_only_where_named(monkeypatch):
    from anita_core.train import stop_points
    for bad in ("SIGKILL", "SIGHUP@step:2", "SIGKILL@step:x", "SIGKILL@step:2,rank=a", "ENOSPC@step:2"):
        with pytest.raises(ValueError, match="ANITA_STOP_AT="):
            stop_points.parse(bad)
    assert stop_points.parse("SIGTERM@step:3.1,rank=1") == (signal.SIGTERM, "step:3.1", 1)
    assert stop_points.parse("ENOSPC@checkpoint:3") == (stop_points.DISK_FULL, "checkpoint:3", None)
    monkeypatch.setenv("ANITA_STOP_AT", "ENOSPC@checkpoint:3")
    stop_points.reached("checkpoint:2")
    with pytest.raises(OSError) as full:
        stop_points.reached("checkpoint:3")
    assert full.value.errno == errno.ENOSPC
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        monkeypatch.setenv("ANITA_STOP_AT", "SIGTERM@step:2,rank=1")
        monkeypatch.setenv("RANK", "0")
        stop_points.reached("step:2")          # another rank's point
        monkeypatch.setenv("RANK", "1")
        stop_points.reached("step:2.1")        # another point
        assert received == []
        stop_points.reached("step:2")
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
