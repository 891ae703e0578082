"""One run per output folder, and run state that is never unpickled: the lock
names its holder, a folder holding a run needs --resume or --overwrite, metrics
are cut back to the checkpoint on resume, and a planted pickle never runs."""
from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from anita_core.train.run_checkpoint import (LATEST, LEGACY_STATE_FILE, load_checkpoint_state,
                                             remove_orphaned_temp_files, rng_restore, rng_snapshot,
                                             write_state)
from anita_core.train.run_folder import (RunFolderError, RunLock, prepare_output_folder,
                                         truncate_metrics)
from tests.run_cli import run_script


class WritesMarker:
    """A pickle payload: unpickling it calls open(marker, 'w')."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_legacy_checkpoint(out, marker):
    checkpoint = out / "checkpoints" / "step-00000001"
    checkpoint.mkdir(parents=True)
    with open(checkpoint / LEGACY_STATE_FILE, "wb") as f:
        pickle.dump({"step": 1, "payload": WritesMarker(marker)}, f)
    (out / "checkpoints" / LATEST).write_text(checkpoint.name)
    return checkpoint


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    checkpoint = plant_legacy_checkpoint(out, marker)
    with pytest.raises(ValueError, match="pickled trainer state .* not loaded"):
        load_checkpoint_state(checkpoint)
    proc = run_script("train_sft.py", "--resume", "--output-dir", out, "--no-progress")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "trainer_state.pt: a pickled trainer state from an older anita; it is not loaded" \
        in proc.stderr
    assert "Traceback" not in proc.stderr and "base model" not in proc.stderr
    assert not marker.exists(), "the pickle payload ran"
    with open(checkpoint / LEGACY_STATE_FILE, "rb") as f:   # the payload is live: a plain
        pickle.load(f)                                     # unpickle does write the marker
    assert marker.exists()


def test_state_round_trips_exactly_without_pickle(tmp_path):
    params = [torch.randn(3, 5, requires_grad=True), torch.randn(7, requires_grad=True)]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), foreach=False)
    for _ in range(2):
        sum((p ** 2).sum() for p in params).backward()
        optimizer.step()
    generator = torch.Generator().manual_seed(random.randrange(2 ** 31))
    state = {"step": 2, "epoch": 0, "batch_index": 5, "optimizer": optimizer.state_dict(),
             "rng": rng_snapshot(generator), "settings": {"seed": 42}}
    write_state(tmp_path, state)
    expected_draws = (torch.rand(4), random.random(), np.random.rand(3), torch.rand(2, generator=generator))
    loaded = load_checkpoint_state(tmp_path)
    assert loaded["step"] == 2 and loaded["settings"] == {"seed": 42}
    rng_restore(loaded["rng"], generator)
    draws = (torch.rand(4), random.random(), np.random.rand(3), torch.rand(2, generator=generator))
    assert torch.equal(draws[0], expected_draws[0]) and draws[1] == expected_draws[1]
    assert np.array_equal(draws[2], expected_draws[2]) and torch.equal(draws[3], expected_draws[3])
    restored = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    restored.load_state_dict(loaded["optimizer"])
    assert restored.param_groups[0]["betas"] == (0.9, 0.95)
    for i, s in optimizer.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(restored.state_dict()["state"][i][k], v), (i, k)


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    lock = RunLock(out).acquire()
    try:
        proc = run_script("train_sft.py", "--output-dir", out, "--no-progress")
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"another run (PID {os.getpid()}) is using this output folder" in proc.stderr
        assert "base model" not in proc.stderr
    finally:
        lock.release()
    # a lock file left by a dead process does not block: flock died with it
    (out / "run.lock").write_text("999999999\n")
    RunLock(out).acquire().release()


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    proc = run_script("train_sft.py", "--output-dir", out, "--no-progress")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "already holds a run (metrics.jsonl); continue it with --resume, replace it with " \
           "--overwrite" in proc.stderr
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]   # the refused run left no lock
    with pytest.raises(RunFolderError):
        prepare_output_folder(out, resume=False, overwrite=False)
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)
    (out / "adapter").mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    (out / "curves.png").write_bytes(b"")
    (out / "wandb-run.json").write_text("{}")
    (out / "wandb" / "offline-run-20260101_000000-abc").mkdir(parents=True)
    prepare_output_folder(out, resume=False, overwrite=True)
    # only the run's records, checkpoints, adapter, TensorBoard log, curves and W&B run id
    # go; W&B's offline runs stay, to be synced
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "wandb"]


def test_resume_cuts_metrics_back_to_the_checkpoint_step(tmp_path):
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.5},
               {"step": 3, "loss": 1.0}]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo'   # cut by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    assert truncate_metrics(tmp_path, 2) == 2
    kept = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == records[:3]


def test_orphaned_temp_files_are_removed(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".step-00000003.abc" / "adapter").mkdir(parents=True)
    (root / ".latest.xyz").write_text("step-00000003")
    (root / "step-00000002").mkdir()
    removed = remove_orphaned_temp_files(tmp_path)
    assert len(removed) == 2
    assert [p.name for p in root.iterdir()] == ["step-00000002"]


def test_resuming_a_finished_run_logs_no_second_eval_record(tmp_path):
    from tests.test_trainer import make_trainer
    first = make_trainer(tmp_path, max_steps=2, dropout=0.0)
    first.eval_batches = first.epoch_batches(0)[:1]
    first.train()
    again = make_trainer(tmp_path, max_steps=2, dropout=0.0)
    again.eval_batches = again.epoch_batches(0)[:1]
    again.train(resume_from=tmp_path / "checkpoints" / "step-00000002")
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval_loss" in r) for r in records] == [(1, False), (2, False), (2, True)]


# ------------------------------------------------------------ a refused run leaves no trace
FAST = ["--no-progress", "--eval-split", "0", "--batch-size", "2", "--max-samples", "8", "--max-steps", "1"]


def test_a_run_refused_before_training_leaves_the_folder_as_it_found_it(tmp_path, capsys):
    import train_sft
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    # a folder that did not exist: not there afterwards, nor the parents the run made
    out = tmp_path / "new" / "run"
    assert train_sft.main(["--data", str(bad), "--output-dir", str(out), *FAST]) == 2
    assert not (tmp_path / "new").exists()
    # a memory budget too small, refused after the model loaded: the same
    assert train_sft.main(["--memory-budget", "0.000001", "--output-dir", str(out), *FAST]) == 2
    assert not (tmp_path / "new").exists()
    # --overwrite of an earlier run, refused on its data: the earlier run is still there
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (earlier / "notes.txt").write_text("mine")
    assert train_sft.main(["--data", str(bad), "--output-dir", str(earlier), "--overwrite", *FAST]) == 2
    assert sorted(p.name for p in earlier.iterdir()) == ["metrics.jsonl", "notes.txt"]
    # --resume of a folder without checkpoints: refused, nothing added
    with pytest.raises(SystemExit):
        train_sft.main(["--output-dir", str(earlier), "--resume", *FAST])
    assert sorted(p.name for p in earlier.iterdir()) == ["metrics.jsonl", "notes.txt"]
    err = capsys.readouterr().err
    assert "error: --memory-budget" in err and "error: --resume: no checkpoint under" in err


def test_the_default_output_folder_follows_anita_runs_dir(tmp_path, monkeypatch):
    """How the tests keep the checkout's runs/ out of reach (conftest.py): a run without
    --output-dir goes to $ANITA_RUNS_DIR/<script>-<preset>."""
    import train_sft
    monkeypatch.setenv("ANITA_RUNS_DIR", str(tmp_path / "elsewhere"))
    assert train_sft.main(FAST) == 0
    assert (tmp_path / "elsewhere" / "sft-demo" / "adapter" / "adapter_model.safetensors").is_file()
