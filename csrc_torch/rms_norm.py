"""rms_norm launchers in torch: y = x * rstd * w, rstd = rsqrt(mean(x^2) + eps), in fp32.

Backward (w frozen unless weight_grad), with xhat = x * rstd and wdy = dy * w:
  dx = rstd * (wdy - xhat * mean(wdy * xhat))       dw = sum over rows of dy * xhat
"""
from __future__ import annotations

import torch

from csrc_triton._checks import FLOAT_DTYPES, check_same_device, check_tensor
from csrc_triton.rms_norm import _OP, _check_eps, _check_weight


def rms_norm_forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float):
    """x2d [rows, H], weight [H] -> (y2d in x2d's dtype, rstd [rows] fp32)."""
    check_tensor(_OP, "x2d", x2d, dtypes=FLOAT_DTYPES, ndim=2)
    n_rows, n_cols = x2d.shape
    if n_cols == 0:
        raise ValueError(f"{_OP}: argument 'x2d' has an empty last dim (shape {tuple(x2d.shape)})")
    _check_weight(weight, n_cols)
    check_same_device(_OP, x2d=x2d, weight=weight)
    eps = _check_eps(eps)
    x = x2d.float()
    rstd = torch.rsqrt(x.pow(2).mean(dim=1) + eps)
    y = x * rstd[:, None] * weight.float()
    return y.to(x2d.dtype), rstd


def rms_norm_backward(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor, weight_grad: bool):
    """(dx2d in x2d's dtype, dweight in weight's dtype or None unless weight_grad)."""
    check_tensor(_OP, "x2d", x2d, dtypes=FLOAT_DTYPES, ndim=2)
    n_rows, n_cols = x2d.shape
    check_tensor(_OP, "dy2d", dy2d, dtypes=FLOAT_DTYPES, shape=(n_rows, n_cols))
    _check_weight(weight, n_cols)
    check_tensor(_OP, "rstd", rstd, dtypes=(torch.float32,), shape=(n_rows,))
    check_same_device(_OP, dy2d=dy2d, x2d=x2d, weight=weight, rstd=rstd)
    if not isinstance(weight_grad, bool):
        raise ValueError(f"{_OP}: argument 'weight_grad' must be a bool, got {weight_grad!r}")
    dy = dy2d.float()
    xhat = x2d.float() * rstd[:, None]
    wdy = dy * weight.float()
    dx = rstd[:, None] * (wdy - xhat * (wdy * xhat).mean(dim=1, keepdim=True))
    dweight = (dy * xhat).sum(dim=0).to(weight.dtype) if weight_grad else None
    return dx.to(x2d.dtype), dweight
