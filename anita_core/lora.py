"""LoRA adapters: the public entry point.

  LoRAConfig     rank, alpha, dropout, targets, rsLoRA, seed, layers   (lora_config.py)
  LoRAAdapters   the fp32 A/B masters, PEFT-style init, enable/disable (lora_adapters.py)
  save_peft      write a PEFT adapter directory, atomically            (lora_peft.py)
  load_peft      read one saved by anita or by PEFT, fully validated   (lora_peft.py)
"""
from anita_core.lora_adapters import LoRAAdapters, peft_key
from anita_core.lora_config import LoRAConfig
from anita_core.lora_peft import load_peft, lora_config_from_peft, peft_config_dict, save_peft

__all__ = ["LoRAConfig", "LoRAAdapters", "save_peft", "load_peft", "peft_key",
           "peft_config_dict", "lora_config_from_peft"]
