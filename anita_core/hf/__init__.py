"""HuggingFace checkpoint formats in and out: config.json and safetensors (full
precision, quantized to NF4 on load, or pre-quantized bitsandbytes 4-bit), and
the merged export that plain transformers loads.

Layer: imports csrc_triton, model and lora (the export merges adapters); never
data or train. The PEFT adapter format lives with the adapters (anita_core.lora).

  check_checkpoint    its config, checked with every file header (no tensor data read) (load.py)
  load_base_weights   config + frozen NF4 base from a checkpoint folder   (load.py)
  load_model          the same, wrapped in a QLoRALlama                   (load.py)
  export_merged       base + adapter merged, written as a HF checkpoint   (export.py)
"""
from anita_core.hf.export import export_merged
from anita_core.hf.load import check_checkpoint, load_base_weights, load_model

__all__ = ["check_checkpoint", "load_base_weights", "load_model", "export_merged"]
