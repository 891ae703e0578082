"""Argument validation shared by every launcher, and the choice of index width.

Each check raises ValueError naming the op, the argument and what was
expected, so a bad call never turns into a silent wrong answer or a crash deep
inside a kernel.

Index width. A kernel that indexes activations ([T, hidden], [T, intermediate],
[B, S, heads, D]) takes an ``INDEX_64`` constexpr: its launcher sets it when some
element offset of an argument can pass 2^31 - 1 (``wide_index``), and the kernel then
widens its row index to int64 once, before the row base offset is formed. The
common case compiles exactly as a 32-bit kernel (the same SASS); only the launches
that need it pay for 64-bit address arithmetic. Such arguments are checked with
``max_numel=None``; every other tensor keeps the 32-bit bound of ``check_tensor``.
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
                 contiguous: bool = True,
                 max_numel: Optional[int] = MAX_INT32_NUMEL) -> torch.Tensor:
    """Validate one tensor argument. ``shape`` entries of None match any size;
    ``max_numel=None`` for an argument its kernel indexes in 64 bits when it must."""
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
    if max_numel is not None and t.numel() > max_numel:
        raise ValueError(f"{op}: argument '{name}' has {t.numel()} elements, more than the "
                         f"{max_numel} that 32-bit kernel indexing supports; split it")
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


def index_span(t: torch.Tensor) -> int:
    """Elements from ``t``'s first element to its last, inclusive (1 + sum (size - 1) *
    stride; 0 when empty): the largest offset a kernel adds to its data pointer, + 1."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def wide_index(*tensors: Optional[torch.Tensor]) -> bool:
    """INDEX_64 for a launch over these tensors: whether any offset can pass 2^31 - 1."""
    return any(t is not None and index_span(t) > MAX_INT32_NUMEL for t in tensors)


def check_rows(op: str, name: str, t, *, dtypes: Optional[Sequence[torch.dtype]] = None,
               shape: Optional[Sequence[Optional[int]]] = None) -> int:
    """Validate a tensor read or written as rows of its last dim, each row contiguous,
    rows any distance apart (a column slice of a wider buffer, e.g. the gate half of the
    fused gate/up output); the leading dims must merge into one row index. Returns the
    row stride in elements. No element bound: its kernels index in 64 bits when needed."""
    check_tensor(op, name, t, dtypes=dtypes, shape=shape, contiguous=False, max_numel=None)
    last = t.shape[-1] if t.dim() else 1
    if t.numel() == 0:
        return max(last, 1)
    try:
        rows = t.view(-1, last)
    except RuntimeError:
        rows = None
    if rows is None or (last > 1 and rows.stride(1) != 1):
        raise ValueError(f"{op}: argument '{name}' must be rows of contiguous elements "
                         f"(shape {tuple(t.shape)}, stride {t.stride()}); call .contiguous()")
    return rows.stride(0) if rows.shape[0] > 1 else max(last, 1)


def check_token_rows(op: str, name: str, t: torch.Tensor) -> int:
    """For a [B, S, heads, D] tensor (validated otherwise with contiguous=False): each
    token's heads x D must be contiguous, tokens any distance apart (e.g. q as a column
    slice of the fused q/k/v output). Returns the token stride in elements."""
    batch, seq, heads, dim = t.shape
    s_batch, s_token, s_head, s_dim = t.stride()
    token = s_token if seq > 1 else (s_batch if batch > 1 else heads * dim)
    if not ((dim <= 1 or s_dim == 1) and (heads <= 1 or s_head == dim)
            and (batch <= 1 or seq <= 1 or s_batch == seq * s_token)):
        raise ValueError(f"{op}: argument '{name}' must hold each token's heads x head dim "
                         f"contiguously (shape {tuple(t.shape)}, stride {t.stride()}); "
                         "call .contiguous()")
    return token
