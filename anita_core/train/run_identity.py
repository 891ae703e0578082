"""What makes a checkpoint belong to a run: the settings recorded in it and
compared on --resume (model, LoRA configuration, seed, data, batch shape,
world size), with fingerprints of the model and the tokenized data."""
from __future__ import annotations

import hashlib
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Sequence

import torch


def _hash_value(h, value) -> None:
    """Feed a data item (dataclass, list of ints, text...) into a hash."""
    if is_dataclass(value):
        for f in fields(value):
            h.update(f.name.encode())
            _hash_value(h, getattr(value, f.name))
    elif isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        h.update(b"ints%d:" % len(value))
        h.update(torch.tensor(list(value), dtype=torch.int64).numpy().tobytes())
    elif isinstance(value, (list, tuple)):
        h.update(b"list%d:" % len(value))
        for v in value:
            _hash_value(h, v)
    else:
        h.update(repr(value).encode())


def data_fingerprint(*splits: Sequence) -> str:
    """sha256 over the tokenized train and eval examples, in order: any change of
    files, rows, template, lengths or split shows."""
    h = hashlib.sha256()
    for items in splits:
        _hash_value(h, list(items))
    return h.hexdigest()[:16]


def model_fingerprint(model_dir: str) -> str:
    """config.json's content and the weight files' names and sizes: the same model
    moved to another folder keeps its identity."""
    h = hashlib.sha256()
    root = Path(model_dir)
    config = root / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for f in sorted(root.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def run_settings(script: str, model_dir: str, adapters, data, *, seed: int, batch_size: int,
                 gradient_accumulation_steps: int, world_size: int = 1,
                 sharded_base: bool = False) -> dict:
    """What a checkpoint must share with the run that resumes it. The global
    batch (micro-batch x accumulation x world size) is recorded rather than the
    world size, so a run may resume on another number of ranks with the same
    updates; the base's mode (whole or sharded over the ranks) must match."""
    c = adapters.config
    return {"script": script, "model": model_fingerprint(model_dir),
            "lora": f"r={c.r} alpha={c.alpha} dropout={c.dropout} rslora={c.use_rslora} "
                    f"targets={','.join(c.target_modules)}",
            "seed": seed, "data": data_fingerprint(data.train, data.eval),
            "batch_size": batch_size,
            "global_batch": batch_size * gradient_accumulation_steps * world_size,
            "base_weights": "sharded over ranks" if sharded_base
            else "whole on each rank"}
