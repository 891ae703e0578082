"""The start of a run, before anything expensive loads: the output folder locked
(one run at a time), what a killed run left half-written removed, a folder holding
another run refused unless --resume / --overwrite, and the checkpoint to resume from
chosen (its files verified). Under torchrun rank 0 decides and the other ranks get
its outcome.

A run refused after its start (a bad data row, a memory budget too small...) leaves
the output folder as it found it: ``RunStart.undone_if_refused`` removes the lock file
and the folders its start made (while still empty), and --overwrite removes the
earlier run only when training begins (``RunStart.begin``), not when the run starts."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional

from anita_core.cli.common import usage_error
from anita_core.train.run_checkpoint import exit_on_disk_full


@dataclass
class RunStart:
    output_dir: Path
    resume_from: Optional[Path]
    lock: object
    made: List[Path] = field(default_factory=list)   # what the start created, outermost first
    overwrite: bool = False

    def begin(self) -> None:
        """Training begins: --overwrite's earlier run (its metrics, checkpoints and
        adapter) is removed now; from here on the folder is this run's."""
        from anita_core.train.run_folder import prepare_output_folder
        if self.lock is not None and self.overwrite:
            prepare_output_folder(self.output_dir, resume=False, overwrite=True)
        self.made = []

    def abandon(self) -> None:
        """A refusal before training: the lock released, and the lock file and the
        folders this start made removed (a folder only while empty)."""
        if self.lock is not None:
            self.lock.release()
        for path in reversed(self.made):
            try:
                path.rmdir() if path.is_dir() else path.unlink()
            except OSError:         # something else was put there meanwhile: it stays
                pass
        self.made = []

    @contextmanager
    def undone_if_refused(self) -> Iterator["RunStart"]:
        """Around what runs between the start and ``begin``: any way out of it (a
        refusal's SystemExit, Ctrl-C, an error) abandons the run, then goes on."""
        try:
            yield self
        except BaseException:
            self.abandon()
            raise


def start_run(output_dir: str, log, dist=None, *, resume: Optional[str] = None,
              overwrite: bool = False) -> RunStart:
    """``start_run_here`` on rank 0 (the run folder's owner); the other ranks get
    its outcome: the checkpoint to resume from, or its exit code."""
    if dist is None or not dist.active:
        return start_run_here(output_dir, log, resume=resume, overwrite=overwrite)
    from anita_core.train.distributed import broadcast_object
    run, outcome = None, None
    if dist.is_main:
        try:
            run = start_run_here(output_dir, log, resume=resume, overwrite=overwrite)
            outcome = (0, str(run.resume_from) if run.resume_from else None)
        except SystemExit as e:
            outcome = (e.code, None)
            broadcast_object(dist, outcome)
            raise
    outcome = broadcast_object(dist, outcome)
    if run is not None:
        return run
    if outcome[0]:
        raise SystemExit(outcome[0])
    return RunStart(Path(output_dir), Path(outcome[1]) if outcome[1] else None, None)


def start_run_here(output_dir: str, log, *, resume: Optional[str] = None,
                   overwrite: bool = False) -> RunStart:
    """Before anything expensive: lock the output folder (one run at a time),
    remove what a killed run left half-written, refuse a folder holding another
    run unless --resume / --overwrite, and find the checkpoint to resume from (its
    files verified)."""
    from anita_core.train.run_checkpoint import choose_resume_checkpoint, remove_orphaned_temp_files
    from anita_core.train.run_folder import LOCK_FILE, RunFolderError, RunLock, check_output_folder
    out = Path(output_dir)
    explicit = Path(resume) if resume and resume != "latest" else None
    try:
        if out.exists() and not out.is_dir():
            usage_error(f"--output-dir {out}: exists and is not a folder")
        if explicit is not None and not explicit.is_dir():
            usage_error(f"--resume {resume}: no such checkpoint folder")
        made = [p for p in reversed([out, *out.parents]) if not p.exists()]
        if not (out / LOCK_FILE).exists():
            made.append(out / LOCK_FILE)
    except OSError as e:           # a name too long, no permission to look...
        usage_error(f"--output-dir {out}: cannot be used ({e.strerror or e})")
    run = RunStart(out, None, None, made, overwrite=overwrite)
    with run.undone_if_refused():
        try:
            with exit_on_disk_full(out, log):
                run.lock = RunLock(out).acquire()
            for path in remove_orphaned_temp_files(out):
                log(f"removed {path}, left half-written by a run that was killed")
            check_output_folder(out, resume=bool(resume), overwrite=overwrite)
        except RunFolderError as e:
            usage_error(str(e))
        except OSError as e:       # under a file, a name too long, no permission...
            usage_error(f"--output-dir {out}: cannot be used ({e.strerror or e})")
        if resume:
            try:
                run.resume_from = choose_resume_checkpoint(out, explicit, log)
            except (ValueError, FileNotFoundError) as e:
                usage_error(f"--resume: {e}")
    return run
