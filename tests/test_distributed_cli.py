"""train_sft.py under torchrun (2 gloo ranks on the CPU): a killed rank ends the
job non-zero and leaves a loadable checkpoint (the rank kills itself at a chosen
point, ANITA_STOP_AT, never at a moment a clock picks);
that checkpoint resumes on 2 ranks and on 1 process to the adapters of an
uninterrupted single-process run with the same global batch; a checkpoint from
the other mode and a global batch the ranks cannot split are refused.

The children use the torch kernel backend (ANITA_BACKEND=torch) to stay fast.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anita_core.train.run_checkpoint import latest_checkpoint, load_checkpoint_state
from tests.run_cli import REPO, TINY
from tests.test_distributed import free_port

TIMEOUT_S = 10           # --collective-timeout of the runs
GLOBAL = ["--global-batch-size", "8", "--lora-dropout", "0", "--lr-scheduler", "constant",
          "--warmup-steps", "0", "--collective-timeout", str(TIMEOUT_S)]
# 44 rows give 16 micro-batches per epoch (checked below from both runs' logs): 2 ranks
# split every step evenly, also the epoch's last, so that they and one process train on
# the same micro-batches (with an odd count 2 ranks leave the last one out, by design)
RESUME_DATA = [*TINY, "--max-samples", "44"]
# rank 1 dies inside step 3, after its first micro-batch: by then rank 0 has written
# checkpoint 2 (step 3 starts with a collective that waits for it), and it cannot finish
# step 3 without rank 1's gradients. The resumed runs then train to step 6 (epoch 1).
KILL_AT = "SIGKILL@step:3.1,rank=1"
CHECKPOINT_STEP, TARGET_STEP = 2, 6
# 2 ranks vs 1 process sum the fp32 gradients in another order (per rank, then over the
# ranks). fp32 rounding (~6e-8 relative) of a gradient entry that is small because its
# terms nearly cancel is a large relative error of that entry, and AdamW divides each
# entry by its own root mean square (damped by eps 1e-8), so such entries move by a
# visible fraction of the learning rate's step. Measured with
# `python -m bench.distributed_spread --seeds 74 --steps 6` (these settings, seeds 0-73,
# uninterrupted, 2 gloo ranks vs 1 process; the 39 seeds whose epochs 2 ranks split
# evenly): max |diff| of the adapters 1.42e-5 (seed 40), next 7.2e-6, median 1.6e-6; seed
# 42, this test's, 3.0e-6. The bound is 7x the worst draw. A real difference moves
# weights by about the learning rate (5e-3) in one step, 50x over the bound: 7.0e-3 with
# one micro-batch left out by 2 ranks (40 rows, an odd epoch), 1.6e-2 with the
# all-reduce replaced by a barrier (tests/test_distributed.py).
ATOL = 1e-4
SPREAD_NOTE = "39 seeds measured: max 1.42e-5, median 1.6e-6"


def child_env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
           "ANITA_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    env.pop("ANITA_STOP_AT", None)
    return {**env, **extra}


def torchrun(*args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            f"--master_port={free_port()}", str(REPO / "train_sft.py"), *map(str, args)]


def single(*args) -> list:
    return [sys.executable, str(REPO / "train_sft.py"), *map(str, args)]


def run(command, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=child_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_close(got: dict, expected: dict, what: str) -> float:
    assert sorted(got) == sorted(expected)
    worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= ATOL, f"{what}: max |diff| {worst:.3g}"
    return worst


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A 2-rank run whose rank 1 kills itself (-9) at a chosen point (KILL_AT)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    proc = subprocess.Popen(torchrun(*RESUME_DATA, *GLOBAL, "--max-steps", 1000, "--save-steps", 1,
                                     "--output-dir", out),
                            cwd=REPO, env=child_env(ANITA_STOP_AT=KILL_AT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        stderr = proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed = re.search(r"exitcode\s*:\s*-9", stderr)
    return out, proc.returncode, stderr, killed is not None


def test_a_killed_rank_ends_the_job_nonzero_and_the_checkpoint_before_it_loads(killed_run):
    out, code, stderr, killed = killed_run
    assert code != 0, stderr[-3000:]
    assert killed, f"rank 1 did not die by SIGKILL:\n{stderr[-3000:]}"
    state = load_checkpoint_state(latest_checkpoint(out))
    assert state["step"] == CHECKPOINT_STEP and state["settings"]["global_batch"] == 8
    assert not (out / "adapter").exists()
    print(f"job ended with exit {code} after rank 1 was killed inside step {CHECKPOINT_STEP + 1}; "
          f"last checkpoint: step {state['step']}")


def test_resume_on_two_ranks_and_on_one_process_matches_an_uninterrupted_run(killed_run, tmp_path):
    """The 2-rank resume also reports to TensorBoard and W&B (offline): rank 0 alone
    writes them, as it alone writes metrics.jsonl."""
    from tests.test_report import assert_reported_by_one_process, offline_env
    out, _, _, _ = killed_run
    assert load_checkpoint_state(latest_checkpoint(out))["step"] == CHECKPOINT_STEP
    two, one, straight = tmp_path / "two", tmp_path / "one", tmp_path / "straight"
    shutil.copytree(out, two)
    shutil.copytree(out, one)
    common = [*RESUME_DATA, *GLOBAL, "--max-steps", TARGET_STEP]
    # the three run side by side (the CPU time is the same, the wall time shorter)
    report = ["--report-to", "tensorboard,wandb"]
    procs = {name: subprocess.Popen(command, cwd=REPO, env=child_env(**offline_env(tmp_path)),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, command in (("2 ranks", torchrun(*common, *report, "--resume", "--output-dir", two)),
                                   ("1 process", single(*common, "--resume", "--output-dir", one)),
                                   ("uninterrupted", single(*common, "--output-dir", straight)))}
    for name, proc in procs.items():
        proc.stderr_text = proc.communicate(timeout=300)[1]
        assert proc.returncode == 0, f"{name}: {proc.stderr_text[-3000:]}"
    assert f"resumed from {two / 'checkpoints'}" in procs["2 ranks"].stderr_text
    assert "2 ranks (gloo), whole base, global batch 8" in procs["2 ranks"].stderr_text
    # the premise: every run sees the same micro-batches (none cut by 2 ranks)
    for name, proc in procs.items():
        assert "16 micro-batches per epoch" in proc.stderr_text, f"{name}: {proc.stderr_text[-2000:]}"
    # first asked for on this resume, the backends start with the steps logged before it
    assert_reported_by_one_process(two, steps=range(1, TARGET_STEP + 1))
    expected = adapter(straight)
    worst = max(assert_close(adapter(two), expected, "2-rank resume"),
                assert_close(adapter(one), expected, "1-process resume from a 2-rank checkpoint"))
    print(f"resume from step {CHECKPOINT_STEP} to {TARGET_STEP}: max |diff| vs uninterrupted = "
          f"{worst:.3g} (bound {ATOL:g}; {SPREAD_NOTE})")


def test_a_checkpoint_of_the_other_mode_is_refused(killed_run, tmp_path):
    out, _, _, _ = killed_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    proc = run(single(*RESUME_DATA, *GLOBAL, "--max-steps", 1000, "--resume", "--sharded-base",
                      "--output-dir", copy))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "base_weights: checkpoint 'whole on each rank', this run 'sharded over ranks'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_global_batch_the_ranks_cannot_split_is_refused_before_any_work():
    proc = run(single(*TINY, "--global-batch-size", 6, "--batch-size", 2), WORLD_SIZE="2")
    assert proc.returncode == 2
    assert ("argument --global-batch-size: --global-batch-size 6 is not a multiple of "
            "--batch-size 2 x world size 2 = 4") in proc.stderr


def test_an_unavailable_backend_is_a_clear_error(monkeypatch):
    from anita_core.train.distributed import DistributedError, init_from_env
    for k, v in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    # the missing-backend error is reachable only on a build without NCCL (the CPU wheel
    # CI installs); the missing-rendezvous error below runs on every build
    if not torch.distributed.is_nccl_available():
        with pytest.raises(DistributedError, match="the nccl backend is not available"):
            init_from_env(5, backend="nccl")
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(DistributedError, match="MASTER_PORT not set; launch with torchrun"):
        init_from_env(5)
