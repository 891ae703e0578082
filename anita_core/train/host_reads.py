"""Host <-> device traffic of a training step, arranged so that the host never waits.

On a GPU the host runs ahead of the device, queueing kernels; any read of a
device value (``float(loss)``, ``.item()``, ``if t:``) and any blocking copy
makes it wait until everything queued has run, and the device then idles while
Python issues the next kernels. So a step's batches go up without blocking
(``batch_to_device``: pinned memory, non_blocking), the values a step reports
stay on the device until the step ends, and ``read_floats`` brings them all
back in one read. (bench/host_syncs.py counts what is left.)
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

# ``t`` on a device without making the host wait: pinned memory and non_blocking for a GPU
from csrc_triton._runtime import upload as to_device


def batch_to_device(batch: dict, device) -> dict:
    """Every tensor of ``batch`` on ``device`` (``to_device``); other values as they are."""
    return {k: (to_device(v, device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def read_floats(values: Mapping[str, object]) -> Dict[str, float]:
    """``values`` with every tensor (0-dim, on one device) replaced by its value as a
    Python float, all read back in one device->host transfer. Tensors are widened
    to float64 first, which is exact, so a float64 sum on the device gives the very
    float that summing Python floats would have."""
    out = dict(values)
    keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    if keys:
        stacked = torch.stack([values[k].detach().reshape(()).to(torch.float64) for k in keys])
        out.update(zip(keys, stacked.tolist()))
    return out


def all_finite(tensors) -> bool:
    """Whether every element of ``tensors`` is finite, in one read (the step's second:
    the weights after the update)."""
    tensors = list(tensors)
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
