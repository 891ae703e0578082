"""The "torch eager" provider: each op written the way a plain PyTorch / HF
transformers + PEFT + bitsandbytes model computes it, in the run's dtype.

These are baselines to time (and to torch.compile), and the reference every
other provider's output is checked against before it is timed. They are not
the float64 test oracles of tests/reference/.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from csrc_triton.nf4 import NF4Weight
from csrc_triton.nf4_codebook import nf4_code

IGNORE_INDEX = -100


# ------------------------------------------------------------------ activations
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalize in fp32, cast back, then scale."""
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' apply_rotary_pos_emb on [B, S, H, D] tensors; cos and sin are
    [B, S, D] (both halves repeated, activation dtype), gathered by position
    once per model forward by the rotary-embedding module, as in transformers."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# ------------------------------------------------------------------ losses
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy, logits upcast to fp32 first (as transformers does)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                               labels: torch.Tensor) -> torch.Tensor:
    """lm_head then loss, materializing the [T, V] logits (what the HF model does)."""
    return cross_entropy(hidden @ weight.t(), labels)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(h W^T)[label] in fp32, 0 where the label is ignored (TRL's DPO way)."""
    logp = (hidden @ weight.t()).float().log_softmax(-1)
    picked = logp.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(labels == IGNORE_INDEX, torch.zeros_like(picked), picked)


# ------------------------------------------------------------------ NF4
def nf4_absmax(q: NF4Weight) -> torch.Tensor:
    """Per-block fp32 scale, decoding the double quantization when present."""
    if not q.double_quant:
        return q.absmax
    group = torch.arange(q.n_blocks, device=q.absmax.device) // 256
    return q.nested_code[q.absmax.long()] * q.nested_absmax[group] + q.nested_offset


def nf4_dequantize(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """Lookup-table dequantization in torch ops (numel must be a multiple of the block)."""
    packed = q.packed.long()
    idx = torch.stack((packed >> 4, packed & 15), dim=1).reshape(-1, q.blocksize)
    values = q.code[idx] * nf4_absmax(q)[:, None]
    return values.to(dtype).view(q.shape)


def nf4_quantize(w: torch.Tensor, blocksize: int):
    """(packed uint8, absmax fp32): nearest-midpoint NF4 in torch ops, single level.
    A value exactly on a midpoint takes the lower code, like bitsandbytes."""
    blocks = w.float().reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(1e-38)[:, None]
    code = nf4_code(w.device)
    midpoints = (code[:-1] + code[1:]) / 2
    idx = torch.bucketize(scaled, midpoints).reshape(-1).to(torch.uint8)
    return (idx[0::2] << 4) | idx[1::2], absmax


def nf4_matmul(x: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """Dequantize the whole weight, then one cuBLAS matmul (bitsandbytes' path
    for more than one token)."""
    return x @ nf4_dequantize(q, x.dtype).t()


def lora_linear(x: torch.Tensor, q: NF4Weight, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float) -> torch.Tensor:
    """PEFT's LoRA on a 4-bit linear: base(x) + (B (A x)) * scale, the adapter
    in its fp32 weights' dtype, the sum in x's dtype."""
    low_rank = (x.to(lora_a.dtype) @ lora_a.t()) @ lora_b.t() * scale
    return nf4_matmul(x, q) + low_rank.to(x.dtype)
