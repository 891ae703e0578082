"""Reading back what a run reported, with each backend's own reader: TensorBoard's
event files (tensorboard's loader and EventAccumulator) and W&B's offline runs (the
records of each .wandb file, as `wandb leet inspect --json` prints them); and the
curves PNG (its pixel size and the series its text chunk names, read with Pillow).
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

from anita_core.train.curves import SERIES_KEY
from anita_core.train.report import backend_metrics
from anita_core.train.report_tensorboard import event_files
from anita_core.train.run_folder import read_metrics


def expected_rows(output_dir: Path) -> Dict[int, Dict[str, float]]:
    """step -> every metric metrics.jsonl holds for it, under the backends' names (a
    step's train and eval records together); fails on a step logged twice."""
    rows: Dict[int, Dict[str, float]] = defaultdict(dict)
    for record in read_metrics(output_dir):
        metrics = backend_metrics(record)
        assert not set(metrics) & set(rows[record["step"]]), f"step {record['step']} twice in metrics.jsonl"
        rows[record["step"]].update(metrics)
    return dict(rows)


def tensorboard_scalars(log_dir: Path) -> List[Tuple[str, int, float, float]]:
    """(tag, step, wall time, value) of every scalar event of every event file, as
    stored (no purging, no deduplication): what any reader of the files can see."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    found = []
    for path in event_files(log_dir):
        for event in LegacyEventFileLoader(str(path)).Load():
            for value in event.summary.value:
                found.append((value.tag, event.step, event.wall_time, value.simple_value))
    return found


def tensorboard_view(log_dir: Path) -> Dict[int, Dict[str, float]]:
    """step -> tag -> value, as TensorBoard's EventAccumulator (every event kept) reads them."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    accumulator = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})
    accumulator.Reload()
    rows: Dict[int, Dict[str, float]] = defaultdict(dict)
    for tag in accumulator.Tags()[SCALARS]:
        for event in accumulator.Scalars(tag):
            rows[event.step][tag] = event.value
    return dict(rows)


def wandb_records(wandb_file: Path) -> List[dict]:
    """The records of one .wandb transaction log, read by W&B's own reader."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_file)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def wandb_segments(wandb_dir: Path) -> List[dict]:
    """Each offline run folder of ``wandb_dir`` in the order they started (their names
    begin with the start time, as `wandb sync` orders a run's files): its run record
    and its history rows, step -> metrics (W&B's own _-keys left out)."""
    segments = []
    for folder in sorted(Path(wandb_dir).glob("offline-run-*")):
        (log,) = folder.glob("run-*.wandb")
        records = wandb_records(log)
        (run,) = [r["run"] for r in records if r["type"] == "run"]
        history = {}
        for r in records:
            if r["type"] == "history":
                step = int(r["history"]["step"]["num"])
                assert step not in history, f"{folder.name}: step {step} twice"
                history[step] = {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
        segments.append({"folder": folder.name, "run": run, "history": history})
    return segments


def wandb_synced_history(segments: List[dict]) -> Dict[int, Dict[str, float]]:
    """The history a run holds once its segments are synced in order: each segment that
    rewinds (its run record's branch point) first cuts the history after that step."""
    history: Dict[int, Dict[str, float]] = {}
    for segment in segments:
        point = segment["run"].get("branch_point")
        if point:
            assert point["metric"] == "_step" and point["run"] == segment["run"]["run_id"], point
            history = {s: row for s, row in history.items() if s <= int(point["value"])}
        for step, row in segment["history"].items():
            assert step not in history, f"{segment['folder']}: step {step} already in the run"
            history[step] = row
    return history


def png_facts(path: Path) -> Tuple[Tuple[int, int], Dict[str, Dict[str, int]]]:
    """((width, height) in pixels, panel -> series -> points) of a curves PNG."""
    from PIL import Image
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size, json.loads(image.text[SERIES_KEY])
