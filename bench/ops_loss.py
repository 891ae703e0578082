"""Benchmark definitions of the loss ops: cross_entropy, fused_linear_cross_entropy,
token_logprobs. T tokens, V vocabulary, H hidden size, e the activation element
size in bytes. Every label is a real token (no ignore_index), so every provider
does the same work. The lm_head W [V, H] is frozen under QLoRA: no dW.

The fused providers (ours, Liger) compute the gradient inside the forward call
when the input requires grad, as they do in training; their 'forward' time
therefore includes the backward's matmul and their 'backward' is a rescale.
Compare providers on 'both' for these ops."""
from __future__ import annotations

from typing import List

import torch

from bench import eager, peers
from bench.cases import Case, OpSpec, Problem, SweepSettings, Work
from csrc_triton import cross_entropy_op, fused_linear_cross_entropy, token_logprobs


def _element_size(settings: SweepSettings) -> int:
    return torch.finfo(settings.ctx.dtype).bits // 8


def _labels(settings: SweepSettings, gen: torch.Generator, t: int) -> torch.Tensor:
    return torch.randint(0, settings.dims.vocab, (t,), generator=gen, device=settings.ctx.device)


def _loss_only(outputs):
    return [outputs[0]]


# ------------------------------------------------------------------ cross_entropy
def _ce_problems(settings: SweepSettings) -> List[Problem]:
    """Summed cross-entropy of logits [T, V] against labels [T].
    forward:  bytes = T V e + 8 T + 4;  flops = 4 T V (max, subtract, exp, sum)
    backward: bytes = 2 T V e + 8 T + 4 T (logits in, gradient out, labels, lse);
              flops = 4 T V (subtract lse, exp, subtract one-hot, scale)"""
    v, e = settings.dims.vocab, _element_size(settings)
    problems = []
    for t in settings.tokens:
        def make(t=t):
            gen = settings.generator(f"ce/{t}")
            return {"logits": settings.randn((t, v), gen, grad=True), "labels": _labels(settings, gen, t)}
        problems.append(Problem("cross_entropy", f"T={t} V={v}", t, "", make,
                                Work(t * v * e + 8 * t + 4, 4 * t * v),
                                Work(2 * t * v * e + 12 * t, 4 * t * v)))
    return problems


def _ce_ours(inp, ctx) -> Case:
    logits, labels = inp["logits"], inp["labels"]
    return Case(lambda: cross_entropy_op(logits, labels), wrt=(logits,), canonical=_loss_only)


def _ce_torch(inp, ctx, fn=eager.cross_entropy) -> Case:
    logits, labels = inp["logits"], inp["labels"]
    return Case(lambda: (fn(logits, labels),), wrt=(logits,))


def _ce_compile(inp, ctx) -> Case:
    return _ce_torch(inp, ctx, peers.compiled(ctx, eager.cross_entropy))


def _ce_liger(inp, ctx) -> Case:
    functional = peers.liger(ctx)
    logits, labels = inp["logits"], inp["labels"]
    # Liger writes the gradient over the logits during the forward (by design).
    return Case(lambda: (functional.liger_cross_entropy(logits, labels, reduction="sum"),),
                wrt=(logits,))


def _ce_unsloth(inp, ctx) -> Case:
    kernels = peers.unsloth_kernels(ctx)
    logits, labels = inp["logits"], inp["labels"]
    n = labels.numel()  # every label counts, so the mean times T is the sum
    return Case(lambda: (kernels.fast_cross_entropy_loss(logits.unsqueeze(0), labels.unsqueeze(0)) * n,),
                wrt=(logits,))


# ------------------------------------------------------------------ lm-head + loss
def _linear_problems(settings: SweepSettings, op: str) -> List[Problem]:
    """lm_head projection h [T, H] @ W^T [H, V] fused with its loss.
    fused_linear_cross_entropy:
      forward:  bytes = T H e + V H e + 8 T;  flops = 2 T V H + 4 T V
      backward: bytes = T H e + V H e + 8 T + T H e (dh out);  flops = 2 T V H + 4 T V
    token_logprobs (per-token log p(label), fp32 [T] out):
      forward:  bytes as above + 4 T;  backward: + 4 T (dlogp in); flops as above.
    The backward counts dh = dlogits W only; recomputing the logits (ours does,
    chunk by chunk, instead of storing [T, V]) is not counted as useful work."""
    d, e = settings.dims, _element_size(settings)
    v, h = d.vocab, d.hidden
    extra = 4 if op == "token_logprobs" else 0
    problems = []
    for t in settings.tokens:
        def make(t=t):
            gen = settings.generator(f"{op}/{t}")
            return {"hidden": settings.randn((t, h), gen, grad=True),
                    "weight": settings.randn((v, h), gen, scale=h ** -0.5),
                    "labels": _labels(settings, gen, t)}
        matmul, elementwise = 2 * t * v * h, 4 * t * v
        problems.append(Problem(op, f"T={t} V={v} H={h}", t, "", make,
                                Work(t * h * e + v * h * e + (8 + extra) * t, matmul + elementwise),
                                Work(2 * t * h * e + v * h * e + (8 + extra) * t,
                                     matmul + elementwise)))
    return problems


def _flce_ours(inp, ctx) -> Case:
    h, w, labels = inp["hidden"], inp["weight"], inp["labels"]
    return Case(lambda: fused_linear_cross_entropy(h, w, labels), wrt=(h,), canonical=_loss_only)


def _flce_torch(inp, ctx, fn=eager.fused_linear_cross_entropy) -> Case:
    h, w, labels = inp["hidden"], inp["weight"], inp["labels"]
    return Case(lambda: (fn(h, w, labels),), wrt=(h,))


def _flce_compile(inp, ctx) -> Case:
    return _flce_torch(inp, ctx, peers.compiled(ctx, eager.fused_linear_cross_entropy))


def _flce_liger(inp, ctx) -> Case:
    functional = peers.liger(ctx)
    h, w, labels = inp["hidden"], inp["weight"], inp["labels"]
    return Case(lambda: (functional.liger_fused_linear_cross_entropy(h, w, labels, reduction="sum"),),
                wrt=(h,))


def _logprobs_ours(inp, ctx) -> Case:
    h, w, labels = inp["hidden"], inp["weight"], inp["labels"]
    return Case(lambda: (token_logprobs(h, w, labels),), wrt=(h,))


def _logprobs_torch(inp, ctx, fn=eager.token_logprobs) -> Case:
    h, w, labels = inp["hidden"], inp["weight"], inp["labels"]
    return Case(lambda: (fn(h, w, labels),), wrt=(h,))


def _logprobs_compile(inp, ctx) -> Case:
    return _logprobs_torch(inp, ctx, peers.compiled(ctx, eager.token_logprobs))


# The benches of the op records (csrc_triton/records.py: RECORD.bench).
def cross_entropy_bench(settings: SweepSettings) -> List[OpSpec]:
    return [OpSpec("cross_entropy", lambda: _ce_problems(settings),
                   {"ours": _ce_ours, "torch": _ce_torch, "torch.compile": _ce_compile,
                    "liger": _ce_liger, "unsloth": _ce_unsloth}, bound="memory")]


def linear_loss_bench(settings: SweepSettings) -> List[OpSpec]:
    note = ("fused_linear_cross_entropy: ours and Liger compute the gradient inside the forward "
            "call; compare providers on mode 'both'")
    return [
        OpSpec("fused_linear_cross_entropy",
               lambda: _linear_problems(settings, "fused_linear_cross_entropy"),
               {"ours": _flce_ours, "torch": _flce_torch, "torch.compile": _flce_compile,
                "liger": _flce_liger}, bound="compute", notes=(note,)),
        OpSpec("token_logprobs", lambda: _linear_problems(settings, "token_logprobs"),
               {"ours": _logprobs_ours, "torch": _logprobs_torch,
                "torch.compile": _logprobs_compile}, bound="compute",
               notes=("token_logprobs: Liger and Unsloth have no per-token log-prob kernel",)),
    ]
