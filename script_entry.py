"""How train_sft.py and train_dpo.py start and end, importing nothing heavy itself.

Ctrl-C before training starts has no work to lose: the script ends with one line
and exit code 130. During training the trainer's own handler checkpoints first
(anita_core.train.trainer.stop_on_signals). torch is imported here with SIGINT
deferred, because a KeyboardInterrupt raised while torch's C++ extensions
initialize aborts the interpreter (pybind11's error_already_set reaches
std::terminate: exit -6, no message of ours).

ANITA_STOP_AT=SIGINT@import (anita_core/train/stop_points.py) sends that Ctrl-C
while torch imports, for tests; that module is not imported here, since importing
anita_core imports torch."""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable


def run(main: Callable[[], int], script: str) -> int:
    deferred = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: deferred.append(signum))
    try:
        if os.environ.get("ANITA_STOP_AT", "").strip() == "SIGINT@import":
            os.kill(os.getpid(), signal.SIGINT)
        import torch  # noqa: F401  (see the module docstring)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        if deferred:
            raise KeyboardInterrupt
        return main()
    except KeyboardInterrupt:   # while the model or data loads: no training to keep yet
        print(f"{script}: interrupted before training started; nothing to save", file=sys.stderr)
        return 130
