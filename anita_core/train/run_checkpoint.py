"""Atomic training checkpoints: adapter (PEFT format) + optimizer, schedule, RNG
and data position, so a run resumes exactly where it stopped.

Layout under <output_dir>/checkpoints/:
    step-00000042/adapter/...        PEFT adapter_config.json + adapter_model.safetensors
    step-00000042/trainer_state.pt   everything else
    latest                           text file naming the newest complete checkpoint

A checkpoint is assembled in a hidden temp directory and renamed into place,
and ``latest`` is replaced atomically afterwards, so a process killed at any
moment leaves the previous checkpoint intact and pointed to.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from anita_core.lora import save_peft

LATEST = "latest"
STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"


def rng_snapshot(dropout_generator: Optional[torch.Generator]) -> dict:
    snap = {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        snap["cuda"] = torch.cuda.get_rng_state_all()
    if dropout_generator is not None:
        snap["dropout"] = dropout_generator.get_state()
    return snap


def rng_restore(snap: dict, dropout_generator: Optional[torch.Generator]) -> None:
    torch.set_rng_state(snap["torch"])
    random.setstate(snap["python"])
    np.random.set_state(snap["numpy"])
    if "cuda" in snap and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snap["cuda"])
    if dropout_generator is not None and "dropout" in snap:
        dropout_generator.set_state(snap["dropout"])


def _write_text_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(output_dir: Path, step: int, adapters, state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep``."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step:08d}."))
    try:
        save_peft(adapters, tmp / ADAPTER_DIR)
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():          # a re-save of the same step (e.g. after resume)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomically(root / LATEST, final.name)
    if keep > 0:
        done = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    root = Path(output_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def load_checkpoint_state(checkpoint: Path) -> dict:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trainer state (not a complete anita checkpoint)")
    return torch.load(path, map_location="cpu", weights_only=False)
