"""Rotary position embedding (RoPE), LLaMA style, for q and k in one launch.

Pairing is "rotate_half": element i of a head is rotated together with element
i + D/2 (not the interleaved (2i, 2i+1) pairing of the original paper). With
theta_i = position * inv_freq_i, c = cos(theta_i), s = sin(theta_i):

    y_i       = x_i * c - x_{i+D/2} * s
    y_{i+D/2} = x_{i+D/2} * c + x_i * s          (0 <= i < D/2)

Positions come per token ([B, S]), since packed documents restart at 0.

q and k are read (and the results written) through their token strides: each
token's heads x D must be contiguous, tokens may lie any distance apart, e.g. q and
k as column slices of the fused q/k/v projection's [T, (Hq + 2 Hkv) D] output.
``in_place=True`` writes the rotation back over its input (each pair is loaded
before the program that loaded it stores it), so that output is all the memory
q and k ever take.

Public:
  rope_cos_sin(head_dim, max_position, rope_theta, llama3, device) -> (cos, sin)
  rope_op(q, k, positions, cos, sin) -> (q_rot, k_rot)      autograd Function
Low level (used by the model's hand-written backward):
  rope_forward(q, k, positions, cos, sin, in_place=False) -> (q_rot, k_rot)
  rope_backward(dq_rot, dk_rot, positions, cos, sin, in_place=False) -> (dq, dk)
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .checks import (FLOAT_DTYPES, INDEX_DTYPES, check_same_device, check_tensor,
                      check_token_rows, wide_index)
from ._runtime import INTERPRETING, new_output, record_launch, upload
from .records import OpRecord

_OP = "rope"

# Elements of one q half-tile per program: the interpreter pays per program,
# so it takes many tokens at once; on the GPU a LLaMA-3-8B token (32 q heads x
# 64) is one program.
_TILE_ELEMENTS = 16384 if INTERPRETING else 2048

class Llama3Scaling(NamedTuple):
    """The numbers of LLaMA-3's frequency rule (model/rope_scaling.py reads them from a
    model config); the kernel package takes numbers, not config dicts."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: float


# ---------------------------------------------------------------- tables (torch)

def _positive_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"rope_cos_sin: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"rope_cos_sin: argument '{name}' must be an int > 0, got {value!r}")
    return value


def rope_inv_freq(head_dim: int, rope_theta: float,
                  llama3: Optional[Llama3Scaling] = None) -> torch.Tensor:
    """inv_freq [head_dim // 2] fp32 (CPU): computed in float64, rounded once to fp32.

    default (llama3 None): inv_freq_i = rope_theta ** (-2i / head_dim)
    llama3:  with wavelength lambda_i = 2 pi / inv_freq_i and the original context
             L = original_max_position,
               lambda_i < L / high_freq_factor  -> inv_freq_i           (kept)
               lambda_i > L / low_freq_factor   -> inv_freq_i / factor  (stretched)
               otherwise, with a = (L / lambda_i - low_freq_factor)
                                   / (high_freq_factor - low_freq_factor):
                 (1 - a) * inv_freq_i / factor + a * inv_freq_i       (blended)
    """
    head_dim = _positive_int("head_dim", head_dim)
    if head_dim % 2:
        raise ValueError(f"rope_cos_sin: argument 'head_dim' must be even, got {head_dim}")
    theta = _positive_number("argument 'rope_theta'", rope_theta)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / theta ** exponents
    if llama3 is not None:
        if not isinstance(llama3, Llama3Scaling):
            raise ValueError(f"rope_cos_sin: argument 'llama3' must be a Llama3Scaling or None, "
                             f"got {type(llama3).__name__}")
        factor, low, high, context = (_positive_number(f"llama3.{name}", value)
                                      for name, value in zip(Llama3Scaling._fields, llama3))
        if not high > low:
            raise ValueError(f"rope_cos_sin: llama3.high_freq_factor ({high}) must exceed "
                             f"llama3.low_freq_factor ({low})")
        wavelength = 2 * math.pi / inv_freq
        blend = (context / wavelength - low) / (high - low)
        blended = (1 - blend) * inv_freq / factor + blend * inv_freq
        inv_freq = torch.where(wavelength < context / high, inv_freq,
                               torch.where(wavelength > context / low, inv_freq / factor, blended))
    return inv_freq.to(torch.float32)


def rope_cos_sin(head_dim: int, max_position: int, rope_theta: float,
                 llama3: Optional[Llama3Scaling] = None, device=None):
    """(cos, sin), each fp32 [max_position, head_dim // 2]: row p holds
    cos/sin(p * inv_freq) for the fp32 inv_freq of ``rope_inv_freq``; the angle and
    its cos/sin are taken in float64 and rounded once to fp32.

    ``llama3``: None (the default rule) or LLaMA-3's numbers. Runs once per model in
    plain torch.
    """
    max_position = _positive_int("max_position", max_position)
    inv_freq = rope_inv_freq(head_dim, rope_theta, llama3).to(torch.float64)
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos = upload(angles.cos().to(torch.float32), device)     # the host does not wait
    sin = upload(angles.sin().to(torch.float32), device)
    return cos.contiguous(), sin.contiguous()


# ---------------------------------------------------------------- kernels

@triton.jit
def _rotate_heads(in_ptr, out_ptr, tokens, token_ok, stride_in, stride_out, n_heads, half,
                  cos, sin, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate every head of BLOCK_TOKENS tokens of a [tokens, n_heads, 2 * half] tensor
    whose tokens are ``stride_in`` elements apart (``stride_out`` for the output).

    cos, sin: fp32 [BLOCK_TOKENS, BLOCK_HALF] for these tokens' positions.
    For each pair (x1, x2) = (x_i, x_{i+half}):
        y1 = x1 * cos - x2 * sin,   y2 = x2 * cos + x1 * sin
    """
    heads = tl.arange(0, BLOCK_HEADS)
    pairs = tl.arange(0, BLOCK_HALF)
    within = heads[None, :, None] * (2 * half) + pairs[None, None, :]
    first_in = tokens[:, None, None] * stride_in + within
    first_out = tokens[:, None, None] * stride_out + within
    mask = (token_ok[:, None, None] & (heads < n_heads)[None, :, None]
            & (pairs < half)[None, None, :])
    x1 = tl.load(in_ptr + first_in, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(in_ptr + first_in + half, mask=mask, other=0.0).to(tl.float32)
    c = cos[:, None, :]
    s = sin[:, None, :]
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    tl.store(out_ptr + first_out, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + first_out + half, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cos_ptr, sin_ptr,
                 n_tokens, n_q_heads, n_kv_heads, half, stride_q, stride_k, stride_q_out,
                 stride_k_out, BLOCK_TOKENS: tl.constexpr, BLOCK_Q_HEADS: tl.constexpr,
                 BLOCK_KV_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 INVERSE: tl.constexpr, INDEX_64: tl.constexpr):
    """RoPE of q [tokens, Hq, D] and k [tokens, Hkv, D] for BLOCK_TOKENS tokens.

    Forward (INVERSE=False): rotate each pair (x_i, x_{i+D/2}) by theta =
    position * inv_freq_i, i.e. y = R(theta) x with
        R(theta) = [[cos, -sin], [sin, cos]].
    Backward (INVERSE=True): y is linear in x, so dL/dx = R(theta)^T dL/dy, and
    R is orthogonal with R(theta)^T = R(-theta): the backward is the same
    rotation with sin negated (cos is even, sin is odd).

    Each token's cos/sin row (gathered by its position) is loaded once and used
    for all q and all k heads. INDEX_64: token offsets (token x stride) in int64.
    """
    pid = tl.program_id(0)
    tokens = pid * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    token_ok = tokens < n_tokens
    pairs = tl.arange(0, BLOCK_HALF)
    positions = tl.load(pos_ptr + tokens, mask=token_ok, other=0)
    table = positions[:, None] * half + pairs[None, :]
    table_mask = token_ok[:, None] & (pairs < half)[None, :]
    cos = tl.load(cos_ptr + table, mask=table_mask, other=0.0)
    sin = tl.load(sin_ptr + table, mask=table_mask, other=0.0)
    if INVERSE:
        sin = -sin
    if INDEX_64:
        tokens = tokens.to(tl.int64)
    _rotate_heads(q_ptr, q_out_ptr, tokens, token_ok, stride_q, stride_q_out, n_q_heads, half,
                  cos, sin, BLOCK_Q_HEADS, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, tokens, token_ok, stride_k, stride_k_out, n_kv_heads, half,
                  cos, sin, BLOCK_KV_HEADS, BLOCK_HALF)


# ---------------------------------------------------------------- launchers

def check_rope_args(q_name, q, k_name, k, positions, cos, sin, positions_checked=False):
    """Validate a (q, k, positions, cos, sin) call; returns (B, S, Hq, Hkv, D)."""
    check_tensor(_OP, q_name, q, dtypes=FLOAT_DTYPES, ndim=4, contiguous=False, max_numel=None)
    batch, seq, n_q_heads, head_dim = q.shape
    check_tensor(_OP, k_name, k, dtypes=FLOAT_DTYPES, shape=(batch, seq, None, head_dim),
                 contiguous=False, max_numel=None)
    check_token_rows(_OP, q_name, q)
    check_token_rows(_OP, k_name, k)
    n_kv_heads = k.shape[2]
    if head_dim % 2:
        raise ValueError(f"{_OP}: head dim (last dim of '{q_name}', shape {tuple(q.shape)}) "
                         "must be even")
    check_tensor(_OP, "positions", positions, dtypes=INDEX_DTYPES, shape=(batch, seq))
    check_tensor(_OP, "cos", cos, dtypes=(torch.float32,), shape=(None, head_dim // 2))
    check_tensor(_OP, "sin", sin, dtypes=(torch.float32,), shape=tuple(cos.shape))
    check_same_device(_OP, **{q_name: q, k_name: k, "positions": positions, "cos": cos, "sin": sin})
    if positions.numel() and not positions_checked:
        # One host sync: the kernel cannot report an out-of-table read, so check here.
        low, high = torch.stack(torch.aminmax(positions)).tolist()
        if low < 0 or high >= cos.shape[0]:
            raise ValueError(f"{_OP}: argument 'positions' spans [{low}, {high}] but the cos/sin "
                             f"tables cover [0, {cos.shape[0] - 1}]; build larger tables")
    return batch, seq, n_q_heads, n_kv_heads, head_dim


def _launch(q, k, positions, cos, sin, dims, inverse: bool, in_place: bool):
    batch, seq, n_q_heads, n_kv_heads, head_dim = dims
    if in_place:
        q_out, k_out = q, k
    else:
        q_out = new_output(q.shape, q.dtype, q.device)
        k_out = new_output(k.shape, k.dtype, k.device)
    n_tokens = batch * seq
    if n_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_q_heads = triton.next_power_of_2(n_q_heads)
    block_tokens = max(1, min(_TILE_ELEMENTS // (block_q_heads * block_half),
                              triton.next_power_of_2(n_tokens)))
    num_warps = min(16, max(1, block_tokens * block_q_heads * block_half // 256))
    grid = (triton.cdiv(n_tokens, block_tokens),)
    record_launch("_rope_kernel")
    strides = [check_token_rows(_OP, "out", t) for t in (q, k, q_out, k_out)]
    _rope_kernel[grid](q, k, q_out, k_out, positions, cos, sin,
                       n_tokens, n_q_heads, n_kv_heads, half, *strides,
                       BLOCK_TOKENS=block_tokens, BLOCK_Q_HEADS=block_q_heads,
                       BLOCK_KV_HEADS=triton.next_power_of_2(n_kv_heads),
                       BLOCK_HALF=block_half, INVERSE=inverse,
                       INDEX_64=wide_index(q, k, q_out, k_out), num_warps=num_warps)
    return q_out, k_out


def rope_forward(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, *, positions_checked: bool = False,
                 in_place: bool = False):
    """q [B, S, Hq, D], k [B, S, Hkv, D] (D even, any Hq/Hkv; token rows, see the module
    docstring), positions [B, S] int32/int64, cos/sin fp32 [P, D/2] -> (q_rot, k_rot),
    new contiguous tensors in q's and k's dtypes, or q and k themselves, overwritten,
    with ``in_place``. Positions outside [0, P) raise ValueError (checked on the host:
    costs one device sync per call). ``positions_checked=True`` skips that check
    for a caller that has already validated these positions against these
    tables (the model does it once per step, not twice per layer)."""
    dims = check_rope_args("q", q, "k", k, positions, cos, sin, positions_checked)
    return _launch(q, k, positions, cos, sin, dims, inverse=False, in_place=in_place)


def rope_backward(dq_rot: torch.Tensor, dk_rot: torch.Tensor, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, *, positions_checked: bool = False,
                  in_place: bool = False):
    """Gradients through rope_forward: (dq, dk) = rotation of (dq_rot, dk_rot) by
    -theta (the transpose of the forward rotation). Same shapes, checks, host
    sync, ``positions_checked`` and ``in_place`` as rope_forward."""
    dims = check_rope_args("dq_rot", dq_rot, "dk_rot", dk_rot, positions, cos, sin, positions_checked)
    return _launch(dq_rot, dk_rot, positions, cos, sin, dims, inverse=True, in_place=in_place)


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, positions, cos, sin):
        q_rot, k_rot = rope_forward(q, k, positions, cos, sin)
        ctx.save_for_backward(positions, cos, sin)
        return q_rot, k_rot

    @staticmethod
    def backward(ctx, dq_rot, dk_rot):
        positions, cos, sin = ctx.saved_tensors
        # Incoming gradients may be expanded or strided views; the kernel wants rows.
        dq, dk = rope_backward(dq_rot.contiguous(), dk_rot.contiguous(), positions, cos, sin)
        return dq, dk, None, None, None


def rope_op(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
         cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding of q [B, S, Hq, D] and k [B, S, Hkv, D] at per-token
    positions [B, S], with tables from rope_cos_sin. Differentiable in q and k
    (the tables are constants)."""
    return RoPEFunction.apply(q, k, positions, cos, sin)


RECORD = OpRecord(
    "rope", (rope_forward, rope_backward, rope_cos_sin), torch_mirror="csrc_torch.rope",
    reference="tests.reference.rope", parity="tests.test_torch_backend:rope_parity",
    bench="bench.ops_activation:rope_bench", compile_specs="tests.sm90_compile:rope_specs")
