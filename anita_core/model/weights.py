"""Containers for a loaded base model: frozen NF4 projections plus the small
tensors that stay in the compute dtype (embeddings, norms, lm_head)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from csrc_triton import NF4Weight

# PEFT's target-module names, in the order they appear inside a decoder layer.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


def projection_module_path(layer: int, projection: str) -> str:
    """HF module path of a projection, e.g. model.layers.3.self_attn.q_proj."""
    group = "self_attn" if projection in ATTENTION_PROJECTIONS else "mlp"
    return f"model.layers.{layer}.{group}.{projection}"


@dataclass
class LayerWeights:
    input_layernorm: torch.Tensor            # [hidden], compute dtype
    post_attention_layernorm: torch.Tensor   # [hidden], compute dtype
    projections: Dict[str, NF4Weight] = field(default_factory=dict)  # keyed by PROJECTIONS


@dataclass
class BaseWeights:
    embed_tokens: torch.Tensor               # [vocab, hidden], compute dtype
    layers: List[LayerWeights]
    norm: torch.Tensor                       # [hidden], compute dtype
    lm_head: Optional[torch.Tensor]          # [vocab, hidden]; None when tied to embed_tokens

    @property
    def output_embedding(self) -> torch.Tensor:
        return self.embed_tokens if self.lm_head is None else self.lm_head
