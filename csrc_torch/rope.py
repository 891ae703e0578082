"""rope launchers in torch (rotate_half pairing, per-token positions), in fp32.

  y_i = x_i c - x_{i+D/2} s,   y_{i+D/2} = x_{i+D/2} c + x_i s
The backward is the rotation by -theta (s -> -s). rope_cos_sin is csrc_triton's
(plain torch already).
"""
from __future__ import annotations

import torch

from csrc_triton.rope import check_rope_args, rope_cos_sin  # noqa: F401  (re-exported)


def _rotate(x: torch.Tensor, cos_p: torch.Tensor, sin_p: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x32 = x.float()
    x1, x2 = x32[..., :half], x32[..., half:]
    out = torch.cat((x1 * cos_p - x2 * sin_p, x2 * cos_p + x1 * sin_p), dim=-1)
    return out.to(x.dtype)


def _launch(q, k, positions, cos, sin, inverse: bool, in_place: bool):
    cos_p = cos[positions][:, :, None, :]          # [B, S, 1, D/2]
    sin_p = sin[positions][:, :, None, :]
    if inverse:
        sin_p = -sin_p
    q_rot, k_rot = _rotate(q, cos_p, sin_p), _rotate(k, cos_p, sin_p)
    return (q.copy_(q_rot), k.copy_(k_rot)) if in_place else (q_rot, k_rot)


def rope_forward(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, *, positions_checked: bool = False,
                 in_place: bool = False):
    """q [B, S, Hq, D], k [B, S, Hkv, D], positions [B, S], cos/sin fp32 [P, D/2] ->
    (q_rot, k_rot) in q's and k's dtypes, written over q and k with ``in_place``
    (same checks as csrc_triton.rope)."""
    check_rope_args("q", q, "k", k, positions, cos, sin, positions_checked)
    return _launch(q, k, positions, cos, sin, inverse=False, in_place=in_place)


def rope_backward(dq_rot: torch.Tensor, dk_rot: torch.Tensor, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, *, positions_checked: bool = False,
                  in_place: bool = False):
    """(dq, dk): the rotation of (dq_rot, dk_rot) by -theta (over them with ``in_place``)."""
    check_rope_args("dq_rot", dq_rot, "dk_rot", dk_rot, positions, cos, sin, positions_checked)
    return _launch(dq_rot, dk_rot, positions, cos, sin, inverse=True, in_place=in_place)
