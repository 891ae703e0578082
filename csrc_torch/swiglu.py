"""swiglu launchers in torch: h = silu(g) * u in fp32, rounded once.

With s = sigmoid(g): dL/du = dh * g * s,  dL/dg = dh * u * s * (1 + g * (1 - s)).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from csrc_triton.checks import FLOAT_DTYPES, check_rows, check_same_device
from csrc_triton.swiglu import check_swiglu_out, check_swiglu_pair

_OP = "swiglu"


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: same shape and dtype (row views) -> h = silu(gate) * up in that dtype."""
    check_swiglu_pair(gate, up)
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype)


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """Given dL/dh (gate's shape, any float dtype) -> (dgate, dup) in gate's dtype
    (written into ``out`` when given, as csrc_triton.swiglu.swiglu_backward)."""
    check_swiglu_pair(gate, up)
    check_rows(_OP, "dh", dh, dtypes=FLOAT_DTYPES, shape=tuple(gate.shape))
    check_same_device(_OP, dh=dh, gate=gate)
    g, u, d = gate.float(), up.float(), dh.float()
    s = torch.sigmoid(g)
    dgate = (d * u * s * (1.0 + g * (1.0 - s))).to(gate.dtype)
    dup = (d * g * s).to(gate.dtype)
    if out is None:
        return dgate, dup
    out_gate, out_up = check_swiglu_out(out, gate)
    return out_gate.copy_(dgate), out_up.copy_(dup)
