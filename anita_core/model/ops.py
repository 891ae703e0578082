"""The launcher seam: the model calls its ops only through here.

ANITA_BACKEND picks who runs them, read once when this module is imported:
  triton  the hand-written Triton kernels of csrc_triton (compiled on a CUDA GPU,
          the Triton interpreter on a CPU): the product, and what the kernel and
          model tests run;
  torch   csrc_torch, the same launchers as plain PyTorch on the same tensors
          (fp32 math, NF4 dequantized in torch): the CPU path.
Default: triton when torch sees a CUDA device, torch otherwise. The interpreter
runs each kernel program by program in Python, so a real model on a CPU would
take minutes per training step there; the torch backend computes the same
values in seconds (see the README's CPU figures). An unknown value is refused.

Each launcher below names the two functions it may run, imported by name from the
op family's modules (csrc_triton.<family> and its mirror csrc_torch.<family>, which
the family's OpRecord pairs; tests/test_torch_backend.py holds this module to the
records). The choice is made on every call, so a test or benchmark can compare both
backends in one process with ``use_backend``.
"""
from __future__ import annotations

import contextlib
import os

import torch

from anita_core.model.rope_scaling import llama3_scaling
from csrc_torch import attention as torch_attention
from csrc_torch import linear_loss as torch_linear_loss
from csrc_torch import lora_linear as torch_lora_linear
from csrc_torch import nf4 as torch_nf4
from csrc_torch import nf4_matmul as torch_nf4_matmul
from csrc_torch import rms_norm as torch_rms_norm
from csrc_torch import rope as torch_rope
from csrc_torch import swiglu as torch_swiglu
from csrc_triton import attention as triton_attention
from csrc_triton import linear_loss as triton_linear_loss
from csrc_triton import lora_linear as triton_lora_linear
from csrc_triton import nf4_encode as triton_nf4_encode
from csrc_triton import nf4_matmul as triton_nf4_matmul
from csrc_triton import rms_norm as triton_rms_norm
from csrc_triton import rope as triton_rope
from csrc_triton import swiglu as triton_swiglu

BACKEND_VARIABLE = "ANITA_BACKEND"
BACKENDS = ("triton", "torch")


def default_backend() -> str:
    return "triton" if torch.cuda.is_available() else "torch"


def _backend_from_environment() -> str:
    value = os.environ.get(BACKEND_VARIABLE, "").strip()
    if not value:
        return default_backend()
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_VARIABLE}={value!r} is not a backend; expected one of "
                         f"{', '.join(BACKENDS)} (or unset: {default_backend()} on this machine)")
    return value


_active = [""]


def active_backend() -> str:
    """The backend the model's ops run on now."""
    return _active[0]


def set_backend(name: str) -> str:
    """Switch the backend for this process (returns the previous one)."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    previous, _active[0] = _active[0], name
    return previous


@contextlib.contextmanager
def use_backend(name: str):
    """Run a block of code on one backend, then restore the previous one."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _on_torch() -> bool:
    return _active[0] == "torch"


# ---------------------------------------------------------------- NF4 and LoRA linears

def nf4_quantize(*args, **kwargs):
    fn = torch_nf4.nf4_quantize if _on_torch() else triton_nf4_encode.nf4_quantize
    return fn(*args, **kwargs)


def nf4_matmul_forward(*args, **kwargs):
    fn = torch_nf4_matmul.nf4_matmul_forward if _on_torch() else triton_nf4_matmul.nf4_matmul_forward
    return fn(*args, **kwargs)


def nf4_matmul_backward_input(*args, **kwargs):
    fn = (torch_nf4_matmul.nf4_matmul_backward_input if _on_torch()
          else triton_nf4_matmul.nf4_matmul_backward_input)
    return fn(*args, **kwargs)


def choose_path(*args, **kwargs):
    fn = torch_nf4_matmul.choose_path if _on_torch() else triton_nf4_matmul.choose_path
    return fn(*args, **kwargs)


def dequantize_for_matmul(*args, **kwargs):
    fn = (torch_nf4_matmul.dequantize_for_matmul if _on_torch()
          else triton_nf4_matmul.dequantize_for_matmul)
    return fn(*args, **kwargs)


def lora_linear_forward(*args, **kwargs):
    fn = (torch_lora_linear.lora_linear_forward if _on_torch()
          else triton_lora_linear.lora_linear_forward)
    return fn(*args, **kwargs)


def lora_linear_backward(*args, **kwargs):
    fn = (torch_lora_linear.lora_linear_backward if _on_torch()
          else triton_lora_linear.lora_linear_backward)
    return fn(*args, **kwargs)


def lora_linear_fused_forward(*args, **kwargs):
    fn = (torch_lora_linear.lora_linear_fused_forward if _on_torch()
          else triton_lora_linear.lora_linear_fused_forward)
    return fn(*args, **kwargs)


def lora_linear_fused_backward(*args, **kwargs):
    fn = (torch_lora_linear.lora_linear_fused_backward if _on_torch()
          else triton_lora_linear.lora_linear_fused_backward)
    return fn(*args, **kwargs)


# ---------------------------------------------------------------- per-token ops

def rms_norm_forward(*args, **kwargs):
    fn = torch_rms_norm.rms_norm_forward if _on_torch() else triton_rms_norm.rms_norm_forward
    return fn(*args, **kwargs)


def rms_norm_backward(*args, **kwargs):
    fn = torch_rms_norm.rms_norm_backward if _on_torch() else triton_rms_norm.rms_norm_backward
    return fn(*args, **kwargs)


def rope_forward(*args, **kwargs):
    fn = torch_rope.rope_forward if _on_torch() else triton_rope.rope_forward
    return fn(*args, **kwargs)


def rope_backward(*args, **kwargs):
    fn = torch_rope.rope_backward if _on_torch() else triton_rope.rope_backward
    return fn(*args, **kwargs)


def rope_cos_sin(head_dim: int, max_position: int, rope_theta: float, rope_scaling=None,
                 device=None):
    """The (cos, sin) tables for a model config's ``rope_scaling`` dict (read here, in
    the model layer: the kernel package takes LLaMA-3's numbers, never a config)."""
    fn = torch_rope.rope_cos_sin if _on_torch() else triton_rope.rope_cos_sin
    return fn(head_dim, max_position, rope_theta, llama3_scaling(rope_scaling), device)


def swiglu_forward(*args, **kwargs):
    fn = torch_swiglu.swiglu_forward if _on_torch() else triton_swiglu.swiglu_forward
    return fn(*args, **kwargs)


def swiglu_backward(*args, **kwargs):
    fn = torch_swiglu.swiglu_backward if _on_torch() else triton_swiglu.swiglu_backward
    return fn(*args, **kwargs)


# ---------------------------------------------------------------- losses

def linear_cross_entropy_forward(*args, **kwargs):
    fn = (torch_linear_loss.linear_cross_entropy_forward if _on_torch()
          else triton_linear_loss.linear_cross_entropy_forward)
    return fn(*args, **kwargs)


def linear_cross_entropy_forward_backward(*args, **kwargs):
    fn = (torch_linear_loss.linear_cross_entropy_forward_backward if _on_torch()
          else triton_linear_loss.linear_cross_entropy_forward_backward)
    return fn(*args, **kwargs)


def token_logprobs_forward(*args, **kwargs):
    fn = (torch_linear_loss.token_logprobs_forward if _on_torch()
          else triton_linear_loss.token_logprobs_forward)
    return fn(*args, **kwargs)


def token_logprobs_backward(*args, **kwargs):
    fn = (torch_linear_loss.token_logprobs_backward if _on_torch()
          else triton_linear_loss.token_logprobs_backward)
    return fn(*args, **kwargs)


# ---------------------------------------------------------------- attention

def document_bounds(*args, **kwargs):
    fn = torch_attention.document_bounds if _on_torch() else triton_attention.document_bounds
    return fn(*args, **kwargs)


def flash_attention_forward(*args, **kwargs):
    fn = (torch_attention.flash_attention_forward if _on_torch()
          else triton_attention.flash_attention_forward)
    return fn(*args, **kwargs)


def flash_attention_backward(*args, **kwargs):
    fn = (torch_attention.flash_attention_backward if _on_torch()
          else triton_attention.flash_attention_backward)
    return fn(*args, **kwargs)


set_backend(_backend_from_environment())
