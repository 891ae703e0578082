"""Where the kernels run, decided once when ``csrc_triton`` is first imported.

Triton reads ``TRITON_INTERPRET`` when each ``@triton.jit`` function is
*decorated*, so the decision has to be made before any kernel module of this
package is imported; ``csrc_triton/__init__.py`` imports this module first.

This must happen before triton itself is first imported (its own @jit helpers
are built at import time): import csrc_triton or anita_core before anything
that imports triton (bitsandbytes does), or set the variables below before
Python starts. A late import is detected and refused with an explanation.

Rule (first match wins):
  1. ``ANITA_TRITON_MODE=interpret`` -> the Triton interpreter (NumPy on CPU).
     ``ANITA_TRITON_MODE=compile``   -> compiled kernels (needs a CUDA GPU).
  2. ``TRITON_INTERPRET`` already set by the user -> respected as given.
  3. otherwise: compiled when ``torch.cuda.is_available()``, else interpreter.
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
from typing import Optional

import torch

_MODE_VARIABLE = "ANITA_TRITON_MODE"


def _decide_interpret() -> bool:
    mode = os.environ.get(_MODE_VARIABLE, "auto").strip().lower()
    if mode not in ("auto", "interpret", "compile"):
        raise ValueError(
            f"{_MODE_VARIABLE}={mode!r}: expected 'auto', 'interpret' or 'compile'")
    if mode == "interpret":
        return True
    if mode == "compile":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"{_MODE_VARIABLE}=compile but torch sees no CUDA device; "
                "unset it to fall back to the Triton interpreter")
        return False
    if "TRITON_INTERPRET" in os.environ:
        return os.environ["TRITON_INTERPRET"].strip().lower() in ("1", "true", "on", "yes")
    return not torch.cuda.is_available()


def _check_triton_not_built_for_the_other_mode(interpreting: bool) -> None:
    """Triton's own helpers (tl.max, tl.sum's combine functions, ...) are @jit
    functions built when triton is first imported; a kernel interpreted with
    helpers built for compilation (or the reverse) fails with an obscure error
    deep inside the interpreter. Say what happened instead."""
    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        return
    from triton.runtime.interpreter import InterpretedFunction
    built_interpreted = isinstance(standard.max, InterpretedFunction)
    if built_interpreted != interpreting:
        wanted = "the interpreter" if interpreting else "compiled kernels"
        raise ImportError(
            f"csrc_triton wants {wanted}, but triton was already imported in the other mode "
            "(some module, e.g. bitsandbytes, imported triton before csrc_triton). Import "
            "csrc_triton (or anita_core) first, or set TRITON_INTERPRET=1 / "
            f"{_MODE_VARIABLE}=interpret before starting Python.")


INTERPRETING: bool = _decide_interpret()
os.environ["TRITON_INTERPRET"] = "1" if INTERPRETING else "0"
_check_triton_not_built_for_the_other_mode(INTERPRETING)

import triton  # noqa: E402  (only now: TRITON_INTERPRET is decided above)
import triton.language as tl  # noqa: E402

# The interpreter cannot do bf16 arithmetic (NOTES.md): kernels upcast every
# tile to fp32 there. Compiled kernels feed fp16/bf16 tiles straight to the
# tensor cores and accumulate in fp32.
DOT_IN_FP32: bool = INTERPRETING

# Kernels index with int32 offsets; launchers refuse tensors this large.
MAX_INT32_NUMEL = 2**31 - 1

_poison_outputs = False


def set_poison_outputs(enabled: bool) -> bool:
    """Fill every kernel output with NaN (floats) or a sentinel (ints) before
    the kernel runs, so an element a kernel forgets to write fails a test.
    Returns the previous setting. Meant for tests; costs one fill per output."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, bool(enabled)
    return previous


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocate a tensor a kernel will overwrite completely (see set_poison_outputs)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison_outputs:
        if out.is_floating_point():
            out.fill_(float("nan"))
        elif dtype == torch.bool:
            out.fill_(True)
        else:
            out.fill_(torch.iinfo(dtype).max if dtype != torch.uint8 else 0xA5)
    return out


def upload(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device`` without making the host wait. A blocking copy from the CPU
    to a GPU waits for every queued kernel (torch synchronizes the stream after it),
    and so may a non_blocking one from pageable memory; a non_blocking copy from
    pinned memory does not (torch's pinned-memory cache keeps the staging buffer
    until the copy is done). On a CPU this is ``t.to(device)``."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def describe() -> str:
    """One line saying how kernels run in this process."""
    if INTERPRETING:
        return "Triton interpreter (CPU); kernels compute in fp32"
    return f"compiled Triton on {torch.cuda.get_device_name()}"


# -- whether this interpreter can run the kernels at all. triton <= 3.6's interpreter
# turns a loop bound (a 1-element array) into an int with int(array), which numpy >= 2.4
# refuses ("only 0-dimensional arrays can be converted to Python scalars"; triton issue
# 9171, fixed in later tritons). Every kernel with a runtime loop bound then fails deep
# inside the interpreter; the first launch says so in one line instead. Checked by
# running a one-program loop, not by version numbers, and only when something launches:
# a torch-backend run imports csrc_triton without interpreting anything.
_interpreter_checked = False


@triton.jit
def _loop_probe_kernel(out_ptr, n):
    total = 0
    for i in range(0, n):
        total += i
    tl.store(out_ptr, total)


def interpreter_problem() -> Optional[str]:
    """None when the interpreter runs a loop with a runtime bound, else why it cannot."""
    import numpy
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_probe_kernel[(1,)](out, 3)
    except Exception as err:   # noqa: BLE001 - any failure of the probe is the answer
        if "0-dimensional arrays" not in str(err):
            raise
        return (f"the Triton interpreter of triton {triton.__version__} cannot run with "
                f"numpy {numpy.__version__} (numpy >= 2.4 refuses its int() of a loop bound): "
                "install numpy<2.4 to run the kernels on a CPU, or use ANITA_BACKEND=torch")
    if out.item() != 3:
        return f"the Triton interpreter's probe loop summed 0..2 to {out.item()}, not 3"
    return None


def check_interpreter() -> None:
    """Raise RuntimeError (one line) when interpreter_problem() finds one; checked once."""
    global _interpreter_checked
    problem = interpreter_problem()
    if problem:
        raise RuntimeError(f"csrc_triton: {problem}")
    _interpreter_checked = True


# -- launch counting (bench/step_anatomy.py): the interpreter does not fire Triton's
# launch hooks, so every launch site reports itself here. One list append per
# launch when nobody counts; each active counter is a Counter keyed by kernel name.
_launch_listeners: list = []


def record_launch(kernel_name: str, flops: int = 0) -> None:
    """Called by every launch site just before it launches ``kernel_name``;
    ``flops`` = the multiply-add work of the launch (2 per MAC) where it is a matmul.
    Under the interpreter, the first call also checks that it can run loops here."""
    if INTERPRETING and not _interpreter_checked:
        check_interpreter()
    for listener in _launch_listeners:
        listener(kernel_name, flops)


@contextlib.contextmanager
def listen_to_launches(listener):
    """Call ``listener(kernel_name, flops)`` for every kernel launched inside the block."""
    _launch_listeners.append(listener)
    try:
        yield listener
    finally:
        _launch_listeners.remove(listener)


@contextlib.contextmanager
def count_launches():
    """A collections.Counter of the kernels launched inside the block, by name."""
    counter: collections.Counter = collections.Counter()
    with listen_to_launches(lambda name, flops: counter.update((name,))):
        yield counter
