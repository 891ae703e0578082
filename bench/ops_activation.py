"""Benchmark definitions of the per-token ops: rms_norm, rope, swiglu.
T is the token count, e the activation element size in bytes. The LLaMA
norms are frozen under QLoRA, so rms_norm is timed without a weight gradient."""
from __future__ import annotations

from types import SimpleNamespace
from typing import List

import torch

from bench import eager, peers
from bench.cases import Case, OpSpec, Problem, SweepSettings, Work
from anita_core.model.rope_scaling import rope_cos_sin   # a config's rope_scaling dict
from csrc_triton import rms_norm_op, rope_op, swiglu_op

from bench.shapes import LLAMA3_ROPE_THETA, LLAMA31_ROPE_SCALING

EPS = 1e-5


def _element_size(settings: SweepSettings) -> int:
    return torch.finfo(settings.ctx.dtype).bits // 8


# ------------------------------------------------------------------ rms_norm
def _rms_norm_problems(settings: SweepSettings) -> List[Problem]:
    """y = x * rsqrt(mean(x^2) + eps) * w over rows of x [T, H].
    forward:  bytes = 2 T H e + H e + 4 T (x in, y out, w, fp32 rstd);
              flops = 4 T H (square, sum, x rstd, x w)
    backward: bytes = 3 T H e + H e + 4 T (dy, x in, dx out, w, rstd);
              flops = 7 T H (x rstd, dy w, their product, sum, xhat mean, subtract, x rstd)"""
    h, e = settings.dims.hidden, _element_size(settings)
    problems = []
    for t in settings.tokens:
        def make(t=t):
            gen = settings.generator(f"rms_norm/{t}")
            return {"x": settings.randn((t, h), gen, grad=True),
                    "w": (1.0 + settings.randn((h,), gen, scale=0.1))}
        problems.append(Problem("rms_norm", f"T={t} H={h}", t, "", make,
                                Work(2 * t * h * e + h * e + 4 * t, 4 * t * h),
                                Work(3 * t * h * e + h * e + 4 * t, 7 * t * h)))
    return problems


def _rms_norm_ours(inp, ctx) -> Case:
    x, w = inp["x"], inp["w"]
    return Case(lambda: (rms_norm_op(x, w, EPS),), wrt=(x,))


def _rms_norm_torch(inp, ctx, fn=eager.rms_norm) -> Case:
    x, w = inp["x"], inp["w"]
    return Case(lambda: (fn(x, w, EPS),), wrt=(x,))


def _rms_norm_compile(inp, ctx) -> Case:
    return _rms_norm_torch(inp, ctx, peers.compiled(ctx, eager.rms_norm))


def _rms_norm_liger(inp, ctx) -> Case:
    functional = peers.liger(ctx)
    x, w = inp["x"], inp["w"]
    # in_place=False: the in-place variant overwrites dy, which the timed
    # backward reuses on every call.
    return Case(lambda: (functional.liger_rms_norm(x, w, EPS, offset=0.0, casting_mode="llama",
                                                   in_place=False),), wrt=(x,))


def _rms_norm_unsloth(inp, ctx) -> Case:
    kernels = peers.unsloth_kernels(ctx)
    x, w = inp["x"], inp["w"]
    module = SimpleNamespace(weight=w, variance_epsilon=EPS, eps=EPS)
    return Case(lambda: (kernels.fast_rms_layernorm(module, x, gemma=False),), wrt=(x,))


# ------------------------------------------------------------------ rope
def _rope_problems(settings: SweepSettings) -> List[Problem]:
    """Rotate q [1, T, Hq, D] and k [1, T, Hkv, D] by per-token angles.
    forward = backward (the backward is the inverse rotation):
      bytes = 2 T (Hq + Hkv) D e + 8 T (positions) + 4 T D (fp32 cos and sin rows);
      flops = 3 T (Hq + Hkv) D (two products and a sum per output element)"""
    d = settings.dims
    e = _element_size(settings)
    heads = d.n_heads + d.n_kv_heads
    problems = []
    for t in settings.tokens:
        def make(t=t):
            gen = settings.generator(f"rope/{t}")
            cos, sin = rope_cos_sin(d.head_dim, t, LLAMA3_ROPE_THETA, LLAMA31_ROPE_SCALING,
                                    device=settings.ctx.device)
            positions = torch.arange(t, device=settings.ctx.device).unsqueeze(0)
            # transformers' rotary module output: [B, S, D], halves repeated, activation dtype
            full = lambda table: torch.cat((table, table), -1)[positions].to(settings.ctx.dtype)  # noqa: E731
            return {"q": settings.randn((1, t, d.n_heads, d.head_dim), gen, grad=True),
                    "k": settings.randn((1, t, d.n_kv_heads, d.head_dim), gen, grad=True),
                    "positions": positions, "cos": cos, "sin": sin,
                    "cos_full": full(cos), "sin_full": full(sin)}
        work = Work(2 * t * heads * d.head_dim * e + 8 * t + 4 * t * d.head_dim,
                    3 * t * heads * d.head_dim)
        problems.append(Problem("rope", f"T={t} Hq={d.n_heads} Hkv={d.n_kv_heads} D={d.head_dim}",
                                t, "", make, work, work))
    return problems


def _rope_ours(inp, ctx) -> Case:
    q, k = inp["q"], inp["k"]
    return Case(lambda: rope_op(q, k, inp["positions"], inp["cos"], inp["sin"]), wrt=(q, k))


def _rope_torch(inp, ctx, fn=eager.rope) -> Case:
    q, k = inp["q"], inp["k"]
    return Case(lambda: fn(q, k, inp["cos_full"], inp["sin_full"]), wrt=(q, k))


def _rope_compile(inp, ctx) -> Case:
    return _rope_torch(inp, ctx, peers.compiled(ctx, eager.rope))


def _to_bshd(outputs):
    return [o.transpose(1, 2) for o in outputs]


def _rope_liger(inp, ctx) -> Case:
    """Liger takes transformers' [B, H, S, D] views (q.transpose(1, 2) of the
    projection output), exactly what the HF attention module hands it."""
    functional = peers.liger(ctx)
    q, k = inp["q"], inp["k"]
    return Case(lambda: functional.liger_rope(q.transpose(1, 2), k.transpose(1, 2),
                                              inp["cos_full"], inp["sin_full"]),
                wrt=(q, k), canonical=_to_bshd)


def _rope_unsloth(inp, ctx) -> Case:
    kernels = peers.unsloth_kernels(ctx)
    q, k = inp["q"], inp["k"]
    cos, sin = inp["cos_full"][0], inp["sin_full"][0]   # Unsloth's [S, D] tables
    return Case(lambda: kernels.fast_rope_embedding(q.transpose(1, 2), k.transpose(1, 2), cos, sin),
                wrt=(q, k), canonical=_to_bshd)


# ------------------------------------------------------------------ swiglu
def _swiglu_problems(settings: SweepSettings) -> List[Problem]:
    """h = silu(g) * u over [T, I] (I = intermediate size).
    forward:  bytes = 3 T I e;  flops = 5 T I (sigmoid as exp, add, divide; two products)
    backward: bytes = 5 T I e (dh, g, u in; dg, du out);  flops = 11 T I"""
    i, e = settings.dims.intermediate, _element_size(settings)
    problems = []
    for t in settings.tokens:
        def make(t=t):
            gen = settings.generator(f"swiglu/{t}")
            return {"gate": settings.randn((t, i), gen, grad=True),
                    "up": settings.randn((t, i), gen, grad=True)}
        problems.append(Problem("swiglu", f"T={t} I={i}", t, "", make,
                                Work(3 * t * i * e, 5 * t * i), Work(5 * t * i * e, 11 * t * i)))
    return problems


def _swiglu_ours(inp, ctx) -> Case:
    g, u = inp["gate"], inp["up"]
    return Case(lambda: (swiglu_op(g, u),), wrt=(g, u))


def _swiglu_torch(inp, ctx, fn=eager.swiglu) -> Case:
    g, u = inp["gate"], inp["up"]
    return Case(lambda: (fn(g, u),), wrt=(g, u))


def _swiglu_compile(inp, ctx) -> Case:
    return _swiglu_torch(inp, ctx, peers.compiled(ctx, eager.swiglu))


def _swiglu_liger(inp, ctx) -> Case:
    functional = peers.liger(ctx)
    g, u = inp["gate"], inp["up"]
    return Case(lambda: (functional.liger_swiglu(g, u),), wrt=(g, u))


def _swiglu_unsloth(inp, ctx) -> Case:
    kernels = peers.unsloth_kernels(ctx)
    g, u = inp["gate"].detach().unsqueeze(0), inp["up"].detach().unsqueeze(0)
    # Unsloth's SwiGLU backward kernel works in place inside its fused LoRA MLP;
    # standalone, only the forward kernel is callable.
    return Case(lambda: (kernels.swiglu_fg_kernel(g, u),),
                canonical=lambda out: [out[0].squeeze(0)])


# The benches of the op records (csrc_triton/records.py: RECORD.bench); bench/kernels.py
# collects them from the records.
def rms_norm_bench(settings: SweepSettings) -> List[OpSpec]:
    return [OpSpec("rms_norm", lambda: _rms_norm_problems(settings),
                   {"ours": _rms_norm_ours, "torch": _rms_norm_torch,
                    "torch.compile": _rms_norm_compile, "liger": _rms_norm_liger,
                    "unsloth": _rms_norm_unsloth}, bound="memory")]


def rope_bench(settings: SweepSettings) -> List[OpSpec]:
    return [OpSpec("rope", lambda: _rope_problems(settings),
                   {"ours": _rope_ours, "torch": _rope_torch, "torch.compile": _rope_compile,
                    "liger": _rope_liger, "unsloth": _rope_unsloth}, bound="memory")]


def swiglu_bench(settings: SweepSettings) -> List[OpSpec]:
    return [OpSpec("swiglu", lambda: _swiglu_problems(settings),
                   {"ours": _swiglu_ours, "torch": _swiglu_torch, "torch.compile": _swiglu_compile,
                    "liger": _swiglu_liger, "unsloth": _swiglu_unsloth}, bound="memory")]
