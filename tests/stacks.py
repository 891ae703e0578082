"""The package stacks the kernels are checked under (setup.py's supported range).

  pinned   this interpreter as installed: torch 2.13, triton 3.9 (the newest supported).
  oldest   the same interpreter with triton 3.6 (the lent GPU machine's, the oldest
           supported) put in front of it on PYTHONPATH, from a folder of its own inside
           the venv, with numpy 2.3.5: triton 3.6's interpreter cannot run with numpy >=
           2.4 (csrc_triton._runtime.interpreter_problem). The README's test command
           installs that folder; nothing is downloaded while the tests run.

Tests that use the oldest stack run a subprocess with ``stack_env`` (the kernels must be
compiled or interpreted by that triton from the first import on).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Stack:
    name: str
    overlay: Optional[Path]          # a pip --target folder put first on PYTHONPATH
    packages: Tuple[str, ...] = ()   # what the overlay holds (its install command)

    @property
    def install_command(self) -> str:
        return (f"{sys.executable} -m pip install --no-deps --target {self.overlay} "
                + " ".join(self.packages))


PINNED = Stack("pinned", None)
OLDEST = Stack("oldest", Path(sys.prefix) / "stack-oldest", ("triton==3.6.0", "numpy==2.3.5"))
STACKS = (PINNED, OLDEST)


def require(stack: Stack) -> None:
    """Fail (never skip) when the oldest stack's folder is missing: the README's test
    command installs it, and a check that did not run is no check."""
    if stack.overlay is not None and not (stack.overlay / "triton").is_dir():
        pytest.fail(f"{stack.overlay} holds no triton: install the oldest supported stack with "
                    f"`{stack.install_command}` (the README's test command does)")


def stack_env(stack: Stack, **extra: str) -> Dict[str, str]:
    """The environment of a subprocess that runs ``stack`` from the repository root."""
    env = {k: v for k, v in os.environ.items() if k != "ANITA_TRITON_MODE"}
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if stack.overlay is not None:
        paths.insert(0, str(stack.overlay))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env
