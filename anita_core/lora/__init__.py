"""LoRA adapters: configuration, the trainable A/B parameters, and their file
format (PEFT's, so that `peft.PeftModel.from_pretrained` loads what anita saves
and anita loads what PEFT saves; the format lives with the adapter it stores).

Layer: imports model (geometry and projection names); never hf, data or train.

  LoRAConfig     rank, alpha, dropout, targets, rsLoRA, seed, layers   (config.py)
  LoRAAdapters   the fp32 A/B masters, PEFT-style init, enable/disable (adapters.py)
  save_peft      write a PEFT adapter directory, atomically            (peft.py)
  load_peft      read one saved by anita or by PEFT, fully validated   (peft.py)
  check_peft     load_peft's checks that read no tensor data (files, config, header)
"""
from anita_core.lora.adapters import LoRAAdapters, peft_key
from anita_core.lora.config import LoRAConfig
from anita_core.lora.peft import check_peft, load_peft, lora_config_from_peft, peft_config_dict, save_peft

__all__ = ["LoRAConfig", "LoRAAdapters", "save_peft", "load_peft", "check_peft", "peft_key",
           "peft_config_dict", "lora_config_from_peft"]
