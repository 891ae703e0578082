"""What the host knows about a batch from its CPU-side copy, so that the device is never asked.

A training batch is built on the CPU (anita_core.data) and copied to the device
for each micro-batch. Three things the model needs from it are values, not
shapes: that every token id and target is a vocabulary entry, how many targets
the loss has (the lm-head runs over those tokens only), and how far the RoPE
table must reach. Read from the device, each is a host synchronization: on a GPU
the host waits for every queued kernel before it can issue the next one. Read
from the CPU-side batch they cost nothing on the device, so an objective counts
them there (``batch_facts``) and hands the result to the model's entry points,
which then skip their own device reads. Without facts the model checks and
counts on the device, as a direct caller expects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class BatchFacts:
    """num_targets: targets != -100 (the loss's tokens); position_bound: the RoPE
    table size the positions need (1 + the largest, at least 1). Both come from a
    batch whose ids and targets were checked to lie in [0, vocab_size)."""
    num_targets: int
    position_bound: int


def batch_facts(input_ids: torch.Tensor, targets: torch.Tensor,
                position_ids: Optional[torch.Tensor], vocab_size: int) -> BatchFacts:
    """Checks and counts a batch: call it on the CPU-side tensors (on device tensors
    it reads them back, which is what it exists to avoid). ValueError, with the same
    messages as the model's own checks, for an id, target or position out of range."""
    if input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"input_ids must lie in [0, {vocab_size}); got range [{low}, {high}]")
    counted = targets != IGNORE_INDEX
    bad = counted & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        first = int(torch.nonzero(bad.reshape(-1))[0, 0])
        raise ValueError(f"targets[{first}] (flattened) = {int(targets.reshape(-1)[first])} is "
                         f"outside the vocabulary [0, {vocab_size}) and is not {IGNORE_INDEX}")
    if position_ids is None or position_ids.numel() == 0:
        bound = input_ids.shape[-1] if input_ids.dim() else 1
    else:
        low, high = int(position_ids.min()), int(position_ids.max())
        if low < 0:
            raise ValueError(f"position_ids must be >= 0, got {low}")
        bound = high + 1
    return BatchFacts(num_targets=int(counted.sum()), position_bound=max(1, bound))
