"""SwiGLU, the gated activation of the LLaMA MLP: h = silu(gate) * up.

Elementwise over two same-shape tensors [..., I]; forward and backward are one
Triton kernel each, over the flattened elements.

Public:
  swiglu(gate, up) -> h                      autograd Function
Low level (used by the model's hand-written backward):
  swiglu_forward(gate, up) -> h
  swiglu_backward(dh, gate, up) -> (dgate, dup)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_same_device, check_tensor
from ._runtime import INTERPRETING, new_output, record_launch

_OP = "swiglu"

# Elements per program: the interpreter pays per program, so it takes big blocks.
_BLOCK = 16384 if INTERPRETING else 1024
_NUM_WARPS = 4


@triton.jit
def _swiglu_forward_kernel(gate_ptr, up_ptr, h_ptr, n_elements, BLOCK: tl.constexpr):
    """h = silu(g) * u = g * sigmoid(g) * u, elementwise in fp32, rounded once to h's dtype."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + offsets, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_gradients(dh, g, u):
    """(dL/dg, dL/du) of h = silu(g) * u for fp32 tiles (derivation: _swiglu_backward_kernel);
    also the epilogue of nf4_matmul's backward when it produces dh itself."""
    s = tl.sigmoid(g)
    return dh * u * s * (1.0 + g * (1.0 - s)), dh * g * s


@triton.jit
def _swiglu_backward_kernel(dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_elements,
                            BLOCK: tl.constexpr):
    """Gradients of h = silu(g) * u, with s = sigmoid(g):

      dL/du = dh * silu(g) = dh * g * s
      dL/dg = dh * u * silu'(g),  silu'(g) = d(g s)/dg = s + g * s * (1 - s)
                                          = s * (1 + g * (1 - s))
    (using sigmoid'(g) = s * (1 - s)). The forward is recomputed, nothing stored.
    """
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    dh = tl.load(dh_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dgate, dup = swiglu_gradients(dh, g, u)
    tl.store(dgate_ptr + offsets, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offsets, dup.to(dup_ptr.dtype.element_ty), mask=mask)


def _check_pair(gate: torch.Tensor, up: torch.Tensor) -> None:
    check_tensor(_OP, "gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "up", up, dtypes=(gate.dtype,), shape=tuple(gate.shape))
    check_same_device(_OP, gate=gate, up=up)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: same shape and dtype (fp32/fp16/bf16), contiguous -> h = silu(gate) * up."""
    _check_pair(gate, up)
    h = new_output(gate.shape, gate.dtype, gate.device)
    n = gate.numel()
    if n:
        record_launch("_swiglu_forward_kernel")
        _swiglu_forward_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, h, n, BLOCK=_BLOCK,
                                                          num_warps=_NUM_WARPS)
    return h


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """Given dL/dh (gate's shape, any float dtype) -> (dgate, dup) in gate's dtype."""
    _check_pair(gate, up)
    check_tensor(_OP, "dh", dh, dtypes=FLOAT_DTYPES, shape=tuple(gate.shape))
    check_same_device(_OP, dh=dh, gate=gate)
    dgate = new_output(gate.shape, gate.dtype, gate.device)
    dup = new_output(gate.shape, gate.dtype, gate.device)
    n = gate.numel()
    if n:
        record_launch("_swiglu_backward_kernel")
        _swiglu_backward_kernel[(triton.cdiv(n, _BLOCK),)](dh, gate, up, dgate, dup, n,
                                                           BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        # Incoming gradients may be expanded or strided views; the kernel wants them flat.
        return swiglu_backward(dh.contiguous(), gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up, differentiable in both."""
    return SwiGLUFunction.apply(gate, up)
