"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p).

Prompts of different lengths are left-padded into one batch; padding slots are
masked out of every attention and positions count real tokens only, so each
row generates exactly what it would generate alone.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from anita_core.model.attention import cached_attention
from anita_core.model.block import BlockGeometry, block_forward
from anita_core.model.ops import rms_norm_forward


class KVCache:
    """Per-layer keys/values [B, L, Hkv, D] (after RoPE) and which slots are real."""

    def __init__(self, n_layers, batch, capacity, n_kv_heads, head_dim, dtype, device):
        shape = (batch, capacity, n_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0

    def attend_fn(self, layer: int, start: int, window: Optional[int] = None):
        def attend(q, k, v):
            n = q.shape[1]
            self.keys[layer][:, start:start + n] = k
            self.values[layer][:, start:start + n] = v
            slots = torch.arange(start, start + n, device=q.device)
            end = start + n
            return cached_attention(q, self.keys[layer][:, :end], self.values[layer][:, :end],
                                    slots, self.valid[:, :end], window)
        return attend


def _step(model, cache: KVCache, input_ids, positions, key_valid) -> torch.Tensor:
    """Run ``input_ids`` [B, n] through the model, appending to the cache; return
    the last position's logits [B, V] in fp32."""
    c = model.config
    B, n = input_ids.shape
    start = cache.length
    cache.valid[:, start:start + n] = key_valid
    cos, sin = model.position_tables(positions)
    geo = BlockGeometry(B, n, positions.contiguous(), None, cos, sin, *model.head_counts())
    h = model.embed(input_ids)
    for i, layer in enumerate(model.base.layers):
        attend = cache.attend_fn(i, start, layer.attention_window)
        h, _ = block_forward(h, layer, geo, model.block_lora(i), attend=attend)
    cache.length = start + n
    last = h.view(B, n, -1)[:, -1].contiguous()
    hf, _ = rms_norm_forward(last, model.base.norm, c.rms_norm_eps)
    return hf.float() @ model.base.output_embedding.float().t()


def _pick(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
          generator: Optional[torch.Generator]) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
             seed: Optional[int] = None) -> List[List[int]]:
    """Continue each prompt (a list of token ids); return only the new tokens of
    each, stopping a row at its first eos token. temperature 0 = greedy."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    was_training = model.training
    model.eval()
    try:
        device = model.device
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, P), pad_token_id, dtype=torch.long, device=device)
        real = torch.zeros(B, P, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            ids[b, P - len(p):] = torch.tensor(list(p), dtype=torch.long, device=device)
            real[b, P - len(p):] = True
        positions = (real.long().cumsum(-1) - 1).clamp_min(0)
        c = model.config
        cache = KVCache(len(model.base.layers), B, P + max_new_tokens, c.num_key_value_heads,
                        c.head_dim, model.dtype, device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        logits = _step(model, cache, ids, positions, real)
        next_position = positions[:, -1] + 1
        out: List[List[int]] = [[] for _ in range(B)]
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        eos = set(int(e) for e in eos_token_ids)
        for _ in range(max_new_tokens):
            token = _pick(logits, temperature, top_k, top_p, generator)
            for b in range(B):
                if not finished[b]:
                    out[b].append(int(token[b]))
                    if int(token[b]) in eos:
                        finished[b] = True
            if bool(finished.all()) or cache.length >= P + max_new_tokens:
                break
            logits = _step(model, cache, token[:, None], next_position[:, None],
                           torch.ones(B, 1, dtype=torch.bool, device=device))
            next_position = next_position + 1
        return out
    finally:
        model.train(was_training)


if __name__ == "__main__":      # a library module: say where generation is a command
    import sys
    print("python -m anita_core.model.generate: error: this is a library module (KV-cache "
          "generation), not a command; to generate text run: python chat.py --model DIR \"prompt\"",
          file=sys.stderr)
    sys.exit(2)
