"""nf4_matmul launchers in torch: y = x W^T and dx = dy W, W dequantized to fp32.

The operands are taken in fp32 whatever x's dtype (as the kernels do under the
interpreter), the product accumulates in fp32 and is rounded once to the input's dtype.
This backend has one path, csrc_triton.nf4_dense's "dequant": ``choose_path`` always
says so, and ``dense_w`` (what ``dequantize_for_matmul`` returned, e.g. held by a
block's backward for its recompute and dX) replaces the cache lookup.

An optional frozen ``bias`` [N] (x's dtype) is added to the fp32 product before the
rounding, as the kernels add it; the backward is the same with or without it (b has
no x in it, and gets no gradient).
"""
from __future__ import annotations

from typing import Optional

import torch

from csrc_triton.checks import FLOAT_DTYPES, check_same_device, check_tensor
from csrc_triton.nf4 import NF4Weight
from csrc_triton.nf4_matmul import check_bias, check_nf4_weight, check_swiglu_input

from .nf4 import dequantize_fp32
from .swiglu import swiglu_backward

PATH = "dequant"


def choose_path(op: str, m: int, path: Optional[str] = None,
                dtype: Optional[torch.dtype] = None) -> str:
    """Always "dequant" (an explicit other path is refused, naming it)."""
    if path not in (None, PATH):
        raise ValueError(f"{op}: argument 'path' is {path!r}; the torch backend has only {PATH!r}")
    return PATH


def dequantize_for_matmul(w: NF4Weight, activation_dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in fp32, the dtype this backend multiplies in (the cached tensor: read only)."""
    return dequantize_fp32(w)


def dense_weight(op: str, w: NF4Weight, dense_w: Optional[torch.Tensor],
                 path: Optional[str]) -> torch.Tensor:
    """The fp32 W a launcher multiplies by: ``dense_w`` when the caller holds it."""
    choose_path(op, 0, path)
    if dense_w is None:
        return dequantize_fp32(w)
    check_tensor(op, "dense_w", dense_w, dtypes=(torch.float32,), shape=tuple(w.shape))
    return dense_w


def with_bias(y32: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The fp32 product y32 [M, N] with the frozen bias [N] added in place (or as is)."""
    return y32 if bias is None else y32.add_(bias.float())


def nf4_matmul_forward(x2d: torch.Tensor, w: NF4Weight, *, dense_w: Optional[torch.Tensor] = None,
                       path: Optional[str] = None,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y2d = x2d @ W^T (+ bias) for x2d [M, K] fp32/fp16/bf16, W [N, K] in NF4 and an
    optional frozen bias [N] in x2d's dtype; y2d in x2d's dtype."""
    op = "nf4_matmul_forward"
    check_nf4_weight(op, w)
    check_tensor(op, "x2d", x2d, dtypes=FLOAT_DTYPES, ndim=2, shape=(None, w.shape[1]))
    check_same_device(op, x2d=x2d, w=w.packed)
    check_bias(op, bias, w.shape[0], x2d.dtype, x2d.device)
    y = x2d.float() @ dense_weight(op, w, dense_w, path).t()
    return with_bias(y, bias).to(x2d.dtype)


def input_grad_or_swiglu(dx32: torch.Tensor, dtype: torch.dtype,
                         swiglu_input: Optional[tuple]) -> torch.Tensor:
    """dx (fp32) rounded to ``dtype``, or with swiglu_input = (gate, up), x = silu(gate) * up,
    [dgate, dup] computed from the fp32 dx (csrc_triton.nf4_matmul.launch_backward_input)."""
    if swiglu_input is None:
        return dx32.to(dtype)
    return torch.cat(swiglu_backward(dx32, *swiglu_input), dim=1)


def nf4_matmul_backward_input(dy2d: torch.Tensor, w: NF4Weight, *,
                              dense_w: Optional[torch.Tensor] = None,
                              path: Optional[str] = None,
                              swiglu_input: Optional[tuple] = None) -> torch.Tensor:
    """dx2d = dy2d @ W for dy2d [M, N] and W [N, K] in NF4; dx2d in dy2d's dtype
    (with ``swiglu_input``: [dgate, dup], see input_grad_or_swiglu)."""
    op = "nf4_matmul_backward_input"
    check_nf4_weight(op, w)
    check_tensor(op, "dy2d", dy2d, dtypes=FLOAT_DTYPES, ndim=2, shape=(None, w.shape[0]))
    check_same_device(op, dy2d=dy2d, w=w.packed)
    check_swiglu_input(op, swiglu_input, dy2d.shape[0], w.shape[1], dy2d.dtype)
    return input_grad_or_swiglu(dy2d.float() @ dense_weight(op, w, dense_w, path), dy2d.dtype,
                                swiglu_input)
