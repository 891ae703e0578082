"""What a recipe's ``run`` returns."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunResult:
    exit_code: int          # the script's exit code (0, or anita_core.cli.common's EXIT_*)
    output_dir: str         # the run folder (metrics.jsonl, checkpoints, adapter/)
