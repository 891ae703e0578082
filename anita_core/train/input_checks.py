"""The folders a command is handed, checked before anything expensive happens (the
base model's tensors read, the data tokenized, the output folder touched): each
problem is one line naming the flag, the file and the field, exit code 2.

- The model folder (--model): config.json describes a model anita runs, and the
  safetensors headers hold every tensor it implies with its shape and dtype (no
  tensor data is read: seconds for any model size; hf.load.check_checkpoint).
- Its tokenizer: the folder's tokenizer.json, or the one --tokenizer names; it must
  load and its ids must fit the model's embedding. A model folder without one is an
  error: falling back to the bundled tokenizer would train another model's ids into
  this one, silently (a 49,152-token model trained on 1,024 ids looks like a run).
- Adapter folders (--init-adapter, --reference-adapter, chat.py's --adapter): intact
  by their manifest (or their structure), and their config and tensor shapes what the
  model's config needs (lora.peft.check_peft: the header, not the tensors).

The checks raise BadInput; ``check_inputs`` is the trainers' entry, which turns it
into the one line and exit code 2 (cli.usage_error).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from anita_core.data import Tokenizer, load_tokenizer
from anita_core.hf import check_checkpoint
from anita_core.lora import LoRAConfig, check_peft
from anita_core.model.config import ModelConfig
from anita_core.cli.common import usage_error
from anita_core.train.file_manifest import damage

TOKENIZER_FILE = "tokenizer.json"


class BadInput(ValueError):
    """A folder or file a flag names cannot be used; the message is the whole line."""


@dataclass
class CheckedModel:
    model_dir: str            # the local folder (a hub name resolved to its download)
    config: ModelConfig
    tokenizer: Tokenizer
    tokenizer_dir: str        # the folder holding the tokenizer's files (the merged export copies them)


def resolve_model_dir(model: str) -> str:
    """A local directory as is; otherwise a hub name fetched with huggingface_hub."""
    if os.path.isdir(model):
        return model
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as e:  # offline, unknown repo, gated model...
        raise BadInput(f"--model {model}: not a local directory and could not be fetched from "
                       f"the hub ({type(e).__name__}: {e})") from None


def check_model(model: str, tokenizer: Optional[str] = None) -> CheckedModel:
    """The model folder's config (its files' headers checked against it) and the
    tokenizer that goes with it: ``tokenizer`` (--tokenizer: a folder or a
    tokenizer.json) or the folder's own; BadInput when anything is wrong."""
    model_dir = resolve_model_dir(model)
    try:
        config = check_checkpoint(model_dir)
    except (ValueError, FileNotFoundError) as e:
        raise BadInput(f"--model {model}: {e}") from None
    if tokenizer is None:
        if not os.path.isfile(os.path.join(model_dir, TOKENIZER_FILE)):
            raise BadInput(f"--model {model}: no {TOKENIZER_FILE} there; name this model's "
                           f"tokenizer with --tokenizer DIR (anita does not guess one)")
        flag, path = "--model", model_dir
    else:
        flag, path = "--tokenizer", tokenizer
    try:
        loaded = load_tokenizer(path)
    except (ValueError, FileNotFoundError) as e:
        raise BadInput(f"{flag} {path}: {e}") from None
    if loaded.vocab_size > config.vocab_size:
        raise BadInput(f"{flag} {path}: its {loaded.vocab_size:,} token ids do not fit the model's "
                       f"{config.vocab_size:,} embedding rows ({config.source}: vocab_size); "
                       "the tokenizer of another model?")
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    return CheckedModel(model_dir, config, loaded, folder)


def check_adapter(flag: str, folder: str, config: ModelConfig) -> LoRAConfig:
    """An adapter folder a flag names: there, intact, and shaped for ``config``."""
    if not Path(folder).is_dir():
        raise BadInput(f"{flag} {folder}: no such adapter folder")
    problem = damage(Path(folder))
    if problem:
        raise BadInput(f"{flag} {folder}: damaged: {problem}")
    try:
        return check_peft(folder, config)
    except ValueError as e:
        raise BadInput(f"{flag} {folder}: {e}") from None


def check_inputs(model: str, tokenizer: Optional[str] = None,
                 adapters: Optional[Dict[str, Optional[str]]] = None) -> CheckedModel:
    """The trainers' folders (--model with its tokenizer, and ``adapters``: flag -> folder,
    e.g. --init-adapter, --reference-adapter; None values skipped), each problem one line
    and exit code 2."""
    try:
        checked = check_model(model, tokenizer)
        for flag, folder in (adapters or {}).items():
            if folder:
                check_adapter(flag, folder, checked.config)
    except BadInput as e:
        usage_error(str(e))
    return checked
