"""One run per output folder: an exclusive lock, the rule that a folder already
holding a run is reused only with --resume or --overwrite, and the metrics
records cut back to a checkpoint's step on resume.

The lock is ``fcntl.flock`` on ``<output_dir>/run.lock`` (which holds the
holder's PID, for the message a second process gets). The kernel releases it
when the holding process ends in any way, kill -9 included, so a stale lock
file never blocks a later run.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import List, Optional

from anita_core.train.run_checkpoint import write_text_atomically
from anita_core.train.storage_faults import disk_full_guard

LOCK_FILE = "run.lock"
METRICS_FILE = "metrics.jsonl"
RUN_ARTIFACTS = (METRICS_FILE, "checkpoints", "adapter")   # what makes a folder hold a run
# what a run draws and reports besides (anita_core/train/report*.py, curves.py)
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"                 # W&B's own files (unless $WANDB_DIR), offline runs among them
WANDB_RUN_FILE = "wandb-run.json"   # the id of the W&B run a resume continues
CURVES_FILE = "curves.png"
# what --overwrite removes with the run: its W&B folder stays, since offline runs
# there may not be synced yet (the next run logs to a new W&B run, not into them)
REPORT_OUTPUTS = (TENSORBOARD_DIR, WANDB_RUN_FILE, CURVES_FILE)


class RunFolderError(RuntimeError):
    """The output folder cannot be used as asked (locked, or holds another run)."""


class RunLock:
    """Exclusive lock on an output folder for this process's lifetime (or until release)."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(
                    f"{self.output_dir}: another run (PID {holder}) is using this output folder; "
                    f"wait for it to finish or choose another --output-dir") from None
            raise
        try:
            with disk_full_guard("the run lock", self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)      # closing the descriptor releases the flock
            self._fd = None

    __del__ = release


def existing_run_artifacts(output_dir: Path) -> List[str]:
    return [name for name in RUN_ARTIFACTS if (Path(output_dir) / name).exists()]


def check_output_folder(output_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that holds a run unless resuming it or asked to overwrite it."""
    found = existing_run_artifacts(output_dir)
    if found and not resume and not overwrite:
        raise RunFolderError(
            f"{output_dir}: already holds a run ({', '.join(found)}); continue it with --resume, "
            f"replace it with --overwrite, or choose another --output-dir")


def prepare_output_folder(output_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that holds a run unless resuming it or asked to overwrite it;
    with overwrite, remove the earlier run's records, checkpoints and adapter, its
    TensorBoard log and its curves."""
    check_output_folder(output_dir, resume=resume, overwrite=overwrite)
    found = existing_run_artifacts(output_dir)
    if not found or resume:
        return
    found += [name for name in REPORT_OUTPUTS if (Path(output_dir) / name).exists()]
    for name in found:
        path = Path(output_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def append_metrics(output_dir: Path, record: dict) -> None:
    """Add one record to metrics.jsonl. A write that fails part-way (a full disk)
    is cut off again, so the file holds whole lines only; the error is raised
    (DiskFull for a full disk)."""
    path = Path(output_dir) / METRICS_FILE
    data = (json.dumps(record) + "\n").encode()
    with disk_full_guard("metrics", path, len(data)):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except BaseException:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


def read_metrics(output_dir: Path) -> List[dict]:
    """The records of metrics.jsonl (a last line cut short by a kill is left out)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(output_dir: Path, step: int) -> int:
    """Keep only the metrics records of steps <= ``step`` (a resume replays the
    later ones), rewriting the file atomically. Returns how many lines were dropped."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in read_metrics(output_dir) if r.get("step", 0) <= step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    with disk_full_guard("metrics", path, len(text.encode())):
        write_text_atomically(path, text)
    return len(lines) - len(kept)
