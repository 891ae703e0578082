"""Float64 oracle for RoPE (LLaMA "rotate_half" pairing) and its cos/sin tables."""
from __future__ import annotations

import math

import torch


def reference_inv_freq(head_dim: int, rope_theta: float, rope_scaling=None) -> torch.Tensor:
    """inv_freq as fp32, one Python float64 scalar computation per frequency
    (an independent formulation of the LLaMA-3 piecewise rule)."""
    values = []
    for i in range(head_dim // 2):
        f = rope_theta ** (-(2.0 * i) / head_dim)
        if rope_scaling is not None and rope_scaling.get("rope_type") == "llama3":
            factor = rope_scaling["factor"]
            low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
            context = rope_scaling["original_max_position_embeddings"]
            wavelength = 2.0 * math.pi / f
            if wavelength > context / low:          # long wavelengths: stretched
                f = f / factor
            elif wavelength >= context / high:      # in between: blended
                a = (context / wavelength - low) / (high - low)
                f = (1.0 - a) * f / factor + a * f
        values.append(f)
    return torch.tensor(values, dtype=torch.float64).to(torch.float32)


def reference_cos_sin(inv_freq: torch.Tensor, max_position: int):
    """Float64 cos/sin [max_position, D/2] of p * inv_freq (inv_freq taken exactly as given)."""
    angles = torch.outer(torch.arange(max_position, dtype=torch.float64),
                         inv_freq.to(torch.float64))
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False):
    """q [B, S, Hq, D], k [B, S, Hkv, D] rotated in float64 by theta = angle of the
    table row positions[b, s] (by -theta when ``inverse``). Differentiable."""
    c = cos.to(torch.float64)[positions.long()]          # [B, S, D/2]
    s = sin.to(torch.float64)[positions.long()]
    if inverse:
        s = -s
    c = torch.cat((c, c), dim=-1)[:, :, None, :]           # broadcast over heads
    s = torch.cat((s, s), dim=-1)[:, :, None, :]
    rotate = lambda x: x.to(torch.float64) * c + _rotate_half(x.to(torch.float64)) * s  # noqa: E731
    return rotate(q), rotate(k)
