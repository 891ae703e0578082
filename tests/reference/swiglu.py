"""Float64 oracle for SwiGLU: h = silu(g) * u."""
from __future__ import annotations

import torch


def reference_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Forward in float64 (differentiable, so tests can take torch.autograd.grad of it)."""
    g = gate.to(torch.float64)
    return torch.nn.functional.silu(g) * up.to(torch.float64)


def reference_swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """(dgate, dup) in float64 from the closed form, s = sigmoid(g):
    dgate = dh * u * (s + g s (1 - s)),  dup = dh * g * s."""
    dh, g, u = (t.to(torch.float64) for t in (dh, gate, up))
    s = torch.sigmoid(g)
    return dh * u * (s + g * s * (1 - s)), dh * g * s
