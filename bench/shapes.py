"""The model dimensions the benchmarks sweep: LLaMA-3-8B for GPU runs, a tiny
stand-in (odd sizes, small enough for the Triton interpreter) for smoke runs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

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

    def model_config(self, layers: int = None) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab, hidden_size=self.hidden,
                           intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers if layers is None else layers,
                           num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
                           head_dim=self.head_dim, rms_norm_eps=1e-5, rope_theta=LLAMA3_ROPE_THETA,
                           rope_scaling=dict(LLAMA31_ROPE_SCALING),
                           max_position_embeddings=self.max_positions,
                           bos_token_id=None, eos_token_id=None)

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
