"""Stops by signal: SIGINT and SIGTERM raise Interrupted in the main thread (the
trainer then checkpoints and the script exits 128 + signum); a signal that arrives
inside an optimizer update waits for its end, so a checkpoint never holds
half-updated weights."""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Callable, List, Optional


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal (SIGINT or SIGTERM); handled like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Deferral:
    """Signals that arrive inside an update (optimizer step to step count) wait for
    its end: a checkpoint must never hold half-updated weights."""
    depth = 0
    pending: Optional[int] = None


@contextmanager
def signals_deferred():
    _Deferral.depth += 1
    try:
        yield
    finally:
        _Deferral.depth -= 1
    if _Deferral.depth == 0 and _Deferral.pending is not None:
        signum, _Deferral.pending = _Deferral.pending, None
        raise Interrupted(signum)


@contextmanager
def stop_on_signals(log: Callable[[str], None], signums=(signal.SIGINT, signal.SIGTERM)):
    """While active, SIGINT and SIGTERM raise Interrupted in the main thread, so
    both checkpoint the same way (inside an update, once the update is done);
    signals that arrive after the first are noted and ignored, so that the
    checkpoint being written is not cut short."""
    received: List[int] = []

    def handler(signum, frame):
        if received:
            log(f"{signal.Signals(signum).name} received while stopping; finishing the checkpoint")
            return
        received.append(signum)
        if _Deferral.depth:
            _Deferral.pending = signum
            return
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
