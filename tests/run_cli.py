"""Running train_sft.py / train_dpo.py as a user does: a subprocess in the
repository root, this checkout's code first on the path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

from anita_core.train.run_folder import read_metrics

REPO = Path(__file__).resolve().parents[1]
# a few real QLoRA steps on the bundled tiny model, kept short for a 2-core CPU
TINY = ["--no-progress", "--eval-split", "0", "--batch-size", "2", "--max-seq-length", "32",
        "--max-samples", "40"]


def script_command(script: str, *args: str) -> List[str]:
    return [sys.executable, str(REPO / script), *map(str, args)]


def script_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def run_script(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(script_command(script, *args), cwd=REPO, env=script_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_script(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(script_command(script, *args), cwd=REPO, env=script_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def metric_steps(output_dir: Path) -> List[int]:
    """The step of every training record (not eval records) in metrics.jsonl."""
    return [r["step"] for r in read_metrics(output_dir) if "loss" in r]
