"""The start of a run, before anything expensive loads: the output folder locked
(one run at a time), what a killed run left half-written removed, a folder holding
another run refused unless --resume / --overwrite, the checkpoint to resume from
chosen (its files verified), and the adapter folders that flags name checked. Under
torchrun rank 0 decides and the other ranks get its outcome."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from anita_core.train.cli import usage_error
from anita_core.train.run_checkpoint import exit_on_disk_full


@dataclass
class RunStart:
    output_dir: Path
    resume_from: Optional[Path]
    lock: object


def start_run(args, output_dir: str, log, dist=None) -> RunStart:
    """``start_run_here`` on rank 0 (the run folder's owner); the other ranks get
    its outcome: the checkpoint to resume from, or its exit code."""
    if dist is None or not dist.active:
        return start_run_here(args, output_dir, log)
    from anita_core.train.distributed import broadcast_object
    run, outcome = None, None
    if dist.is_main:
        try:
            run = start_run_here(args, output_dir, log)
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


def start_run_here(args, output_dir: str, log) -> RunStart:
    """Before anything expensive: lock the output folder (one run at a time),
    remove what a killed run left half-written, refuse a folder holding another
    run unless --resume / --overwrite, find the checkpoint to resume from (its
    files verified) and check the adapter folders that flags name."""
    from anita_core.train.file_manifest import adapter_flags_problem
    from anita_core.train.run_checkpoint import choose_resume_checkpoint, remove_orphaned_temp_files
    from anita_core.train.run_folder import RunFolderError, RunLock, prepare_output_folder
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        usage_error(f"--output-dir {out}: exists and is not a folder")
    explicit = None
    if args.resume and args.resume != "latest":
        explicit = Path(args.resume)
        if not explicit.is_dir():
            usage_error(f"--resume {args.resume}: no such checkpoint folder")
    problem = adapter_flags_problem(args)
    if problem:
        usage_error(problem)
    try:
        with exit_on_disk_full(out, log):
            lock = RunLock(out).acquire()
        for path in remove_orphaned_temp_files(out):
            log(f"removed {path}, left half-written by a run that was killed")
        prepare_output_folder(out, resume=bool(args.resume), overwrite=args.overwrite)
    except RunFolderError as e:
        usage_error(str(e))
    resume_from = None
    if args.resume:
        try:
            resume_from = choose_resume_checkpoint(out, explicit, log)
        except (ValueError, FileNotFoundError) as e:
            lock.release()
            usage_error(f"--resume: {e}")
    return RunStart(out, resume_from, lock)
