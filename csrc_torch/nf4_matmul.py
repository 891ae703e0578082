"""nf4_matmul launchers in torch: y = x W^T and dx = dy W, W dequantized to fp32.

The operands are taken in fp32 whatever x's dtype (as the kernels do under the
interpreter), the product accumulates in fp32 and is rounded once to the input's dtype.
"""
from __future__ import annotations

import torch

from csrc_triton._checks import FLOAT_DTYPES, check_same_device, check_tensor
from csrc_triton.nf4 import NF4Weight
from csrc_triton.nf4_matmul import check_nf4_weight

from .nf4 import dequantize_fp32


def nf4_matmul_forward(x2d: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """y2d = x2d @ W^T for x2d [M, K] fp32/fp16/bf16 and W [N, K] in NF4; y2d in x2d's dtype."""
    op = "nf4_matmul_forward"
    check_nf4_weight(op, w)
    check_tensor(op, "x2d", x2d, dtypes=FLOAT_DTYPES, ndim=2, shape=(None, w.shape[1]))
    check_same_device(op, x2d=x2d, w=w.packed)
    return (x2d.float() @ dequantize_fp32(w).t()).to(x2d.dtype)


def nf4_matmul_backward_input(dy2d: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """dx2d = dy2d @ W for dy2d [M, N] and W [N, K] in NF4; dx2d in dy2d's dtype."""
    op = "nf4_matmul_backward_input"
    check_nf4_weight(op, w)
    check_tensor(op, "dy2d", dy2d, dtypes=FLOAT_DTYPES, ndim=2, shape=(None, w.shape[0]))
    check_same_device(op, dy2d=dy2d, w=w.packed)
    return (dy2d.float() @ dequantize_fp32(w)).to(dy2d.dtype)
