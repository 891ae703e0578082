"""Model FLOPs of one QLoRA training step, and the GPU peaks MFU is taken against.

Per step of B sequences of S tokens (T = B S tokens), a model with L layers,
Hq query heads of size d, frozen weights N_frozen and LoRA weights N_lora:

    flops = T (4 N_frozen + 6 N_lora) + 6 B L S^2 Hq d

* N_frozen = the seven projections of every layer plus the lm_head (V x H).
  Frozen weights get no weight gradient, so each costs 2 flops per token in
  the forward (one multiply-add) and 2 in the backward (the input gradient
  dX = dY W): 4 per token, not the 6 of full training. The embedding is a
  lookup (no flops); norms, RoPE, SwiGLU and the softmax are O(T H), under
  0.1 % here, and not counted.
* N_lora = r (in + out) per adapted projection: forward 2, input gradient 2,
  weight gradient 2 -> 6 per token.
* Attention scores and values: QK^T and PV are 2 S^2 d multiply-adds per head
  and layer, i.e. 4 S^2 d flops; causal masking halves the useful part
  (2 S^2 d); the backward is twice the forward: 6 S^2 d per head and layer.
* Recomputation for activation checkpointing (ours always recomputes a block's
  internals in its backward; the HF baseline runs with gradient checkpointing)
  is not counted: MFU counts the model's flops, not the hardware's
  (Chowdhery et al. 2022, PaLM, appendix B).

MFU = flops / step time / peak. Two peaks are reported: the bf16 matmul
throughput measured in the same run (bench.common.measure_ceilings), and the
vendor's dense bf16 datasheet figure when the device is in DATASHEET_TFLOPS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from anita_core.model.config import ModelConfig, projection_shapes

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets,
# keyed by a substring of torch.cuda.get_device_name().
DATASHEET_TFLOPS = {
    "H100 80GB HBM3": 989.4,   # H100 SXM5
    "H100 PCIe": 756.0,
    "H200": 989.4,
    "A100": 312.0,
}


def datasheet_tflops(device_name: str) -> Optional[float]:
    for key, value in DATASHEET_TFLOPS.items():
        if key in device_name:
            return value
    return None


@dataclass(frozen=True)
class ParameterCounts:
    frozen: int          # projections + lm_head
    lora: int            # A and B of every adapted projection
    frozen_projections: int


def parameter_counts(config: ModelConfig, lora_r: int, targets: Sequence[str]) -> ParameterCounts:
    shapes = projection_shapes(config)
    layers = config.num_hidden_layers
    projections = layers * sum(out * inp for out, inp in shapes.values())
    lm_head = config.vocab_size * config.hidden_size
    lora = layers * sum(lora_r * (shapes[t][0] + shapes[t][1]) for t in targets)
    return ParameterCounts(frozen=projections + lm_head, lora=lora, frozen_projections=projections)


def training_step_flops(config: ModelConfig, batch: int, seq: int, lora_r: int,
                        targets: Sequence[str]) -> int:
    """The formula of the module docstring."""
    counts = parameter_counts(config, lora_r, targets)
    tokens = batch * seq
    dense = tokens * (4 * counts.frozen + 6 * counts.lora)
    attention = 6 * batch * config.num_hidden_layers * seq * seq * config.num_attention_heads \
        * config.head_dim
    return dense + attention
