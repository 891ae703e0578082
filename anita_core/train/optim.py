"""Optimizer and learning-rate schedule for the LoRA parameters."""
from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch

SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")


def paged_adamw_8bit_usable() -> bool:
    """bitsandbytes' paged 8-bit AdamW pages optimizer state through CUDA unified memory."""
    if not torch.cuda.is_available():
        return False
    try:
        import bitsandbytes.optim  # noqa: F401
    except Exception:  # bitsandbytes absent or unable to load its CUDA library
        return False
    return True


def adamw_implementation(params) -> dict:
    """torch AdamW's implementation flags for ``params``: fused on CUDA (one kernel
    launch updates every tensor: an 8B model's LoRA is ~450 of them, a few kernels
    each one by one), foreach elsewhere (one op per step of the update over the whole
    list). Both compute the same update in fp32 as the one-tensor-at-a-time loop,
    to rounding (tests/test_optim.py)."""
    if params and all(p.is_cuda for p in params):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(name: str, params: Iterable[torch.Tensor], lr: float, weight_decay: float,
                    betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW (adamw_implementation), or bitsandbytes' PagedAdamW8bit when asked for and
    usable (falls back to torch AdamW with a warning otherwise, e.g. on a CPU)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
    params = list(params)
    if name == "paged_adamw_8bit":
        if paged_adamw_8bit_usable():
            import bitsandbytes.optim as bnb_optim
            return bnb_optim.PagedAdamW8bit(params, lr=lr, betas=betas, eps=eps,
                                            weight_decay=weight_decay)
        warnings.warn("paged_adamw_8bit needs CUDA and bitsandbytes; using torch AdamW instead",
                      stacklevel=2)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             **adamw_implementation(params))


def warmup_steps_for(total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """Explicit warmup steps win over a ratio (as in transformers' TrainingArguments)."""
    if warmup_steps > 0:
        return warmup_steps
    return math.ceil(warmup_ratio * total_steps)


def lr_multiplier(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    """Learning-rate factor for optimizer step ``step`` (0-based): linear warmup from
    0, then linear decay to 0, half-cosine decay to 0, or constant."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
