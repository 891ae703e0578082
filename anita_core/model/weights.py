"""Containers for a loaded base model: frozen NF4 projections plus the small
tensors that stay in the compute dtype (embeddings, norms, lm_head)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from csrc_triton import NF4Weight
from csrc_triton.nf4_concat import concatenate_rows, concatenation_problem, segment_views

# PEFT's target-module names, in the order they appear inside a decoder layer.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
# Projections that read the same input, run as one NF4 matmul on the row
# concatenation of their weights (the names stay per projection everywhere else).
FUSED_GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def projection_module_path(layer: int, projection: str) -> str:
    """HF module path of a projection, e.g. model.layers.3.self_attn.q_proj."""
    group = "self_attn" if projection in ATTENTION_PROJECTIONS else "mlp"
    return f"model.layers.{layer}.{group}.{projection}"


@dataclass
class LayerWeights:
    input_layernorm: torch.Tensor            # [hidden], compute dtype
    post_attention_layernorm: torch.Tensor   # [hidden], compute dtype
    projections: Dict[str, NF4Weight] = field(default_factory=dict)  # keyed by PROJECTIONS
    # FUSED_GROUPS name -> the row concatenation of its members; each member in
    # ``projections`` is then a view into it (nf4_concat.segment_view): one copy of the bytes
    fused: Dict[str, NF4Weight] = field(default_factory=dict)
    # a family's extras (model/families.py), frozen, compute dtype: the bias of each
    # projection that has one (qwen2: q/k/v, [out_features]) and the per-head q/k
    # RMSNorm weights (qwen3, [head_dim])
    biases: Dict[str, torch.Tensor] = field(default_factory=dict)
    q_norm: Optional[torch.Tensor] = None
    k_norm: Optional[torch.Tensor] = None
    # the layer's attention window (ModelConfig.windows; None: full causal), set by the model
    attention_window: Optional[int] = None
    _joined_biases: Dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        fuse_projections(self)

    def bias_of(self, names) -> Optional[torch.Tensor]:
        """The bias of the row concatenation of projections ``names`` (None when none
        of them has one; zeros stand in for a member without), made once per layer."""
        names = tuple(names)
        if not any(n in self.biases for n in names):
            return None
        if names not in self._joined_biases:
            like = next(iter(self.biases.values()))
            parts = [self.biases[n] if n in self.biases else
                     torch.zeros(self.projections[n].shape[0], dtype=like.dtype, device=like.device)
                     for n in names]
            self._joined_biases[names] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self._joined_biases[names]


def fuse_projections(layer: LayerWeights) -> None:
    """Concatenate every complete FUSED_GROUPS group of ``layer`` whose weights allow it
    (nf4_concat.concatenation_problem) and point its members at views of the result, so
    the separate weights' storage is released once nothing else holds it."""
    for group, members in FUSED_GROUPS.items():
        if group in layer.fused or not all(m in layer.projections for m in members):
            continue
        weights = [layer.projections[m] for m in members]
        if concatenation_problem(weights) is not None:
            continue
        fused = concatenate_rows(weights)
        layer.fused[group] = fused
        layer.projections.update(zip(members, segment_views(fused)))


@dataclass
class BaseWeights:
    embed_tokens: torch.Tensor               # [vocab, hidden], compute dtype
    layers: List[LayerWeights]
    norm: torch.Tensor                       # [hidden], compute dtype
    lm_head: Optional[torch.Tensor]          # [vocab, hidden]; None when tied to embed_tokens

    @property
    def output_embedding(self) -> torch.Tensor:
        return self.embed_tokens if self.lm_head is None else self.lm_head
