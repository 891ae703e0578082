"""Where each tensor of a HuggingFace safetensors checkpoint lives, read from
the file headers only (no tensor data is touched here).

A checkpoint directory holds either one ``model.safetensors`` or several
``model-0000x-of-0000y.safetensors`` shards listed by
``model.safetensors.index.json`` (``{"weight_map": {tensor name: shard file}}``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Bytes per element of each safetensors dtype tag.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_TAGS = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorEntry:
    file: Path                # the safetensors file holding it
    shape: Tuple[int, ...]
    dtype: str                # safetensors tag: F32, BF16, U8, ...

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * DTYPE_BYTES.get(self.dtype, 0)


@dataclass
class TensorCatalog:
    """Every tensor of a checkpoint: name -> TensorEntry, plus the file that
    listed it (the index, or the single file) for error messages."""
    directory: Path
    listing: Path
    entries: Dict[str, TensorEntry]

    def files(self) -> List[Path]:
        """The data files in a stable order (shard order)."""
        return sorted({e.file for e in self.entries.values()})

    def names_in(self, file: Path) -> List[str]:
        return [n for n, e in self.entries.items() if e.file == file]


def catalog_checkpoint(directory: Path) -> TensorCatalog:
    """Read the index (if any) and every shard header.

    FileNotFoundError: the directory, or a shard the index names, is missing.
    ValueError: the index is malformed, or a tensor it names is not in its shard.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: checkpoint directory does not exist")
    index_path = directory / INDEX_FILE
    single_path = directory / SINGLE_FILE
    if index_path.is_file():
        weight_map = _read_weight_map(index_path)
        listing = index_path
    elif single_path.is_file():
        weight_map = None
        listing = single_path
    else:
        others = sorted(p.name for p in directory.iterdir()
                        if p.suffix in (".bin", ".pt", ".pth", ".gguf", ".safetensors"))
        hint = f" (found {others}; only safetensors checkpoints are supported)" if others else ""
        raise FileNotFoundError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} "
                                f"found{hint}")

    entries: Dict[str, TensorEntry] = {}
    if weight_map is None:
        entries.update(_read_header(single_path, None))
    else:
        by_file: Dict[str, List[str]] = {}
        for name, shard in weight_map.items():
            by_file.setdefault(shard, []).append(name)
        for shard in sorted(by_file):
            shard_path = directory / shard
            if not shard_path.is_file():
                raise FileNotFoundError(
                    f"{index_path}: shard '{shard}' (holding tensor '{by_file[shard][0]}' "
                    f"and {len(by_file[shard]) - 1} more) does not exist in {directory}")
            entries.update(_read_header(shard_path, by_file[shard]))
    return TensorCatalog(directory=directory, listing=listing, entries=entries)


def _read_weight_map(index_path: Path) -> Dict[str, str]:
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index_path}: not valid JSON ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: field 'weight_map' is missing or empty")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
            raise ValueError(f"{index_path}: tensor '{name}' maps to {shard!r}, "
                             "not a file name in the checkpoint directory")
    return weight_map


def _read_header(path: Path, expected_names) -> Dict[str, TensorEntry]:
    """Shapes and dtypes of the tensors in one file, from its header."""
    out: Dict[str, TensorEntry] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            names = sorted(present) if expected_names is None else expected_names
            for name in names:
                if name not in present:
                    raise ValueError(f"{path}: tensor '{name}' is listed in {INDEX_FILE} "
                                     "but not stored in this shard")
                s = f.get_slice(name)
                out[name] = TensorEntry(file=path, shape=tuple(s.get_shape()), dtype=s.get_dtype())
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types on a corrupt header
        raise ValueError(f"{path}: cannot read safetensors header ({e})") from e
    return out
