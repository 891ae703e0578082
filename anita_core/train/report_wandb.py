"""--report-to wandb: one Weights & Biases run per anita run, its history the records of
metrics.jsonl at their own steps.

Names: the project is --wandb-project, else $WANDB_PROJECT, else "anita"; the run's
name --run-name, else $WANDB_NAME, else the output folder's name. W&B's files go to
OUTPUT_DIR/wandb unless $WANDB_DIR says otherwise; the mode is W&B's own
($WANDB_MODE: online by default, offline keeps everything on disk for `wandb sync`).
The W&B run's id is kept in OUTPUT_DIR/wandb-run.json.

A resume continues the same W&B run, rewound (``resume_from="<id>?_step=<s>"``) to the
step before the last one metrics.jsonl keeps after its cut-back, and logs that last
row again from metrics.jsonl: W&B writes a step's row when a later step arrives (so
that a step's train and eval records make one row), so the last row a killed process
logged may never have reached its files, and a rewind must not point past what the
run holds. W&B cannot change what an offline run already wrote, so each process
writes a segment of its own (``offline-run-<time>-<id>``) whose run record carries the
rewind point; ``wandb sync`` uploads a run's segments in the order they started and
the server truncates the history at that point before the new rows, so the synced run
holds each step once, as metrics.jsonl does. Online, the rewind happens at once.
(Rewinding is a W&B server feature in preview; where it is not enabled, W&B refuses
the segment when it syncs, and metrics.jsonl and TensorBoard still hold the run.)
Without an earlier W&B run to continue (the first start, or a resume of a run that did
not log to W&B) a new one starts, holding metrics.jsonl's rows so far.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

from anita_core.cli import environment
from anita_core.train.run_checkpoint import write_text_atomically
from anita_core.train.run_folder import WANDB_DIR, WANDB_RUN_FILE


DEFAULT_WANDB_PROJECT = "anita"


class WandbRun:
    name = "wandb"

    def __init__(self, output_dir: Path, *, project: Optional[str], run_name: Optional[str],
                 config: dict):
        self.output_dir = Path(output_dir)
        env = environment.wandb()
        self.project = project or env.project or DEFAULT_WANDB_PROJECT
        self.run_name = run_name or env.name or self.output_dir.resolve().name
        self.wandb_dir_set = env.dir is not None
        self.config = config
        self.run = None

    def _earlier_run(self) -> Optional[str]:
        """The id of this folder's W&B run, if it logged to W&B and in this project."""
        path = self.output_dir / WANDB_RUN_FILE
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return saved.get("id") if saved.get("project") == self.project else None

    def open(self, step: int, rows: Dict[int, Dict[str, float]]) -> None:
        """Continue or start the run at ``step``; ``rows``: metrics.jsonl's rows up to it."""
        import wandb
        kwargs = dict(project=self.project, name=self.run_name, config=self.config,
                      # anita's stdout and stderr stay as they are (no console capture)
                      settings=wandb.Settings(console="off"))
        if not self.wandb_dir_set:
            (self.output_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(self.output_dir)          # W&B adds its own wandb/ folder
        earlier, steps = self._earlier_run(), sorted(rows)
        replay = steps
        if earlier and steps:
            # steps start at 1: a rewind to 0 keeps nothing of the earlier history
            kwargs["resume_from"] = f"{earlier}?_step={steps[-2] if len(steps) > 1 else 0}"
            replay = steps[-1:]
        try:
            self.run = wandb.init(**kwargs)
        except Exception as e:      # wandb's own errors (no login, a bad project name, ...)
            raise RuntimeError(f"W&B could not start ({type(e).__name__}: {e}); log in with "
                              f"`wandb login`, or set WANDB_MODE=offline and sync later with "
                              f"`wandb sync`") from None
        write_text_atomically(self.output_dir / WANDB_RUN_FILE, json.dumps(
            {"id": self.run.id, "project": self.project, "name": self.run_name}) + "\n")
        for s in replay:
            self.run.log(rows[s], step=s)

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        # an explicit step: W&B's own counter would drift from anita's on a resume. A
        # step's train and eval records go into one history row (W&B commits a row when
        # a later step arrives, or at finish)
        self.run.log(metrics, step=step)

    def close(self, failed: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
