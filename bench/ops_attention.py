"""Benchmark definition of flash_attention: causal attention over packed documents with
grouped-query heads, q [1, T, Hq, D], k/v [1, T, Hkv, D], the documents of one packed
row given by segment ids.

Providers (all on the same documents):
  ours            csrc_triton.flash_attention (segment ids, blocks across documents skipped)
  torch           SDPA with the dense [1, 1, T, T] boolean document mask (what anita's model
                  did before; also the correctness reference)
  sdpa_causal     SDPA is_causal on the documents unpacked into their own rows (equal-length
                  documents batched; no mask, no cross-document work), backend as SDPA picks
  sdpa_flash      the same with SDPA held to its FlashAttention backend (sdpa_kernel)
  sdpa_cudnn      the same with SDPA held to its cuDNN backend (GPU only; K and V expanded to
                  the query heads inside the timed call, as HF's repeat_kv does, since that
                  backend takes no grouped-query heads)
  flex_attention  torch's FlexAttention (compiled) with a document block mask (GPU only:
                  its CPU backward is not implemented)
  flash_attn      flash-attn's varlen function with cumulative document offsets, where it imports

FLOPs count the unmasked work only: a document of L tokens has L (L + 1) / 2 visible
(query, key) pairs; forward 4 Hq D per pair (Q K^T and P V), backward 10 Hq D per pair
(S and dP recomputed, dV, dQ, dK), the convention FlashAttention's papers use. So a
provider that also computes masked-out blocks shows lower TFLOP/s, as it should."""
from __future__ import annotations

from typing import List

import torch

from bench import peers
from bench.cases import Case, OpSpec, Problem, SweepSettings, Unavailable, Work
from csrc_triton import flash_attention

# Document length of the packed rows: 2048-token documents on a GPU (T / 2048 of them,
# the ANITA SFT preset packs 8192-token rows); in smoke mode, 5 (13 tokens: 5 + 5 + 3).
GPU_DOCUMENT = 2048
SMOKE_DOCUMENT = 5


def document_lengths(tokens: int, document: int) -> List[int]:
    """Whole documents of ``document`` tokens, then the remainder as one shorter document."""
    lengths = [document] * (tokens // document)
    if tokens % document:
        lengths.append(tokens % document)
    return lengths


def _problems(settings: SweepSettings) -> List[Problem]:
    """Work per token count T (e = element size):
    forward:  bytes = e T D (2 Hq + 2 Hkv) + 4 T Hq (q, k, v in; out, fp32 lse out)
              flops = 4 Hq D sum_docs L (L + 1) / 2
    backward: bytes = e T D (4 Hq + 4 Hkv) + 4 T Hq (q, out, dout, dq; k, v, dk, dv; lse)
              flops = 10 Hq D sum_docs L (L + 1) / 2"""
    d = settings.dims
    e = torch.finfo(settings.ctx.dtype).bits // 8
    document = SMOKE_DOCUMENT if settings.ctx.smoke else GPU_DOCUMENT
    problems = []
    for t in settings.tokens:
        lengths = document_lengths(t, document)
        pairs = sum(n * (n + 1) // 2 for n in lengths)

        def make(t=t, lengths=lengths):
            gen = settings.generator(f"flash_attention/{t}")
            segments = torch.cat([torch.full((n,), i, dtype=torch.int64)
                                  for i, n in enumerate(lengths)])[None].to(settings.ctx.device)
            return {"q": settings.randn((1, t, d.n_heads, d.head_dim), gen, grad=True),
                    "k": settings.randn((1, t, d.n_kv_heads, d.head_dim), gen, grad=True),
                    "v": settings.randn((1, t, d.n_kv_heads, d.head_dim), gen, grad=True),
                    "segment_ids": segments, "lengths": lengths}
        forward = Work(e * t * d.head_dim * (2 * d.n_heads + 2 * d.n_kv_heads) + 4 * t * d.n_heads,
                       4 * d.n_heads * d.head_dim * pairs)
        backward = Work(e * t * d.head_dim * (4 * d.n_heads + 4 * d.n_kv_heads) + 4 * t * d.n_heads,
                        10 * d.n_heads * d.head_dim * pairs)
        problems.append(Problem(
            "flash_attention", f"T={t} docs={len(lengths)}x<={document} Hq={d.n_heads} "
            f"Hkv={d.n_kv_heads} D={d.head_dim}", t, "", make, forward, backward))
    return problems


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


def _ours(inp, ctx) -> Case:
    q, k, v = inp["q"], inp["k"], inp["v"]
    return Case(lambda: (flash_attention(q, k, v, inp["segment_ids"]),), wrt=(q, k, v))


def _sdpa_dense_mask(inp, ctx) -> Case:
    q, k, v = inp["q"], inp["k"], inp["v"]
    seg = inp["segment_ids"][0]
    t = seg.shape[0]
    causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril_()
    mask = ((seg[:, None] == seg[None, :]) & causal)[None, None]      # built once, untimed

    def forward():
        out = torch.nn.functional.scaled_dot_product_attention(
            _heads_first(q), _heads_first(k), _heads_first(v), attn_mask=mask, enable_gqa=True)
        return (_heads_first(out),)
    return Case(forward, wrt=(q, k, v))


def _sdpa_causal_unpacked(inp, ctx, backend=None, expand_kv: bool = False) -> Case:
    """Each document in its own row: equal-length documents form one batch, the
    shorter remainder (if any) a second call; outputs concatenated back in order.
    ``backend``: an SDPBackend SDPA is held to; ``expand_kv``: K and V repeated to the
    query heads (for a backend without grouped-query support)."""
    import contextlib
    q, k, v = inp["q"], inp["k"], inp["v"]
    groups = q.shape[2] // k.shape[2]
    lengths = inp["lengths"]
    full = lengths[0]
    n_full = sum(1 for n in lengths if n == full)
    split = n_full * full

    def rows(t, start, end, length):
        return _heads_first(t[0, start:end].reshape(-1, length, *t.shape[2:]))

    def kv(t, start, end, length):
        t = rows(t, start, end, length)
        return t.repeat_interleave(groups, dim=1) if expand_kv else t

    def forward():
        outs = []
        held = contextlib.nullcontext() if backend is None else _sdpa_kernel(backend)
        with held:
            for start, end, length in ((0, split, full), (split, q.shape[1], q.shape[1] - split)):
                if end > start:
                    out = torch.nn.functional.scaled_dot_product_attention(
                        rows(q, start, end, length), kv(k, start, end, length),
                        kv(v, start, end, length), is_causal=True, enable_gqa=not expand_kv)
                    outs.append(_heads_first(out).reshape(1, end - start, *q.shape[2:]))
        return (torch.cat(outs, dim=1),)
    return Case(forward, wrt=(q, k, v))


def _sdpa_kernel(backend):
    from torch.nn.attention import sdpa_kernel
    return sdpa_kernel([backend])


def _sdpa_flash(inp, ctx) -> Case:
    from torch.nn.attention import SDPBackend
    return _sdpa_causal_unpacked(inp, ctx, SDPBackend.FLASH_ATTENTION)


def _sdpa_cudnn(inp, ctx) -> Case:
    peers.require_gpu(ctx, "SDPA's cuDNN backend")
    from torch.nn.attention import SDPBackend
    return _sdpa_causal_unpacked(inp, ctx, SDPBackend.CUDNN_ATTENTION, expand_kv=True)


def _flex_attention(inp, ctx) -> Case:
    peers.require_gpu(ctx, "FlexAttention (its CPU backward is not implemented)")
    peers.require_not_smoke(ctx, "FlexAttention")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        raise Unavailable(f"flex_attention not importable ({err})") from None
    q, k, v = inp["q"], inp["k"], inp["v"]
    seg = inp["segment_ids"][0]
    t = seg.shape[0]

    def document_causal(b, h, q_idx, kv_idx):
        return (seg[q_idx] == seg[kv_idx]) & (q_idx >= kv_idx)
    block_mask = create_block_mask(document_causal, 1, 1, t, t, device=seg.device)
    compiled = torch.compile(flex_attention)

    def forward():
        out = compiled(_heads_first(q), _heads_first(k), _heads_first(v), block_mask=block_mask,
                       enable_gqa=True)
        return (_heads_first(out),)
    return Case(forward, wrt=(q, k, v))


def _flash_attn_varlen(inp, ctx) -> Case:
    peers.require_gpu(ctx, "flash-attn")
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise Unavailable(f"flash-attn not importable ({err})") from None
    q, k, v = inp["q"], inp["k"], inp["v"]
    lengths = inp["lengths"]
    offsets = torch.tensor([0] + lengths, device=q.device).cumsum(0).to(torch.int32)
    longest = max(lengths)

    def forward():
        out = flash_attn_varlen_func(q[0], k[0], v[0], offsets, offsets, longest, longest,
                                     causal=True)
        return (out[None],)
    return Case(forward, wrt=(q, k, v))


def flash_attention_bench(settings: SweepSettings) -> List[OpSpec]:
    """The flash_attention record's bench (csrc_triton/records.py)."""
    return [OpSpec("flash_attention", lambda: _problems(settings),
                   {"ours": _ours, "torch": _sdpa_dense_mask, "sdpa_causal": _sdpa_causal_unpacked,
                    "sdpa_flash": _sdpa_flash, "sdpa_cudnn": _sdpa_cudnn,
                    "flex_attention": _flex_attention, "flash_attn": _flash_attn_varlen},
                   bound="compute",
                   notes=("flash_attention: TFLOP/s count only the unmasked (causal, same-document) "
                          "pairs; torch = SDPA with a dense document mask",))]
