"""The model dimensions the benchmarks sweep: LLaMA-3-8B for GPU runs (and, with
``--family``, Mistral-7B, Qwen2.5-7B and Qwen3-8B: each family's real dimensions and
what its block adds), a tiny stand-in per family (odd sizes, small enough for the
Triton interpreter) for smoke runs."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

from anita_core.model.config import ModelConfig, projection_shapes

LLAMA3_ROPE_THETA = 500000.0
# LLaMA-3.1's RoPE scaling: positions up to 131072 are in-distribution, so the
# long-sequence sweeps stay meaningful.
LLAMA31_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class Dims:
    name: str
    hidden: int
    intermediate: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    layers: int
    blocksize: int = 64          # NF4 block size (QLoRA default)
    max_positions: int = 131072
    family: str = "llama"        # model/families.py: what the block adds to LLaMA's
    sliding_window: Optional[int] = None     # every layer's (Mistral-7B-v0.1: 4096)
    rope_theta: float = LLAMA3_ROPE_THETA

    def model_config(self, layers: int = None) -> ModelConfig:
        from anita_core.model.families import FAMILIES
        family = FAMILIES[self.family]
        n_layers = self.layers if layers is None else layers
        return ModelConfig(vocab_size=self.vocab, hidden_size=self.hidden,
                           intermediate_size=self.intermediate, num_hidden_layers=n_layers,
                           num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
                           head_dim=self.head_dim, rms_norm_eps=1e-5, rope_theta=self.rope_theta,
                           rope_scaling=dict(LLAMA31_ROPE_SCALING) if self.family == "llama" else None,
                           max_position_embeddings=self.max_positions,
                           bos_token_id=None, eos_token_id=None, model_type=self.family,
                           qkv_bias=family.qkv_bias, qk_norm=family.qk_norm,
                           layer_windows=None if self.sliding_window is None
                           else (self.sliding_window,) * n_layers)

    def projection_groups(self) -> Dict[str, Tuple[int, int]]:
        """Distinct (out, in) projection shapes, keyed by the projections that
        have them, e.g. {'q_proj,o_proj': (4096, 4096), 'k_proj,v_proj': (1024, 4096), ...}."""
        by_shape: Dict[Tuple[int, int], List[str]] = {}
        for name, shape in projection_shapes(self.model_config(layers=1)).items():
            by_shape.setdefault(tuple(shape), []).append(name)
        return {",".join(names): shape for shape, names in by_shape.items()}


LLAMA3_8B = Dims(name="llama3-8b", hidden=4096, intermediate=14336, vocab=128256, n_heads=32,
                 n_kv_heads=8, head_dim=128, layers=32)

# Smoke: every weight row is a whole number of NF4 blocks, as in every real
# LLaMA shape (bitsandbytes 0.50's CPU dequantize_4bit decodes wrongly when a
# row is not, e.g. [64, 96] with blocks of 64: relative error 0.26, not 0.09;
# and the eager reference decodes whole blocks); the vocabulary is odd.
SMOKE = Dims(name="smoke-tiny", hidden=64, intermediate=192, vocab=301, n_heads=4, n_kv_heads=2,
             head_dim=16, layers=2, max_positions=16384)

# The other families at their published sizes (each model's config.json)
MISTRAL_7B = Dims(name="mistral-7b", hidden=4096, intermediate=14336, vocab=32768, n_heads=32,
                  n_kv_heads=8, head_dim=128, layers=32, family="mistral", sliding_window=4096,
                  rope_theta=1e6, max_positions=32768)
QWEN25_7B = Dims(name="qwen2.5-7b", hidden=3584, intermediate=18944, vocab=152064, n_heads=28,
                 n_kv_heads=4, head_dim=128, layers=28, family="qwen2", rope_theta=1e6,
                 max_positions=32768)
QWEN3_8B = Dims(name="qwen3-8b", hidden=4096, intermediate=12288, vocab=151936, n_heads=32,
                n_kv_heads=8, head_dim=128, layers=36, family="qwen3", rope_theta=1e6,
                max_positions=40960)
GPU_DIMS = {"llama": LLAMA3_8B, "mistral": MISTRAL_7B, "qwen2": QWEN25_7B, "qwen3": QWEN3_8B}
# the smoke stand-in with each family's features (a window shorter than SMOKE_TOKENS'
# rows for Mistral, so the window is exercised)
SMOKE_DIMS = {"llama": SMOKE,
              "mistral": replace(SMOKE, name="smoke-mistral", family="mistral", sliding_window=5),
              "qwen2": replace(SMOKE, name="smoke-qwen2", family="qwen2"),
              "qwen3": replace(SMOKE, name="smoke-qwen3", family="qwen3", head_dim=32)}


def family_dims(family: str, smoke: bool) -> Dims:
    """The dimensions a benchmark runs for ``family`` (--family): the GPU sizes or the smoke ones."""
    return (SMOKE_DIMS if smoke else GPU_DIMS)[family]


GPU_TOKENS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
SMOKE_TOKENS = (13,)  # odd, and not a multiple of any block size
# In a smoke run the NF4 ops take two weight shapes (one wide, one tall)
# instead of all four: the interpreter pays ~10 ms per kernel launch.
SMOKE_PROJECTIONS = ("k_proj,v_proj", "down_proj")


def parse_int_list(text: str) -> Tuple[int, ...]:
    """'512,1024, 2048' -> (512, 1024, 2048); argparse type for sweeps."""
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"expected a comma-separated list of positive integers, got {text!r}")
    return values
