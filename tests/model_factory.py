"""Tiny random LlamaForCausalLM checkpoints on disk, built with transformers.

Import from any test:

    from tests.model_factory import make_tiny_llama_dir
    ckpt = make_tiny_llama_dir(tmp_path)                    # 2 layers, GQA 6/2, llama3 rope
    ckpt = make_tiny_llama_dir(tmp_path, tie_word_embeddings=True, max_shard_size="20KB")

The directory holds config.json, generation_config.json and model.safetensors
(or model-0000x-of-0000y.safetensors + model.safetensors.index.json when
``max_shard_size`` is below the model's size), exactly as
``LlamaForCausalLM.save_pretrained`` writes them.

Weights are re-drawn so that every tensor differs from every other and from
its transformers default (norm weights are not all ones, projections have
unit-scale outputs): a test that swaps, skips or transposes a tensor fails.
Same ``seed`` -> same checkpoint; the global torch RNG is left untouched.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

# LLaMA-3.1's scaling fields, with original_max_position_embeddings shrunk so
# that the low/high frequency bands fall inside a tiny head_dim's spectrum.
TINY_LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
}
TINY_ROPE_THETA = 500000.0
TINY_MAX_POSITIONS = 512


def tiny_llama_config(*, vocab_size: int = 131, hidden_size: int = 48,
                      intermediate_size: int = 100, num_layers: int = 2, num_heads: int = 6,
                      num_kv_heads: int = 2, head_dim: Optional[int] = None,
                      tie_word_embeddings: bool = False,
                      rope_scaling: Optional[str] = "llama3"):
    """The transformers LlamaConfig make_tiny_llama_dir saves (no weights)."""
    from transformers import LlamaConfig

    if rope_scaling not in ("llama3", None):
        raise ValueError(f"rope_scaling must be 'llama3' or None, got {rope_scaling!r}")
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim if head_dim is not None else hidden_size // num_heads,
        rms_norm_eps=1e-5, rope_theta=TINY_ROPE_THETA,
        rope_scaling=dict(TINY_LLAMA3_ROPE_SCALING) if rope_scaling == "llama3" else None,
        max_position_embeddings=TINY_MAX_POSITIONS, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1, eos_token_id=2, attention_bias=False, mlp_bias=False,
    )


# The families anita reads (anita_core/model/families.py), each with the odd
# sizes that exercise what it adds to LLaMA: a Mistral window shorter than the
# test sequences, Qwen2's q/k/v biases with tied embeddings, a Qwen3 head_dim
# that is not hidden_size / heads (48 / 6 = 8; it gets 12).
FAMILY_EXTRAS = {
    "llama": {},
    "mistral": {"sliding_window": 5},
    "qwen2": {"tie_word_embeddings": True, "use_sliding_window": True, "sliding_window": 4,
              "max_window_layers": 1},
    "qwen3": {"head_dim": 12},
}


def tiny_family_config(family: str, *, vocab_size: int = 131, hidden_size: int = 48,
                       intermediate_size: int = 100, num_layers: int = 2, num_heads: int = 6,
                       num_kv_heads: int = 2, **extras):
    """The transformers config of a tiny ``family`` model (FAMILY_EXTRAS, then ``extras``)."""
    import transformers

    if family == "llama":
        return tiny_llama_config(vocab_size=vocab_size, hidden_size=hidden_size,
                                 intermediate_size=intermediate_size, num_layers=num_layers,
                                 num_heads=num_heads, num_kv_heads=num_kv_heads, **extras)
    cls = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[family]
    settings = dict(FAMILY_EXTRAS[family])
    settings.update(extras)
    settings.setdefault("head_dim", hidden_size // num_heads)
    return cls(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
               num_hidden_layers=num_layers, num_attention_heads=num_heads,
               num_key_value_heads=num_kv_heads, rms_norm_eps=1e-5, rope_theta=TINY_ROPE_THETA,
               max_position_embeddings=TINY_MAX_POSITIONS, bos_token_id=1, eos_token_id=2,
               **settings)


def _randomize(model, seed: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)          # near one, but not one
            elif p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.copy_(noise / p.shape[1] ** 0.5)  # unit-scale projection outputs
            else:
                p.copy_(0.5 * noise)                 # embeddings / lm_head / biases
    return model.to(dtype).train()


def make_tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    **config_kwargs):
    """A ``family`` causal LM (train mode, on CPU) with distinct random weights."""
    from transformers import AutoModelForCausalLM

    config = tiny_family_config(family, **config_kwargs)
    return _randomize(AutoModelForCausalLM.from_config(config), seed, dtype)


def make_tiny_model_dir(tmp_path: Union[str, Path], family: str, *, seed: int = 0,
                        dtype: torch.dtype = torch.float32,
                        max_shard_size: Optional[Union[int, str]] = None, **config_kwargs) -> Path:
    """Save a tiny random ``family`` checkpoint under ``tmp_path``; its directory."""
    model = make_tiny_model(family, seed=seed, dtype=dtype, **config_kwargs)
    settings = "_".join(f"{k}{v}" for k, v in sorted(config_kwargs.items()))
    out = Path(tmp_path) / f"tiny_{family}_{settings}_shard{max_shard_size}_s{seed}"
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kwargs)
    return out


def make_tiny_llama(*, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A LlamaForCausalLM (train mode, on CPU) with distinct random weights."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(**config_kwargs)
    model = LlamaForCausalLM(config)
    return _randomize(model, seed, dtype)


def make_tiny_llama_dir(tmp_path: Union[str, Path], *, vocab_size: int = 131,
                        hidden_size: int = 48, intermediate_size: int = 100,
                        num_layers: int = 2, num_heads: int = 6, num_kv_heads: int = 2,
                        head_dim: Optional[int] = None, tie_word_embeddings: bool = False,
                        rope_scaling: Optional[str] = "llama3",
                        max_shard_size: Optional[Union[int, str]] = None, seed: int = 0,
                        dtype: torch.dtype = torch.float32, name: Optional[str] = None) -> Path:
    """Save a tiny random Llama checkpoint under ``tmp_path`` and return its directory.

    Defaults: vocab 131, hidden 48, MLP 100, 2 layers, 6 query heads sharing 2
    KV heads (GQA), head_dim hidden/heads = 8, llama3 RoPE scaling (theta 5e5,
    see TINY_LLAMA3_ROPE_SCALING), untied lm_head, fp32, one safetensors file.
    ``rope_scaling=None`` gives plain RoPE. ``max_shard_size`` (bytes, or a
    string such as "20KB") shards the checkpoint. ``name`` is the directory
    name (default: derived from the settings, so several can share tmp_path).
    """
    model = make_tiny_llama(seed=seed, dtype=dtype, vocab_size=vocab_size,
                            hidden_size=hidden_size, intermediate_size=intermediate_size,
                            num_layers=num_layers, num_heads=num_heads,
                            num_kv_heads=num_kv_heads, head_dim=head_dim,
                            tie_word_embeddings=tie_word_embeddings, rope_scaling=rope_scaling)
    if name is None:
        name = (f"tiny_llama_v{vocab_size}_h{hidden_size}_i{intermediate_size}_l{num_layers}"
                f"_q{num_heads}_kv{num_kv_heads}_d{head_dim}_tie{int(tie_word_embeddings)}"
                f"_rope{rope_scaling}_shard{max_shard_size}_s{seed}_{str(dtype).split('.')[-1]}")
    out = Path(tmp_path) / name
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kwargs)
    return out


def tiny_llama_state_dict(ckpt_dir: Union[str, Path]) -> dict:
    """Every tensor stored in a checkpoint directory (all shards), by name, in
    memory of its own (safetensors hands out views of the file's memory map,
    which would change if a test rewrote the file)."""
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
        tensors.update({k: v.clone() for k, v in load_file(str(f)).items()})
    return tensors


def load_hf_4bit(ckpt):
    """``ckpt`` as transformers + bitsandbytes load it for QLoRA: NF4 with double
    quantization, fp32 compute, SDPA attention, on the CPU, in train mode.

    Train mode matters (NOTES.md): an eval-mode no-grad forward lets bitsandbytes
    repack the 4-bit weights on this CPU, after which they decode wrongly; TRL's
    reference pass and PeftModel.from_pretrained both run or leave eval-mode."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        ckpt, device_map="cpu", attn_implementation="sdpa",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    return model.train()
