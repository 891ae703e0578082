"""swiglu launchers in torch: h = silu(g) * u in fp32, rounded once.

With s = sigmoid(g): dL/du = dh * g * s,  dL/dg = dh * u * s * (1 + g * (1 - s)).
"""
from __future__ import annotations

import torch

from csrc_triton._checks import FLOAT_DTYPES, check_same_device, check_tensor
from csrc_triton.swiglu import _OP, _check_pair


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: same shape and dtype -> h = silu(gate) * up in that dtype."""
    _check_pair(gate, up)
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype)


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """Given dL/dh (gate's shape, any float dtype) -> (dgate, dup) in gate's dtype."""
    _check_pair(gate, up)
    check_tensor(_OP, "dh", dh, dtypes=FLOAT_DTYPES, shape=tuple(gate.shape))
    check_same_device(_OP, dh=dh, gate=gate)
    g, u, d = gate.float(), up.float(), dh.float()
    s = torch.sigmoid(g)
    dgate = d * u * s * (1.0 + g * (1.0 - s))
    dup = d * g * s
    return dgate.to(gate.dtype), dup.to(gate.dtype)
