"""The HF tensors a model family adds to LLaMA's (model/families.py), named
once for the loader and the merged export: qwen2's q/k/v biases and qwen3's
per-head q/k norm weights. Each is frozen and stays dense in the compute dtype."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from anita_core.model.config import ModelConfig, projection_shapes
from anita_core.model.weights import LayerWeights, projection_module_path

BIASED_PROJECTIONS = ("q_proj", "k_proj", "v_proj")       # ModelConfig.qkv_bias
HEAD_NORMS = ("q_norm", "k_norm")                          # ModelConfig.qk_norm


def family_tensors(config: ModelConfig, layer: int) -> List[Tuple[str, Tuple[int, ...], str]]:
    """(HF name, shape, slot) of layer ``layer``'s extra tensors; slot is
    'bias:<projection>' or 'q_norm' / 'k_norm' (see ``family_tensor``)."""
    shapes = projection_shapes(config)
    out = [(f"{projection_module_path(layer, p)}.bias", (shapes[p][0],), f"bias:{p}")
           for p in (BIASED_PROJECTIONS if config.qkv_bias else ())]
    out += [(f"model.layers.{layer}.self_attn.{n}.weight", (config.head_dim,), n)
            for n in (HEAD_NORMS if config.qk_norm else ())]
    return out


def family_tensor(weights: LayerWeights, slot: str) -> Optional[torch.Tensor]:
    """The tensor ``slot`` (from family_tensors) names in a loaded layer."""
    if slot.startswith("bias:"):
        return weights.biases.get(slot[len("bias:"):])
    return getattr(weights, slot)


def family_layer_fields(slots: dict) -> dict:
    """LayerWeights keyword arguments from {slot: tensor} of one layer."""
    fields = {"biases": {s[len("bias:"):]: t for s, t in slots.items() if s.startswith("bias:")}}
    fields.update({n: slots[n] for n in HEAD_NORMS if n in slots})
    return fields
