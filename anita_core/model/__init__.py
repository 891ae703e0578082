"""The decoder: LLaMA geometry, frozen NF4 base weights, one block's forward and
hand-written backward, attention, the whole model, and generation.

Layer: imports csrc_triton and csrc_torch (the launchers, through ops.py) only
(never lora, hf, data, memory or train: the memory planner chooses each layer's
block.LayerPolicy and hands the values in). Adapters reach
the model as plain tensors (``BlockLoRA``), so the model does not know where
they come from.

  ModelConfig   config.json's geometry                           (config.py)
  BaseWeights   NF4 projections + dense embeddings and norms      (weights.py)
  block_forward / block_backward, LayerPolicy, Saved               (block.py)
  QLoRALlama    forward_hidden / backward_hidden / train_step     (llama.py)
  ActivationStash  where offloaded block inputs wait (handed in)  (stash.py)
  generate      KV-cache decoding                                 (generate.py)
"""
from anita_core.model.config import ModelConfig
from anita_core.model.llama import IGNORE_INDEX, LayerHooks, QLoRALlama
from anita_core.model.weights import BaseWeights

__all__ = ["ModelConfig", "BaseWeights", "QLoRALlama", "LayerHooks", "IGNORE_INDEX"]
