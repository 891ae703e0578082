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
Unset (every normal run), ``reached`` costs one environment lookup.
"""
from __future__ import annotations

import os
import re
import signal

ENV = "ANITA_STOP_AT"
SIGNALS = ("SIGINT", "SIGTERM", "SIGKILL")
_SPEC = re.compile(r"(?P<signal>[A-Z]+)@(?P<point>import|loading|step:\d+(?:\.\d+)?|checkpoint:\d+)"
                   r"(?:,rank=(?P<rank>\d+))?")


def parse(spec: str):
    """(signal number, point, rank or None) of an ANITA_STOP_AT value; ValueError
    naming the variable if it is malformed."""
    match = _SPEC.fullmatch(spec.strip())
    if match is None or match["signal"] not in SIGNALS:
        raise ValueError(f"{ENV}={spec!r}: expected <{'|'.join(SIGNALS)}>@<import|loading|step:K|"
                         f"step:K.M|checkpoint:K>[,rank=R]")
    rank = int(match["rank"]) if match["rank"] is not None else None
    return getattr(signal, match["signal"]), match["point"], rank


def reached(point: str) -> None:
    """Called at each named point; signals this process if ANITA_STOP_AT names it."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    signum, wanted, rank = parse(spec)
    if wanted != point or (rank is not None and rank != int(os.environ.get("RANK", "0"))):
        return
    os.kill(os.getpid(), signum)
