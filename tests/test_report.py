"""--report-to tensorboard,wandb as a user runs it: what each backend wrote, read back
with its own reader, holds every step of metrics.jsonl once, with its values, under
TRL's names, also after a resume that cut the run back; a backend that is not
installed is refused in one line before the model loads; W&B online without a login
is one line too.

The runs use the torch kernel backend (the reporting does not depend on it) and
W&B offline (WANDB_MODE=offline, its config and cache in the test's folder), so
nothing leaves the machine.

Tolerances: TensorBoard stores a scalar as a 32-bit float (simple_value), so each
value read back equals the record's value rounded to float32, exactly; W&B stores
the JSON of the float64, so its values equal the records' exactly.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from anita_core.train.report import backend_metrics, backend_name, report_targets
from anita_core.train.report_tensorboard import TensorBoardLog, event_files
from anita_core.train.run_folder import (CURVES_FILE, TENSORBOARD_DIR, WANDB_DIR, WANDB_RUN_FILE,
                                         read_metrics)
from tests.report_readers import (expected_rows, png_facts, tensorboard_scalars, tensorboard_view,
                                  wandb_segments, wandb_synced_history)
from tests.run_cli import REPO, TINY, metric_steps, run_script, script_command, script_env
from tests.test_data_loading import blocked_env

STEPS, SAVE_EVERY, RESUME_AT = 6, 2, 2
# 4 held-out rows evaluated every 3 steps: eval records at 3 and 6, one on each side of
# the resume point; a checkpoint every 2 steps, all kept, so the run resumes from step 2
# of a finished run: steps 3..6 are logged twice, and must be in each backend once
RUN = [*TINY, "--eval-split", "4", "--eval-steps", "3", "--max-steps", STEPS,
       "--save-steps", SAVE_EVERY, "--save-total-limit", "0"]


def offline_env(tmp_path, **extra) -> dict:
    """W&B offline, its config, cache and data in the test's folder, the torch backend."""
    return {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
            "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
            "ANITA_BACKEND": "torch", **extra}


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """An SFT run reporting to both backends, then resumed from its step-2 checkpoint:
    (folder, metrics.jsonl of the first run, stderr of both)."""
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "run"
    env = offline_env(tmp, WANDB_NAME="name-from-env")
    args = [*RUN, "--report-to", "tensorboard,wandb", "--wandb-project", "project-from-flag",
            "--output-dir", out]
    first = run_script("train_sft.py", *args, timeout=300, **env)
    assert first.returncode == 0, first.stderr[-3000:]
    first_records = read_metrics(out)
    checkpoint = out / "checkpoints" / f"step-{RESUME_AT:08d}"
    second = run_script("train_sft.py", *args, "--resume", checkpoint, timeout=300, **env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {checkpoint} at step {RESUME_AT}" in second.stderr
    return out, first_records, first.stderr + second.stderr


def assert_reported_by_one_process(out, steps) -> None:
    """One TensorBoard event file and one W&B offline run in ``out``, each holding
    ``steps`` with metrics.jsonl's values (a run whose first report this was)."""
    expected = {s: row for s, row in expected_rows(out).items() if s in steps}
    assert sorted(expected) == list(steps)
    assert len(event_files(out / TENSORBOARD_DIR)) == 1
    assert tensorboard_view(out / TENSORBOARD_DIR) == {
        s: {tag: float(np.float32(v)) for tag, v in row.items()} for s, row in expected.items()}
    (segment,) = wandb_segments(out / WANDB_DIR)
    assert segment["history"] == expected


def test_report_to_takes_none_or_a_subset_of_the_backends():
    assert report_targets("none") == ()
    assert report_targets("wandb, tensorboard,wandb") == ("wandb", "tensorboard")
    for bad in ("", "none,wandb", "mlflow", "tensorboard,comet"):
        with pytest.raises(Exception, match="expected none, or a comma-separated subset of tensorboard,wandb"):
            report_targets(bad)


def test_metric_names_are_trls():
    assert [backend_name(k) for k in ("loss", "lr", "grad_norm", "eval_loss", "rewards/chosen",
                                      "eval_rewards/margins", "logps/rejected", "tokens_per_s",
                                      "computed_tokens", "memory_peak_gib")] == [
        "train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "train/rewards/chosen",
        "eval/rewards/margins", "train/logps/rejected", "train/tokens_per_second",
        "train/computed_tokens", "train/memory_peak_gib"]
    assert backend_metrics({"step": 3, "loss": 1.5, "units": 7, "note": "x", "flag": True}) == {
        "train/loss": 1.5, "train/units": 7.0}


def test_tensorboard_holds_each_step_once_after_the_resume(resumed_run):
    out, first_records, _ = resumed_run
    assert metric_steps(out) == list(range(1, STEPS + 1))
    expected = expected_rows(out)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert "eval/loss" in expected[3] and "eval/loss" in expected[6]
    # as stored: one event file (the older ones were rewritten into it), each (tag, step) once
    assert len(event_files(out / TENSORBOARD_DIR)) == 1
    stored = tensorboard_scalars(out / TENSORBOARD_DIR)
    keys = [(tag, step) for tag, step, _, _ in stored]
    assert len(keys) == len(set(keys)) == sum(len(row) for row in expected.values())
    # as TensorBoard reads them: metrics.jsonl's steps and values, to float32
    view = tensorboard_view(out / TENSORBOARD_DIR)
    assert sorted(view) == sorted(expected)
    for step, row in expected.items():
        assert view[step] == {tag: float(np.float32(v)) for tag, v in row.items()}, step
    # steps after the checkpoint are the second run's, not the first's: their tokens/s
    # (a wall-clock rate, different in every run) are the ones metrics.jsonl now holds
    first = {r["step"]: r["tokens_per_s"] for r in first_records if "tokens_per_s" in r}
    now = {r["step"]: r["tokens_per_s"] for r in read_metrics(out) if "tokens_per_s" in r}
    replayed = range(RESUME_AT + 1, STEPS + 1)
    assert any(first[s] != now[s] for s in replayed), "premise: the two runs' rates differ"
    for s in replayed:
        assert view[s]["train/tokens_per_second"] == float(np.float32(now[s]))
    # the kept steps keep their first wall times: written again, not re-timed
    walls = {(tag, step): wall for tag, step, wall, _ in stored}
    assert walls[("train/loss", 1)] < walls[("train/loss", RESUME_AT + 1)] - 1.0


def test_wandb_offline_resumes_the_same_run_rewound_to_the_checkpoint(resumed_run):
    out, _, stderr = resumed_run
    segments = wandb_segments(out / WANDB_DIR)
    assert len(segments) == 2, [s["folder"] for s in segments]
    first, second = (s["run"] for s in segments)
    saved = json.loads((out / WANDB_RUN_FILE).read_text())
    assert first["run_id"] == second["run_id"] == saved["id"]
    for run in (first, second):
        assert run["project"] == "project-from-flag" and run["display_name"] == "name-from-env"
        assert run["config"]["update"]["max_steps"] == STEPS         # the run's TrainConfig
    assert "branch_point" not in first
    # rewound to the step before the checkpoint's, whose row the second segment logs again
    # (the first segment still holds the steps the resume replays)
    assert int(second["branch_point"]["value"]) == RESUME_AT - 1
    assert min(segments[1]["history"]) == RESUME_AT and max(segments[0]["history"]) == STEPS
    # what the run holds once synced: metrics.jsonl's steps and values, exactly
    assert wandb_synced_history(segments) == expected_rows(out)
    assert "wandb sync" in stderr        # W&B itself tells how to upload the offline run


def test_the_run_draws_its_curves(resumed_run):
    out, _, stderr = resumed_run
    png = out / CURVES_FILE
    assert f"curves: {png}" in stderr
    size, series = png_facts(png)
    assert size == (880, 640)            # 2 x 2 panels of 4.4 x 3.0 inches + the title's 0.4, at 100 dpi
    records = read_metrics(out)
    count = lambda key: sum(key in r for r in records)      # noqa: E731
    assert series == {"loss": {"train": STEPS, "eval": 2}, "learning rate": {"learning rate": STEPS},
                      "gradient norm": {"gradient norm": STEPS}, "tokens/s": {"tokens/s": STEPS}}
    assert count("loss") == STEPS and count("eval_loss") == 2


def test_dpo_reports_rewards_and_logps_under_trls_names(tmp_path):
    out = tmp_path / "dpo"
    proc = run_script("train_dpo.py", "--no-progress", "--max-steps", 3, "--eval-steps", 3,
                      "--eval-split", 4, "--report-to", "tensorboard,wandb", "--output-dir", out,
                      timeout=300, **offline_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = expected_rows(out)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "loss"):
        assert f"train/{name}" in expected[1] and f"eval/{name}" in expected[3], name
    view = tensorboard_view(out / TENSORBOARD_DIR)
    assert {s: set(row) for s, row in view.items()} == {s: set(row) for s, row in expected.items()}
    (segment,) = wandb_segments(out / WANDB_DIR)
    assert segment["history"] == expected
    assert segment["run"]["project"] == "anita" and segment["run"]["display_name"] == "dpo"
    _, series = png_facts(out / CURVES_FILE)
    assert series["DPO rewards"] == {"train chosen": 3, "train rejected": 3, "eval chosen": 1,
                                     "eval rejected": 1}
    assert series["DPO reward margin"] == {"train": 3, "eval": 1}
    assert series["DPO reward accuracy"] == {"train": 3, "eval": 1}


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_a_backend_that_is_not_installed_is_refused_in_one_line_before_the_model_loads(tmp_path, backend):
    out = tmp_path / "run"
    proc = run_script("train_sft.py", *TINY, "--report-to", "tensorboard,wandb", "--output-dir", out,
                      timeout=300, **blocked_env(tmp_path, backend), ANITA_BACKEND="torch")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"error: --report-to {backend}: the '{backend}' package is not "
                                   f"installed (pip install {backend}, or pip install -e \".[{backend}]\")")
    assert not out.exists(), "refused before the output folder is touched"


def test_wandb_online_without_a_login_is_one_line(tmp_path):
    """No key anywhere W&B looks (the environment, a netrc in HOME, its settings) and no
    terminal to ask on: W&B refuses before it reaches the network."""
    env = script_env(**offline_env(tmp_path, HOME=str(tmp_path), WANDB_MODE="online"))
    env.pop("WANDB_API_KEY", None)
    out = tmp_path / "run"
    proc = subprocess.run(script_command("train_sft.py", *TINY, "--max-steps", 1, "--report-to", "wandb",
                                         "--output-dir", out),
                          cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --report-to wandb: W&B could not start ("), errors
    assert errors[0].endswith("set WANDB_MODE=offline and sync later with `wandb sync`")
    assert "Traceback" not in proc.stderr and not (out / "adapter").exists()


def test_tensorboard_cut_back_rewrites_the_files_and_survives_a_kill_between_its_two_halves(tmp_path):
    log = TensorBoardLog(tmp_path)
    log.open(0, {})
    for step in range(1, 6):
        log.log(step, {"train/loss": 10.0 - step, "train/learning_rate": step / 8})
    log.close(failed=False)
    (first_file,) = event_files(tmp_path / TENSORBOARD_DIR)
    kept_copy = tmp_path / "first-file"
    shutil.copy(first_file, kept_copy)
    log.open(3, {})
    log.log(4, {"train/loss": 40.0})
    log.close(failed=False)
    # a kill after the new file was written but before the older one was deleted
    shutil.copy(kept_copy, first_file)
    assert len(event_files(tmp_path / TENSORBOARD_DIR)) == 2
    # TensorBoard honours the new file's purge marker: it shows the cut-back log already
    expected = {s: {"train/loss": 10.0 - s, "train/learning_rate": s / 8} for s in (1, 2, 3)}
    assert tensorboard_view(tmp_path / TENSORBOARD_DIR) == {**expected, 4: {"train/loss": 40.0}}
    log.open(4, {})
    log.close(failed=False)
    stored = tensorboard_scalars(tmp_path / TENSORBOARD_DIR)
    assert len(event_files(tmp_path / TENSORBOARD_DIR)) == 1
    assert sorted((tag, step, value) for tag, step, _, value in stored) == sorted(
        [("train/loss", s, 10.0 - s) for s in (1, 2, 3)] + [("train/loss", 4, 40.0)]
        + [("train/learning_rate", s, s / 8) for s in (1, 2, 3)])


class FailsOnStep:
    """Test double of a backend whose writing breaks at one step (a full disk, a lost
    connection); it records what it was given and whether it was closed as failed."""
    name = "flaky"

    def __init__(self, step):
        self.step, self.logged, self.closed = step, [], None

    def open(self, step, rows):
        pass

    def log(self, step, metrics):
        if step == self.step:
            raise OSError("No space left on device")
        self.logged.append(step)

    def close(self, failed):
        self.closed = failed


def test_a_backend_that_fails_to_write_is_turned_off_with_one_warning_not_the_run(tmp_path):
    from anita_core.train.report import Reporter
    flaky, lines = FailsOnStep(2), []
    reporter = Reporter(tmp_path, [flaky, TensorBoardLog(tmp_path)], log=lines.append)
    with reporter.session(0):
        for step in range(1, 5):
            reporter.log({"step": step, "loss": 1.0 / step})
    assert lines == ["warning: --report-to flaky: writing failed (OSError: No space left on device); it is "
                     "off for the rest of this run, metrics.jsonl holds every record"]
    assert flaky.logged == [1] and flaky.closed is True
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert sorted(tensorboard_view(tmp_path / TENSORBOARD_DIR)) == [1, 2, 3, 4]


def test_memory_figures_are_the_allocators_on_a_gpu_and_absent_on_a_cpu(resumed_run, tmp_path):
    import torch
    from anita_core.memory.budget import device_memory_gib
    assert device_memory_gib(torch.device("cpu")) == {}
    out, _, _ = resumed_run
    assert not any(k.startswith("memory_") for r in read_metrics(out) for k in r)


@pytest.mark.gpu
def test_a_gpu_run_reports_its_memory_figures(tmp_path):
    """On a GPU every step's record carries the allocator's figures (GiB), the peak never
    below what is allocated, and TensorBoard shows them under train/memory_*."""
    out = tmp_path / "run"
    proc = run_script("train_sft.py", *TINY, "--max-steps", 2, "--report-to", "tensorboard",
                      "--output-dir", out, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r for r in read_metrics(out) if "loss" in r]
    for r in steps:
        assert 0 < r["memory_allocated_gib"] <= r["memory_peak_gib"] <= r["memory_reserved_gib"], r
    view = tensorboard_view(out / TENSORBOARD_DIR)
    assert view[2]["train/memory_peak_gib"] == float(np.float32(steps[-1]["memory_peak_gib"]))


def test_tensorboard_opens_with_the_rows_metrics_jsonl_holds_that_no_event_file_does(tmp_path):
    """A kill between metrics.jsonl's write and TensorBoard's (or TensorBoard first asked
    for on a resume): the opening writes those values from metrics.jsonl, in step order."""
    log = TensorBoardLog(tmp_path)
    log.open(0, {})
    log.log(1, {"train/loss": 3.0})
    log.close(failed=False)
    rows = {1: {"train/loss": 3.0}, 2: {"train/loss": 2.5, "eval/loss": 2.75}}
    log.open(2, rows)
    log.log(3, {"train/loss": 2.0})
    log.close(failed=False)
    assert tensorboard_view(tmp_path / TENSORBOARD_DIR) == {**rows, 3: {"train/loss": 2.0}}
    stored = tensorboard_scalars(tmp_path / TENSORBOARD_DIR)
    assert [step for tag, step, _, _ in stored if tag == "train/loss"] == [1, 2, 3]
