"""Float64 oracle for RMSNorm: y = x * (mean(x^2) + eps)^(-1/2) * w over the last dim."""
from __future__ import annotations

import torch


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Forward in float64 (differentiable, so tests can take torch.autograd.grad of it)."""
    x = x.to(torch.float64)
    mean_square = (x * x).mean(dim=-1, keepdim=True)
    return x / torch.sqrt(mean_square + eps) * weight.to(torch.float64)


def reference_rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                eps: float):
    """(dx, dw) in float64 from the closed form, written out independently of the kernel:
    dx = rstd * (w dy - xhat * mean(w dy xhat)),  dw = sum over rows of dy * xhat."""
    x = x.to(torch.float64)
    dy = dy.to(torch.float64)
    w = weight.to(torch.float64)
    rstd = 1.0 / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)
    xhat = x * rstd
    w_dy = w * dy
    dx = rstd * (w_dy - xhat * (w_dy * xhat).mean(dim=-1, keepdim=True))
    dw = (dy * xhat).reshape(-1, x.shape[-1]).sum(dim=0)
    return dx, dw
