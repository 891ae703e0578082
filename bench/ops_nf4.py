"""Benchmark definitions of the NF4 ops: nf4_quantize, nf4_dequantize, nf4_matmul,
lora_linear. Shapes are the model's distinct projection weights [N, K]
(N = out_features, K = in_features); T is the token count; e the activation
element size in bytes; bs the NF4 block size.

NF4 storage of an [N, K] weight (bytes), S(N, K):
  single level:  N K / 2 (packed nibbles) + 4 N K / bs (fp32 absmax) + 64 (code)
  double quant:  N K / 2 + N K / bs (uint8 absmax) + 4 ceil(N K / (256 bs))
                 (nested fp32 absmax) + 1024 (nested code) + 4 (offset) + 64
"""
from __future__ import annotations

from typing import List

import torch

from bench import eager, peers
from bench.cases import Case, OpSpec, Problem, SweepSettings, Work
from csrc_triton import NF4Weight, lora_linear_op, nf4_dequantize, nf4_matmul_op, nf4_quantize


def storage_bytes(n: int, k: int, blocksize: int, double_quant: bool) -> int:
    numel = n * k
    blocks = -(-numel // blocksize)
    if double_quant:
        return numel // 2 + blocks + 4 * -(-blocks // 256) + 1024 + 4 + 64
    return numel // 2 + 4 * blocks + 64


def _weight_groups(settings: SweepSettings):
    groups = settings.dims.projection_groups()
    if settings.projections:
        unknown = [p for p in settings.projections if p not in groups]
        if unknown:
            raise SystemExit(f"unknown projection group(s) {unknown}; choose from {list(groups)}")
        groups = {p: groups[p] for p in settings.projections}
    return groups


def _quantized_weight(settings: SweepSettings, group: str, n: int, k: int, double_quant: bool):
    w = settings.randn((n, k), settings.generator(f"weight/{group}"), scale=k ** -0.5)
    return nf4_quantize(w, settings.dims.blocksize, double_quant=double_quant)


def _dequantized(q: NF4Weight) -> List[torch.Tensor]:
    return [eager.nf4_dequantize(q, torch.float32)]


# ------------------------------------------------------------------ nf4_quantize
def _quantize_problems(settings: SweepSettings) -> List[Problem]:
    """Quantize a weight [N, K] to single-level NF4 (no double quantization, so
    every provider does the same thing).
    bytes = N K e + S_single(N, K);  flops = 18 N K (abs, block max, scale, and 15
    midpoint comparisons per element)."""
    e = torch.finfo(settings.ctx.dtype).bits // 8
    bs = settings.dims.blocksize
    problems = []
    for group, (n, k) in _weight_groups(settings).items():
        def make(group=group, n=n, k=k):
            weight = settings.randn((n, k), settings.generator(f"weight/{group}"), scale=k ** -0.5)
            return {"w": weight, "blocksize": bs}
        problems.append(Problem(op="nf4_quantize", shape=f"N={n} K={k}", tokens=None, group=group,
                                make_inputs=make,
                                forward_work=Work(n * k * e + storage_bytes(n, k, bs, False),
                                                  18 * n * k),
                                backward_work=None))
    return problems


def _from_parts(packed, absmax, w, blocksize) -> NF4Weight:
    return NF4Weight(packed=packed.reshape(-1), absmax=absmax, shape=w.shape, blocksize=blocksize,
                     dtype=w.dtype)


def _quantize_ours(inp, ctx) -> Case:
    w, bs = inp["w"], inp["blocksize"]
    return Case(lambda: (nf4_quantize(w, bs, double_quant=False),),
                canonical=lambda out: _dequantized(out[0]))


def _quantize_torch(inp, ctx, fn=eager.nf4_quantize) -> Case:
    w, bs = inp["w"], inp["blocksize"]
    return Case(lambda: fn(w, bs), canonical=lambda out: _dequantized(_from_parts(*out, w, bs)))


def _quantize_compile(inp, ctx) -> Case:
    return _quantize_torch(inp, ctx, peers.compiled(ctx, eager.nf4_quantize))


def _quantize_bnb(inp, ctx) -> Case:
    functional = peers.bitsandbytes().functional
    w, bs = inp["w"], inp["blocksize"]
    run = lambda: functional.quantize_4bit(w, blocksize=bs, quant_type="nf4",  # noqa: E731
                                           compress_statistics=False)
    return Case(run, canonical=lambda out: _dequantized(NF4Weight.from_bnb(*out)))


# ------------------------------------------------------------------ nf4_dequantize
def _dequantize_problems(settings: SweepSettings) -> List[Problem]:
    """Decode an NF4 weight [N, K] (double-quantized unless --no-double-quant).
    bytes = S(N, K) + N K e;  flops = N K (code value x block scale) plus 2 per
    block to decode a double-quantized scale."""
    e = torch.finfo(settings.ctx.dtype).bits // 8
    bs, dq = settings.dims.blocksize, settings.double_quant
    problems = []
    for group, (n, k) in _weight_groups(settings).items():
        def make(group=group, n=n, k=k):
            return {"q": _quantized_weight(settings, group, n, k, dq)}
        flops = n * k + (2 * -(-n * k // bs) if dq else 0)
        problems.append(Problem(op="nf4_dequantize", shape=f"N={n} K={k}", tokens=None,
                                group=group, make_inputs=make,
                                forward_work=Work(storage_bytes(n, k, bs, dq) + n * k * e, flops),
                                backward_work=None))
    return problems


def _dequantize_ours(inp, ctx) -> Case:
    q = inp["q"]
    return Case(lambda: (nf4_dequantize(q, ctx.dtype),))


def _dequantize_torch(inp, ctx, fn=eager.nf4_dequantize) -> Case:
    q = inp["q"]
    return Case(lambda: (fn(q, ctx.dtype),))


def _dequantize_compile(inp, ctx) -> Case:
    return _dequantize_torch(inp, ctx, peers.compiled(ctx, eager.nf4_dequantize))


def _bnb_parts(q: NF4Weight, ctx):
    """(packed [numel/2, 1], QuantState) sharing q's storage; dequantizes to ctx.dtype."""
    packed, state = q.to_bnb()
    state.dtype = ctx.dtype
    return packed, state


def _dequantize_bnb(inp, ctx) -> Case:
    functional = peers.bitsandbytes().functional
    packed, state = _bnb_parts(inp["q"], ctx)
    return Case(lambda: (functional.dequantize_4bit(packed, state),))


def _dequantize_unsloth(inp, ctx) -> Case:
    kernels = peers.unsloth_kernels(ctx)
    packed, state = _bnb_parts(inp["q"], ctx)
    return Case(lambda: (kernels.fast_dequantize(packed, state),))


# ------------------------------------------------------------------ nf4_matmul
def _matmul_problems(settings: SweepSettings, op: str = "nf4_matmul") -> List[Problem]:
    """y = x W^T, x [T, K], W [N, K] in NF4 (frozen: the backward is dx only).
    forward:  bytes = T K e + S(N, K) + T N e;  flops = 2 T N K
    backward: bytes = T N e + S(N, K) + T K e;  flops = 2 T N K
    lora_linear adds A [r, K] and B [N, r] (fp32):
    forward:  bytes += 4 r (K + N);  flops += 2 T r (K + N)        (x A^T, then B)
    backward: bytes += 8 r (K + N) (read A, B; write dA, dB);
              flops += 4 T r (K + N)     (g = dY B, dB = dY^T xa, dA = g^T x, dx += g A)"""
    e = torch.finfo(settings.ctx.dtype).bits // 8
    bs, dq, r = settings.dims.blocksize, settings.double_quant, settings.lora_r
    lora = op == "lora_linear"
    problems = []
    for group, (n, k) in _weight_groups(settings).items():
        for t in settings.tokens:
            def make(group=group, n=n, k=k, t=t):
                gen = settings.generator(f"x/{group}/{t}")
                inputs = {"x": settings.randn((t, k), gen, grad=True),
                          "q": _quantized_weight(settings, group, n, k, dq)}
                if lora:
                    inputs["A"] = settings.randn((r, k), gen, torch.float32, k ** -0.5, True)
                    inputs["B"] = settings.randn((n, r), gen, torch.float32, r ** -0.5, True)
                    inputs["scale"] = settings.lora_alpha / r
                return inputs
            store = storage_bytes(n, k, bs, dq)
            fwd = Work(t * k * e + store + t * n * e, 2 * t * n * k)
            bwd = Work(t * n * e + store + t * k * e, 2 * t * n * k)
            if lora:
                fwd += Work(4 * r * (k + n), 2 * t * r * (k + n))
                bwd += Work(8 * r * (k + n), 4 * t * r * (k + n))
            problems.append(Problem(op=op, shape=f"T={t} N={n} K={k}", tokens=t, group=group,
                                    make_inputs=make, forward_work=fwd, backward_work=bwd))
    return problems


def _matmul_ours(inp, ctx) -> Case:
    x, q = inp["x"], inp["q"]
    return Case(lambda: (nf4_matmul_op(x, q),), wrt=(x,))


def _matmul_torch(inp, ctx, fn=eager.nf4_matmul) -> Case:
    x, q = inp["x"], inp["q"]
    return Case(lambda: (fn(x, q),), wrt=(x,))


def _matmul_compile(inp, ctx) -> Case:
    return _matmul_torch(inp, ctx, peers.compiled(ctx, eager.nf4_matmul))


def _matmul_bnb(inp, ctx) -> Case:
    bnb = peers.bitsandbytes()
    x = inp["x"]
    packed, state = _bnb_parts(inp["q"], ctx)
    return Case(lambda: (bnb.matmul_4bit(x, packed.t(), quant_state=state),), wrt=(x,))


def _matmul_unsloth(inp, ctx) -> Case:
    kernels = peers.unsloth_kernels(ctx)
    x = inp["x"]
    packed, state = _bnb_parts(inp["q"], ctx)
    # Unsloth's fused LoRA backward lives inside its whole-MLP / QKV autograd
    # functions; on a single projection only its forward can be timed.
    return Case(lambda: (kernels.matmul_lora(x.detach(), packed, state, None, None, None),))


# ------------------------------------------------------------------ lora_linear
def _lora_ours(inp, ctx) -> Case:
    x, q, a, b, s = inp["x"], inp["q"], inp["A"], inp["B"], inp["scale"]
    return Case(lambda: (lora_linear_op(x, q, a, b, s),), wrt=(x, a, b))


def _lora_torch(inp, ctx, fn=eager.lora_linear) -> Case:
    x, q, a, b, s = inp["x"], inp["q"], inp["A"], inp["B"], inp["scale"]
    return Case(lambda: (fn(x, q, a, b, s),), wrt=(x, a, b))


def _lora_compile(inp, ctx) -> Case:
    return _lora_torch(inp, ctx, peers.compiled(ctx, eager.lora_linear))


def _lora_bnb(inp, ctx) -> Case:
    """PEFT's LoRA layer over bitsandbytes' Linear4bit, as functions."""
    bnb = peers.bitsandbytes()
    x, a, b, s = inp["x"], inp["A"], inp["B"], inp["scale"]
    packed, state = _bnb_parts(inp["q"], ctx)

    def run():
        base = bnb.matmul_4bit(x, packed.t(), quant_state=state)
        return (base + ((x.to(a.dtype) @ a.t()) @ b.t() * s).to(base.dtype),)
    return Case(run, wrt=(x, a, b))


def _lora_unsloth(inp, ctx) -> Case:
    kernels = peers.unsloth_kernels(ctx)
    x, a, b, s = inp["x"], inp["A"], inp["B"], inp["scale"]
    packed, state = _bnb_parts(inp["q"], ctx)
    return Case(lambda: (kernels.matmul_lora(x.detach(), packed, state, a.detach(), b.detach(), s),))


# The benches of the op records (csrc_triton/records.py: RECORD.bench).
def nf4_quantize_bench(settings: SweepSettings) -> List[OpSpec]:
    return [OpSpec("nf4_quantize", lambda: _quantize_problems(settings),
                   {"ours": _quantize_ours, "torch": _quantize_torch,
                    "torch.compile": _quantize_compile, "bitsandbytes": _quantize_bnb},
                   bound="memory",
                   notes=("nf4_quantize: single-level NF4 for every provider (quantization runs "
                          "once per model load, not per step)",))]


def nf4_dequantize_bench(settings: SweepSettings) -> List[OpSpec]:
    return [OpSpec("nf4_dequantize", lambda: _dequantize_problems(settings),
                   {"ours": _dequantize_ours, "torch": _dequantize_torch,
                    "torch.compile": _dequantize_compile, "bitsandbytes": _dequantize_bnb,
                    "unsloth": _dequantize_unsloth}, bound="memory")]


def nf4_matmul_bench(settings: SweepSettings) -> List[OpSpec]:
    return [OpSpec("nf4_matmul", lambda: _matmul_problems(settings),
                   {"ours": _matmul_ours, "torch": _matmul_torch, "torch.compile": _matmul_compile,
                    "bitsandbytes": _matmul_bnb, "unsloth": _matmul_unsloth}, bound="compute")]


def lora_linear_bench(settings: SweepSettings) -> List[OpSpec]:
    return [OpSpec("lora_linear", lambda: _matmul_problems(settings, "lora_linear"),
                   {"ours": _lora_ours, "torch": _lora_torch, "torch.compile": _lora_compile,
                    "bitsandbytes": _lora_bnb, "unsloth": _lora_unsloth}, bound="compute",
                   notes=("lora_linear 'bitsandbytes' = bnb.matmul_4bit plus PEFT's fp32 LoRA "
                          "branch, written as functions",))]
