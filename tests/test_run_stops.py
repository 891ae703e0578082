"""Every way a run stops keeps its work, driven through the real train_sft.py:
SIGTERM checkpoints like Ctrl-C (exit 143), time-based periodic checkpoints,
explicit off, and kill -9 at arbitrary moments followed by --resume ending
bit-identical to an uninterrupted run, with metrics.jsonl holding each step once
and half-written checkpoint folders cleaned up. Also: resume refuses a
checkpoint whose settings differ, and a missing resume path."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from anita_core.train.run_checkpoint import latest_checkpoint, load_checkpoint_state
from tests.run_cli import TINY, metric_steps, run_script, start_script

STEPS = 4


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """A 4-step run with periodic checkpoints explicitly off."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = run_script("train_sft.py", *TINY, "--max-steps", STEPS, "--save-steps", 0,
                      "--save-minutes", 0, "--save-total-limit", 0, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def wait_for(condition, proc, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def checkpoint_step(out: Path) -> int:
    checkpoint = latest_checkpoint(out)
    return load_checkpoint_state(checkpoint)["step"] if checkpoint else 0


def test_explicitly_off_periodic_saving_keeps_only_the_final_checkpoint(uninterrupted):
    saved = sorted(p.name for p in (uninterrupted / "checkpoints").glob("step-*"))
    assert saved == [f"step-{STEPS:08d}"]
    assert metric_steps(uninterrupted) == list(range(1, STEPS + 1))


def test_kill_9_at_any_moment_then_resume_matches_the_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--max-steps", STEPS, "--save-steps", 1, "--output-dir", out]
    kills = 0
    while kills < 2:
        before = checkpoint_step(out)
        proc = start_script("train_sft.py", *args, *(["--resume"] if before else []))
        # kill -9 as soon as one more checkpoint exists: mid-way through the next step
        wait_for(lambda: checkpoint_step(out) > before, proc, "new checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert (out / "run.lock").is_file()         # the dead holder's lock file stays, and must not block
    orphan = out / "checkpoints" / ".step-00000099.half-written"
    orphan.mkdir()
    (orphan / "trainer_state.safetensors").write_bytes(b"partial")
    proc = run_script("train_sft.py", *args, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"removed {orphan}" in proc.stderr and not orphan.exists()
    assert metric_steps(out) == list(range(1, STEPS + 1)), "metrics.jsonl must hold each step once"
    assert f"({STEPS} steps," in proc.stderr                 # the summary counts each step once
    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    expected = load_file(str(uninterrupted / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    for name in expected:       # bit for bit: the project's CPU promise for resume
        assert got[name].equal(expected[name]), name


def test_sigterm_checkpoints_like_ctrl_c_and_time_based_saves_run_between(tmp_path):
    out = tmp_path / "run"
    # --save-minutes 0.0001 (6 ms): every step is past the interval, so each one is saved
    proc = start_script("train_sft.py", *TINY, "--max-steps", 200, "--save-steps", 0,
                        "--save-minutes", 0.0001, "--save-total-limit", 0, "--output-dir", out)
    wait_for(lambda: len(metric_steps(out)) >= 2, proc, "second step")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM received: stopping" in err and "interrupted: checkpoint of step" in err
    steps_done = checkpoint_step(out)
    assert steps_done >= 2
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert saved == list(range(1, steps_done + 1)), saved   # time-based saves, then the stop's own
    assert not (out / "adapter").exists()                    # a stopped run has no final adapter


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
    from anita_core.train.trainer import Interrupted, _signals_deferred, stop_on_signals
    order, log = [], []
    with pytest.raises(Interrupted) as e:
        with stop_on_signals(log.append):
            with _signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
                order.append("update finished")
            order.append("next step")
    assert e.value.signum == signal.SIGTERM and order == ["update finished"]
    assert log == ["SIGINT received while stopping; finishing the checkpoint"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL     # handlers restored


@pytest.mark.parametrize("script", ["train_sft.py", "train_dpo.py"])
def test_ctrl_c_while_loading_ends_with_one_line_not_a_traceback(tmp_path, script):
    # 0.5 s in, the script is still importing torch inside main(): nothing has trained.
    # The child gets SIGINT's default disposition, as a shell's foreground job does: a
    # library imported by an earlier test may leave this pytest process ignoring SIGINT,
    # and an ignored disposition is inherited through exec.
    import subprocess
    from tests.run_cli import REPO, script_command, script_env
    proc = subprocess.Popen(script_command(script, "--no-progress", "--output-dir", tmp_path / "run"),
                            cwd=REPO, env=script_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert f"{script}: interrupted before training started; nothing to save" in err
