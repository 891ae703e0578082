"""Argument validation shared by every launcher.

Each check raises ValueError naming the op, the argument and what was
expected, so a bad call never turns into a silent wrong answer or a crash deep
inside a kernel.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from ._runtime import INTERPRETING, MAX_INT32_NUMEL

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(op: str, name: str, t, *, dtypes: Optional[Sequence[torch.dtype]] = None,
                 ndim: Optional[int | Sequence[int]] = None,
                 shape: Optional[Sequence[Optional[int]]] = None,
                 contiguous: bool = True) -> torch.Tensor:
    """Validate one tensor argument. ``shape`` entries of None match any size."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{op}: argument '{name}' has dtype {t.dtype}; "
                         f"expected one of: {_dtype_names(dtypes)}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{op}: argument '{name}' has {t.dim()} dims (shape "
                             f"{tuple(t.shape)}); expected {' or '.join(map(str, allowed))}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{op}: argument '{name}' has shape {tuple(t.shape)}; expected {want}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: argument '{name}' must be contiguous "
                         f"(shape {tuple(t.shape)}, stride {t.stride()}); call .contiguous()")
    if t.numel() > MAX_INT32_NUMEL:
        raise ValueError(f"{op}: argument '{name}' has {t.numel()} elements, more than the "
                         f"{MAX_INT32_NUMEL} that 32-bit kernel indexing supports; split it")
    _check_device(op, name, t)
    return t


def _check_device(op: str, name: str, t: torch.Tensor) -> None:
    if INTERPRETING:
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{op}: argument '{name}' is on {t.device}; the Triton "
                             "interpreter takes cpu (or cuda) tensors")
    elif t.device.type != "cuda":
        raise ValueError(f"{op}: argument '{name}' is on {t.device}; compiled Triton "
                         "kernels need CUDA tensors (or set ANITA_TRITON_MODE=interpret)")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"'{n}' on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: arguments must share one device, got {listing}")


def check_numel(op: str, what: str, numel: int) -> None:
    """For sizes a kernel derives (e.g. an output of tokens x vocab)."""
    if numel > MAX_INT32_NUMEL:
        raise ValueError(f"{op}: {what} would have {numel} elements, more than the "
                         f"{MAX_INT32_NUMEL} that 32-bit kernel indexing supports")
