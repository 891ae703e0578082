"""Stop points: a run that stops itself at a chosen moment (for tests).

A signal sent from outside reaches a training process at a moment that a clock
and the machine's load pick; a test that depends on that moment passes or fails
by chance. ``ANITA_STOP_AT`` names the moment instead:

    ANITA_STOP_AT="<SIGNAL>@<point>[,rank=<r>]"

makes the process send itself SIGNAL (SIGINT, SIGTERM or SIGKILL, by name) when
it reaches <point>, on rank r only if given (torchrun's RANK; one process is
rank 0):

    import         while torch is being imported at start-up (script_entry.py)
    loading        just before the base model loads
    step:K         once optimizer step K is done: logged, evaluated and
                   checkpointed if due
    step:K.M       inside step K, once its micro-batch M (1-based, on this rank) ran
    checkpoint:K   while checkpoint K is written: its files complete in the hidden
                   temp folder, not yet renamed into place

The signal is real (``os.kill`` of the process's own pid), so the handlers that
run are the ones a user's Ctrl-C, a scheduler's SIGTERM or a kill -9 meet.

    ANITA_STOP_AT="ENOSPC@checkpoint:K"

instead raises, at that point, the OSError a full disk gives (errno ENOSPC), for
testing the disk-full path where no small file system can be mounted. It is the
one fault anita injects into its own writer; the error is the one the kernel's
would be, and everything after it (the guard that names the write, the removal
of the partial folder, the message, the exit code) runs as for a real full disk.
Unset (every normal run), ``reached`` costs one environment lookup.
"""
from __future__ import annotations

import errno
import os
import re
import signal

from anita_core.cli import environment

ENV = environment.STOP_AT_ENV
SIGNALS = ("SIGINT", "SIGTERM", "SIGKILL")
DISK_FULL = "ENOSPC"          # not a signal: the OSError of a full disk, at checkpoint:K only
_SPEC = re.compile(r"(?P<signal>[A-Z]+)@(?P<point>import|loading|step:\d+(?:\.\d+)?|checkpoint:\d+)"
                   r"(?:,rank=(?P<rank>\d+))?")


def parse(spec: str):
    """(signal number, or DISK_FULL; point; rank or None) of an ANITA_STOP_AT
    value; ValueError naming the variable if it is malformed."""
    match = _SPEC.fullmatch(spec.strip())
    disk_full = match is not None and match["signal"] == DISK_FULL
    if match is None or not (match["signal"] in SIGNALS or disk_full) or (
            disk_full and not match["point"].startswith("checkpoint:")):
        raise ValueError(f"{ENV}={spec!r}: expected <{'|'.join(SIGNALS)}>@<import|loading|step:K|"
                         f"step:K.M|checkpoint:K>[,rank=R], or {DISK_FULL}@checkpoint:K")
    rank = int(match["rank"]) if match["rank"] is not None else None
    action = DISK_FULL if disk_full else getattr(signal, match["signal"])
    return action, match["point"], rank


def reached(point: str) -> None:
    """Called at each named point; signals this process (or raises the disk-full
    OSError) if ANITA_STOP_AT names it."""
    spec = environment.stop_at()
    if not spec:
        return
    action, wanted, rank = parse(spec)
    if wanted != point or (rank is not None and rank != environment.process_rank()):
        return
    if action == DISK_FULL:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({ENV}={spec})")
    os.kill(os.getpid(), action)
