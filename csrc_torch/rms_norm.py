"""rms_norm launchers in torch: y = x * rstd * w, rstd = rsqrt(mean(x^2) + eps), in fp32.

Backward (w frozen unless weight_grad), with xhat = x * rstd and wdy = dy * w:
  dx = rstd * (wdy - xhat * mean(wdy * xhat))       dw = sum over rows of dy * xhat
"""
from __future__ import annotations

import torch

from csrc_triton.rms_norm import check_backward_args, check_forward_args


def rms_norm_forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float):
    """x2d [rows, H], weight [H] -> (y2d in x2d's dtype, rstd [rows] fp32)."""
    eps = check_forward_args(x2d, weight, eps)
    x = x2d.float()
    rstd = torch.rsqrt(x.pow(2).mean(dim=1) + eps)
    y = x * rstd[:, None] * weight.float()
    return y.to(x2d.dtype), rstd


def rms_norm_backward(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor, weight_grad: bool):
    """(dx2d in x2d's dtype, dweight in weight's dtype or None unless weight_grad)."""
    check_backward_args(dy2d, x2d, weight, rstd, weight_grad)
    dy = dy2d.float()
    xhat = x2d.float() * rstd[:, None]
    wdy = dy * weight.float()
    dx = rstd[:, None] * (wdy - xhat * (wdy * xhat).mean(dim=1, keepdim=True))
    dweight = (dy * xhat).sum(dim=0).to(weight.dtype) if weight_grad else None
    return dx.to(x2d.dtype), dweight
