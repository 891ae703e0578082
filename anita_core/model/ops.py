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

Each name below dispatches to the active backend on every call, so a test or
benchmark can compare both backends in one process with ``use_backend``.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from types import SimpleNamespace

import torch

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


def _triton_launchers() -> SimpleNamespace:
    # by module path: csrc_triton's package namespace holds same-named autograd ops
    modules = [importlib.import_module(f"csrc_triton.{family}") for family in
               ("attention", "linear_loss", "lora_linear", "nf4_encode", "nf4_dense", "nf4_matmul",
                "rms_norm", "rope", "swiglu")]
    return SimpleNamespace(**{name: next(getattr(m, name) for m in modules if hasattr(m, name))
                              for name in LAUNCHERS})


def _torch_launchers() -> SimpleNamespace:
    import csrc_torch
    return SimpleNamespace(**{name: getattr(csrc_torch, name) for name in LAUNCHERS})


LAUNCHERS = (
    "nf4_quantize", "nf4_matmul_forward", "nf4_matmul_backward_input",
    "choose_path", "dequantize_for_matmul",
    "lora_linear_forward", "lora_linear_backward",
    "lora_linear_fused_forward", "lora_linear_fused_backward",
    "rms_norm_forward", "rms_norm_backward",
    "rope_forward", "rope_backward", "rope_cos_sin",
    "swiglu_forward", "swiglu_backward",
    "linear_cross_entropy_forward", "linear_cross_entropy_forward_backward",
    "token_logprobs_forward", "token_logprobs_backward",
    "document_bounds", "flash_attention_forward", "flash_attention_backward",
)
_LOADERS = {"triton": _triton_launchers, "torch": _torch_launchers}
_loaded: dict = {}
_active = [""]


def _launchers(name: str) -> SimpleNamespace:
    if name not in _loaded:
        _loaded[name] = _LOADERS[name]()
    return _loaded[name]


def active_backend() -> str:
    """The backend the model's ops run on now."""
    return _active[0]


def set_backend(name: str) -> str:
    """Switch the backend for this process (returns the previous one)."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    _launchers(name)
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


def _dispatcher(name: str):
    def launcher(*args, **kwargs):
        return getattr(_loaded[_active[0]], name)(*args, **kwargs)
    launcher.__name__ = launcher.__qualname__ = name
    launcher.__doc__ = f"{name} of the active backend (see anita_core.model.ops)."
    return launcher


nf4_quantize = _dispatcher("nf4_quantize")
nf4_matmul_forward = _dispatcher("nf4_matmul_forward")
nf4_matmul_backward_input = _dispatcher("nf4_matmul_backward_input")
choose_path = _dispatcher("choose_path")
dequantize_for_matmul = _dispatcher("dequantize_for_matmul")
lora_linear_forward = _dispatcher("lora_linear_forward")
lora_linear_backward = _dispatcher("lora_linear_backward")
lora_linear_fused_forward = _dispatcher("lora_linear_fused_forward")
lora_linear_fused_backward = _dispatcher("lora_linear_fused_backward")
rms_norm_forward = _dispatcher("rms_norm_forward")
rms_norm_backward = _dispatcher("rms_norm_backward")
rope_forward = _dispatcher("rope_forward")
rope_backward = _dispatcher("rope_backward")
rope_cos_sin = _dispatcher("rope_cos_sin")
swiglu_forward = _dispatcher("swiglu_forward")
swiglu_backward = _dispatcher("swiglu_backward")
linear_cross_entropy_forward = _dispatcher("linear_cross_entropy_forward")
linear_cross_entropy_forward_backward = _dispatcher("linear_cross_entropy_forward_backward")
token_logprobs_forward = _dispatcher("token_logprobs_forward")
token_logprobs_backward = _dispatcher("token_logprobs_backward")
document_bounds = _dispatcher("document_bounds")
flash_attention_forward = _dispatcher("flash_attention_forward")
flash_attention_backward = _dispatcher("flash_attention_backward")

set_backend(_backend_from_environment())
