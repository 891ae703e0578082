"""What one decoder block allocates, declared once: the width and dtype of every
[rows, width] buffer, the MLP's row chunks, and which buffers a block's Saved holds
under each policy. block.py allocates its own buffers from these declarations and the
memory planner (anita_core.memory.replay) counts its bytes from them, so the two
cannot drift apart.

Widths are columns per token row; "fp32" buffers are float32 whatever the activation
dtype (the norms' rstd, the attention's log-sum-exp), the rest are in it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

# the largest [rows x intermediate] MLP tensor of one chunk, in bytes (like the fused
# loss's 256 MiB logits chunk): at LLaMA-3-8B in bf16, 9,344 rows; every chunk
# tensor of the backward together stays near 2 GiB whatever T is
MLP_CHUNK_BYTES = 256 * 2**20
MLP_CHUNK_ALIGN = 64        # rows: whole row tiles of the matmul kernels


@dataclass(frozen=True)
class BlockDims:
    """The widths a block's buffers are made of (from a ModelConfig, or a layer's weights)."""
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def of_config(cls, config) -> "BlockDims":
        return cls(config.hidden_size, config.intermediate_size, config.num_attention_heads,
                   config.num_key_value_heads, config.head_dim)


# name -> (columns as a function of BlockDims, float32 whatever the activation dtype)
_WIDTHS = {
    "h": (lambda d: d.hidden, False),           # block input / output, h1, dh
    "x": (lambda d: d.hidden, False),           # a normed input (x1, x2)
    "rstd": (lambda d: 1, True),                # a norm's 1/rms per row
    "q": (lambda d: d.n_heads * d.head_dim, False),
    "kv": (lambda d: d.n_kv_heads * d.head_dim, False),
    "qkv": (lambda d: (d.n_heads + 2 * d.n_kv_heads) * d.head_dim, False),  # dq|dk|dv
    "attn": (lambda d: d.n_heads * d.head_dim, False),
    "lse": (lambda d: d.n_heads, True),         # the attention's log-sum-exp
    "q_rstd": (lambda d: d.n_heads, True),      # per-head q norm's 1/rms (Qwen3's q_norm)
    "kv_rstd": (lambda d: d.n_kv_heads, True),  # per-head k norm's 1/rms (Qwen3's k_norm)
    "inter": (lambda d: d.intermediate, False),  # one of g, u, m (an MLP chunk's rows)
    "gate_up": (lambda d: 2 * d.intermediate, False),  # d[gate, up] of an MLP chunk
}
BUFFERS = tuple(_WIDTHS)

# what a block's Saved (block.Saved) holds between its forward and its backward, per
# policy, by field; the backward of a recompute or offload policy builds the rest
# itself from h0 (and the dropout generator's state, when the layer draws masks)
SAVED_BY_POLICY = {
    # x1, x2: [T, x]; rstd1, rstd2: [T, rstd]; qr: [T, q]; attention: k [T, kv], v
    # [T, kv], out [T, attn], lse [T, lse]; a: out's view; h0, h1: [T, h]; each MLP
    # chunk's g, u, m [rows, inter] and LoRA contexts; proj: the attention's contexts
    "keep": ("h0", "proj", "x1", "rstd1", "qr", "attention", "a", "h1", "x2", "rstd2",
             "mlp_chunks", "dims"),
    "recompute": ("h0", "generator_state"),
    # h0 waits off the device (the model's activation_stash, stash.py) until its backward
    "offload": ("generator_state",),
}
# a family with per-head q/k norms (ModelConfig.qk_norm) keeps, under "keep", also
# Saved.qk_norm: the normed heads' inputs q_pre [T, q], k_pre [T, kv] and their
# rstd [T, q_rstd], [T, kv_rstd] (the normed q, k are qr and attention's k)
SAVED_WITH_QK_NORM = ("qk_norm",)


def buffer_width(name: str, dims: BlockDims) -> int:
    return _WIDTHS[name][0](dims)


def buffer_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if _WIDTHS[name][1] else dtype


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def buffer_row_bytes(dims: BlockDims, dtype: torch.dtype) -> Dict[str, int]:
    """Bytes per token row of every declared buffer (a [T, .] buffer is T * this)."""
    return {n: buffer_width(n, dims) * element_size(buffer_dtype(n, dtype)) for n in BUFFERS}


def new_buffer(name: str, rows: int, dims: BlockDims, like: torch.Tensor) -> torch.Tensor:
    """An uninitialized [rows, width] buffer of a declared kind, on ``like``'s device."""
    return torch.empty(rows, buffer_width(name, dims), dtype=buffer_dtype(name, like.dtype),
                       device=like.device)


def mlp_chunk_rows(tokens: int, intermediate: int, dtype: torch.dtype) -> int:
    """Rows of one MLP chunk for a T = ``tokens`` block: at most MLP_CHUNK_BYTES per
    [rows x intermediate] tensor, a multiple of MLP_CHUNK_ALIGN when that is at least
    one tile, the chunks of equal size up to the last (no tiny tail); T itself when
    that fits (one chunk)."""
    per_row = intermediate * element_size(dtype)
    limit = max(1, MLP_CHUNK_BYTES // per_row)
    if limit >= MLP_CHUNK_ALIGN:
        limit -= limit % MLP_CHUNK_ALIGN
    if tokens <= limit:
        return max(tokens, 1)
    n_chunks = -(-tokens // limit)
    rows = -(-tokens // n_chunks)
    if limit >= MLP_CHUNK_ALIGN:
        rows = min(limit, -(-rows // MLP_CHUNK_ALIGN) * MLP_CHUNK_ALIGN)
    return rows


def row_chunks(tokens: int, rows: int) -> List[slice]:
    """The MLP's row chunks of a T-row block, in row order (one empty chunk when T = 0)."""
    return [slice(i, min(i + rows, tokens)) for i in range(0, tokens, rows)] or [slice(0, 0)]


def chunk_sizes(tokens: int, rows: int) -> List[int]:
    """The rows of each of row_chunks(tokens, rows)."""
    return [s.stop - s.start for s in row_chunks(tokens, rows)]

