"""Folders that verify themselves: a manifest of every file's size and hash.

A checkpoint, the final adapter and the DPO reference store each get a
``manifest.json``, written last, inside the temp folder that is then renamed
into place:

    {"format": 1, "hash": "xxh3_128",
     "files": {"adapter/adapter_model.safetensors": {"size": 153056, "xxh3_128": "7234d142..."}, ...}}

``damage(folder)`` checks a folder against it before anything is loaded and
says, in words, what is wrong with the first file that does not match: missing,
cut short (or grown), or bytes changed. It catches what a copy interrupted, a
disk that filled up outside anita, or bit rot leaves. It is no signature: a file
crafted to match is not its concern (and nothing a checkpoint holds can run
code: no pickle is ever read).

A folder without a manifest (written by an older anita, or an adapter written
by PEFT itself) is checked for what can be checked without one: every JSON file
parses, and every safetensors file is exactly as long as its header says (the
header parses, each tensor's byte range matches its dtype and shape, and the
ranges end where the file ends). That catches a file cut short, not bytes
changed in place.

Why xxh3-128 rather than sha256: each file is hashed from the page cache right
after it is written. For a LLaMA-3-8B r16 checkpoint (503.5 MB: the fp32
adapter and AdamW's two moments) on this project's shared 2-core CPU, the
manifest took 2.9-4.0% of the rest of the write by CPU time (4.5-8.2% of wall
time, which counts waits for a core); sha256 (hashlib, SHA-NI) would take
16-20% / 25-41% (``python -m bench.checkpoint_hash``, bench/README.md).
Damage detection needs no cryptographic hash; xxhash is installed with
`datasets` already, and setup.py names it.
"""
from __future__ import annotations

import json
import mmap
import os
from pathlib import Path
from typing import Dict, Iterable, Optional

import xxhash

from anita_core.hf.files import DTYPE_BYTES

MANIFEST_FILE = "manifest.json"
FORMAT = 1
HASH = "xxh3_128"
_MAX_HEADER = 100 * 2**20        # safetensors' own limit on a header's length


def file_hash(path: Path) -> str:
    """xxh3-128 of a file's bytes (mapped, not copied)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_128(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return xxhash.xxh3_128(mapped).hexdigest()


def _files_under(folder: Path) -> Iterable[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST_FILE:
            yield path


def write_manifest(folder: Path) -> Path:
    """Record the size and hash of every file under ``folder`` (call once they
    are complete) in folder/manifest.json, fsynced."""
    folder = Path(folder)
    files: Dict[str, dict] = {}
    for path in _files_under(folder):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size,
                                                      HASH: file_hash(path)}
    target = folder / MANIFEST_FILE
    with open(target, "w") as f:
        json.dump({"format": FORMAT, "hash": HASH, "files": files}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return target


def _read_manifest(path: Path):
    """(files dict, None) or (None, the problem)."""
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, OSError) as e:
        return None, f"{path.name}: unreadable: {e}"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("hash") != HASH or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get(HASH), str)
            for v in files.values()):
        return None, f"{path.name}: not a manifest this version reads (format {FORMAT}, hash {HASH})"
    return files, None


def _entry_problem(path: Path, name: str, entry: dict) -> Optional[str]:
    if not path.is_file():
        return f"{name}: missing"
    size = path.stat().st_size
    if size != entry["size"]:
        how = "cut short" if size < entry["size"] else "longer than written"
        return f"{name}: {how}, {size:,} bytes of the {entry['size']:,} written"
    if file_hash(path) != entry[HASH]:
        return f"{name}: bytes changed since it was written (its {HASH} hash differs)"
    return None


def safetensors_problem(path: Path) -> Optional[str]:
    """What is wrong with a safetensors file's framing, or None: the header must
    parse and the tensors' byte ranges must tile the file to its end."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"cut short, {size:,} bytes: too few for a safetensors header"
        length = int.from_bytes(head, "little")
        if length > min(size - 8, _MAX_HEADER):
            return f"cut short, or not safetensors: its header claims {length:,} of its {size:,} bytes"
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as e:
            return f"not safetensors: its header is not valid JSON: {e}"
    end = 0
    for name, info in header.items() if isinstance(header, dict) else ():
        if name == "__metadata__":
            continue
        try:
            (start, stop), shape, width = info["data_offsets"], info["shape"], DTYPE_BYTES[info["dtype"]]
            count = 1
            for dim in shape:
                count *= dim
        except (KeyError, TypeError, ValueError):
            return f"header entry {name!r} is malformed"
        if stop - start != count * width:
            return f"malformed: tensor {name!r} spans {stop - start:,} bytes, not shape {shape} {info['dtype']}"
        end = max(end, stop)
    expected = 8 + length + end
    if size != expected:
        how = "cut short" if size < expected else "longer than its header says"
        return f"{how}, {size:,} bytes of the {expected:,} its header describes"
    return None


def _structure_problem(folder: Path) -> Optional[str]:
    """What can be checked without a manifest (see the module docstring)."""
    for path in _files_under(folder):
        name = path.relative_to(folder).as_posix()
        if path.suffix == ".json":
            try:
                json.loads(path.read_bytes())
            except (ValueError, OSError) as e:
                return f"{name}: not valid JSON: {e}"
        elif path.suffix == ".safetensors":
            problem = safetensors_problem(path)
            if problem:
                return f"{name}: {problem}"
    return None


def damage(folder: Path) -> Optional[str]:
    """None if ``folder`` is intact, else what is wrong (naming the file).

    Checked against folder/manifest.json; or, for a folder inside a checkpoint
    (its adapter/), against the entries of the checkpoint's manifest under it;
    or, with no manifest, by structure only."""
    folder = Path(folder)
    own, parent = folder / MANIFEST_FILE, folder.parent / MANIFEST_FILE
    if own.is_file():
        files, problem = _read_manifest(own)
        base, prefix = folder, ""
    elif parent.is_file():
        files, problem = _read_manifest(parent)
        base, prefix = folder.parent, folder.name + "/"
        if files is not None and not any(name.startswith(prefix) for name in files):
            return _structure_problem(folder)
    else:
        return _structure_problem(folder)
    if problem:
        return problem
    for name, entry in files.items():
        if name.startswith(prefix):
            problem = _entry_problem(base / name, name[len(prefix):], entry)
            if problem:
                return problem
    return None
