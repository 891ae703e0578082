"""Running train_sft.py / train_dpo.py as a user does: a subprocess in the
repository root, this checkout's code first on the path."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from anita_core.train.run_folder import read_metrics

REPO = Path(__file__).resolve().parents[1]
# a few real QLoRA steps on the bundled tiny model, kept short for a 2-core CPU
TINY = ["--no-progress", "--eval-split", "0", "--batch-size", "2", "--max-seq-length", "32",
        "--max-samples", "40"]


def script_command(script: str, *args: str) -> List[str]:
    return [sys.executable, str(REPO / script), *map(str, args)]


def script_env(stop_at: Optional[str] = None, **extra: str) -> dict:
    """The child's environment; ``stop_at``: where the child stops itself
    (ANITA_STOP_AT, anita_core/train/stop_points.py), never a moment a clock picks."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **extra}
    env.pop("ANITA_STOP_AT", None)
    if stop_at is not None:
        env["ANITA_STOP_AT"] = stop_at
    return env


def default_sigint() -> None:
    """Give the child SIGINT's default disposition, as a shell's foreground job has:
    a library imported by an earlier test may leave this pytest process ignoring
    SIGINT, and an ignored disposition is inherited through exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_script(script: str, *args: str, timeout: float = 600, stop_at: Optional[str] = None,
               **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(script_command(script, *args), cwd=REPO, env=script_env(stop_at, **env),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=default_sigint)


def start_script(script: str, *args: str, stop_at: Optional[str] = None) -> subprocess.Popen:
    return subprocess.Popen(script_command(script, *args), cwd=REPO, env=script_env(stop_at),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)


def metric_steps(output_dir: Path) -> List[int]:
    """The step of every training record (not eval records) in metrics.jsonl."""
    return [r["step"] for r in read_metrics(output_dir) if "loss" in r]
