"""An HF config's ``rope_scaling`` dict -> the numbers csrc_triton's rope tables take.

The kernel package knows no model configs: ``csrc_triton.rope.rope_cos_sin`` takes
``llama3=Llama3Scaling(...)`` or None. This module reads the dict as transformers
writes it ("rope_type", or the 4.x spelling "type"; "default" or "llama3" plus its
four fields; other keys ignored) and refuses any other rope_type in one line.

  llama3_scaling(rope_scaling) -> Llama3Scaling | None
  rope_inv_freq(head_dim, rope_theta, rope_scaling) / rope_cos_sin(..., rope_scaling, device)
      the kernel package's tables, called with a config's dict
"""
from __future__ import annotations

import math
from typing import Optional

from csrc_triton.rope import Llama3Scaling
from csrc_triton.rope import rope_cos_sin as _cos_sin_of_numbers
from csrc_triton.rope import rope_inv_freq as _inv_freq_of_numbers

# rope_scaling's fields for rope_type "llama3", in Llama3Scaling's order.
LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor",
                 "original_max_position_embeddings")


def _rope_type(rope_scaling: Optional[dict]) -> str:
    if rope_scaling is None:
        return "default"
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_cos_sin: argument 'rope_scaling' must be a dict or None, "
                         f"got {type(rope_scaling).__name__}")
    # transformers 4.x configs wrote the key as "type"; 5.x writes "rope_type".
    key = "rope_type" if "rope_type" in rope_scaling else "type"
    kind = rope_scaling.get(key, "default")
    if kind not in ("default", "llama3"):
        raise ValueError(f"rope_cos_sin: rope_scaling['{key}'] = {kind!r} is not supported; "
                         "expected 'default' or 'llama3'")
    return kind


def _positive_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"rope_cos_sin: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def llama3_scaling(rope_scaling: Optional[dict]) -> Optional[Llama3Scaling]:
    """The llama3 numbers of ``rope_scaling`` (None for the default rule)."""
    if _rope_type(rope_scaling) != "llama3":
        return None
    missing = [f for f in LLAMA3_FIELDS if f not in rope_scaling]
    if missing:
        raise ValueError(f"rope_cos_sin: rope_scaling of rope_type 'llama3' lacks field(s) "
                         f"{', '.join(repr(m) for m in missing)}")
    factor, low, high, context = (
        _positive_number(f"rope_scaling['{f}']", rope_scaling[f]) for f in LLAMA3_FIELDS)
    if not high > low:
        raise ValueError(f"rope_cos_sin: rope_scaling['high_freq_factor'] ({high}) must "
                         f"exceed rope_scaling['low_freq_factor'] ({low})")
    return Llama3Scaling(factor, low, high, context)


def rope_inv_freq(head_dim: int, rope_theta: float, rope_scaling: Optional[dict] = None):
    """csrc_triton.rope.rope_inv_freq for a config's ``rope_scaling``."""
    return _inv_freq_of_numbers(head_dim, rope_theta, llama3_scaling(rope_scaling))


def rope_cos_sin(head_dim: int, max_position: int, rope_theta: float,
                 rope_scaling: Optional[dict] = None, device=None):
    """csrc_triton.rope.rope_cos_sin for a config's ``rope_scaling``: (cos, sin) fp32
    [max_position, head_dim // 2]."""
    return _cos_sin_of_numbers(head_dim, max_position, rope_theta, llama3_scaling(rope_scaling),
                               device)
