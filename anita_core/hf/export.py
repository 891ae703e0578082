"""Write a merged model as a plain HuggingFace checkpoint of its family (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM).

    export_merged(config, base, deltas, "out/merged", tokenizer_dir="base_model")

Each projection is written as ``nf4_dequantize(W) + delta`` (computed in
fp32, then cast to ``dtype``); embeddings, norms, lm_head and a family's biases and q/k norms are written as
they are. ``deltas`` maps (layer, projection) to a dense ``[out, in]`` delta
(a projection without an entry is written as the dequantized base), or is a
callable ``(layer, projection) -> delta or None``, so a LoRA merge can produce
one delta at a time (anita_core.lora computes ``scale * B @ A``).

The output directory appears complete or not at all: everything is written
into a temporary sibling directory that is renamed into place at the end.
Only one shard of merged weights is in memory at a time.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from safetensors.torch import save_file

from csrc_triton import nf4_dequantize
from anita_core.hf.family_tensors import family_tensor, family_tensors
from anita_core.hf.files import INDEX_FILE, SINGLE_FILE
from anita_core.model.config import CONFIG_FILENAME, ModelConfig, projection_shapes
from anita_core.model.weights import PROJECTIONS, BaseWeights, projection_module_path

EXPORT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default shard size
# written into every merged export: chat.py runs such a folder in its stored precision
# by default (its weights are W_nf4 + B A, which re-quantizing would change)
MERGED_MARKER = "anita_merged.json"

# Files copied from tokenizer_dir when present (tokenizer + generation defaults).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")

Delta = Optional[torch.Tensor]
DeltaSource = Union[Dict[Tuple[int, str], torch.Tensor], Callable[[int, str], Delta]]


def export_merged(config: ModelConfig, base: BaseWeights, merged_deltas: Optional[DeltaSource],
                  out_dir: Union[str, os.PathLike], tokenizer_dir: Optional[Union[str, os.PathLike]] = None,
                  dtype: torch.dtype = torch.float32, *,
                  max_shard_size: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Write config.json, model.safetensors (sharded above ``max_shard_size``
    bytes, with model.safetensors.index.json) and the tokenizer files of
    ``tokenizer_dir`` into ``out_dir``; return ``out_dir``.

    ValueError: ``base`` does not match ``config``, a delta has the wrong shape
    or is not finite, a dict key is not a (layer, projection) of the model.
    FileExistsError: ``out_dir`` exists (pass ``overwrite=True`` to replace it).
    FileNotFoundError: ``tokenizer_dir`` holds no tokenizer file.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export_merged: dtype {dtype} is not one of "
                         f"{', '.join(map(str, EXPORT_DTYPES))}")
    if not isinstance(max_shard_size, int) or max_shard_size <= 0:
        raise ValueError(f"export_merged: max_shard_size must be a positive number of bytes, "
                         f"got {max_shard_size!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"export_merged: {out_dir} already exists (pass overwrite=True)")
    _check_base(config, base)
    get_delta = _delta_getter(config, merged_deltas)
    tokenizer_files = _tokenizer_files(tokenizer_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the export is an ordinary directory
    try:
        _write_weights(tmp, config, base, get_delta, dtype, max_shard_size)
        hf = config.to_hf_dict()
        hf["dtype"] = str(dtype).replace("torch.", "")
        (tmp / CONFIG_FILENAME).write_text(json.dumps(hf, indent=2) + "\n")
        (tmp / MERGED_MARKER).write_text(json.dumps(
            {"merged": "nf4_dequantize(W) + LoRA delta", "dtype": hf["dtype"]}) + "\n")
        for f in tokenizer_files:
            shutil.copy2(f, tmp / f.name)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --------------------------------------------------------------------- inputs
def _check_base(config: ModelConfig, base: BaseWeights) -> None:
    h, v = config.hidden_size, config.vocab_size

    def check(name: str, t, shape):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"export_merged: base weight '{name}' has shape {got}; "
                             f"config implies {tuple(shape)}")

    check("model.embed_tokens.weight", base.embed_tokens, (v, h))
    check("model.norm.weight", base.norm, (h,))
    if config.tie_word_embeddings != (base.lm_head is None):
        raise ValueError("export_merged: config.tie_word_embeddings is "
                         f"{config.tie_word_embeddings} but base.lm_head is "
                         f"{'None' if base.lm_head is None else 'a tensor'}")
    if base.lm_head is not None:
        check("lm_head.weight", base.lm_head, (v, h))
    if len(base.layers) != config.num_hidden_layers:
        raise ValueError(f"export_merged: base has {len(base.layers)} layers; config has "
                         f"num_hidden_layers = {config.num_hidden_layers}")
    shapes = projection_shapes(config)
    for i, layer in enumerate(base.layers):
        check(f"model.layers.{i}.input_layernorm.weight", layer.input_layernorm, (h,))
        check(f"model.layers.{i}.post_attention_layernorm.weight",
              layer.post_attention_layernorm, (h,))
        for p in PROJECTIONS:
            q = layer.projections.get(p)
            name = f"{projection_module_path(i, p)}.weight"
            if q is None:
                raise ValueError(f"export_merged: base weight '{name}' is missing")
            if tuple(q.shape) != shapes[p]:
                raise ValueError(f"export_merged: base weight '{name}' has shape "
                                 f"{tuple(q.shape)}; config implies {shapes[p]}")
        for name, shape, slot in family_tensors(config, i):
            check(name, family_tensor(layer, slot), shape)


def _delta_getter(config: ModelConfig, deltas: Optional[DeltaSource]) -> Callable[[int, str], Delta]:
    if deltas is None:
        return lambda layer, projection: None
    if callable(deltas):
        return deltas
    if not isinstance(deltas, dict):
        raise ValueError("export_merged: merged_deltas must be a dict {(layer, projection): tensor}, "
                         f"a callable or None, got {type(deltas).__name__}")
    for key in deltas:
        ok = (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], int)
              and 0 <= key[0] < config.num_hidden_layers and key[1] in PROJECTIONS)
        if not ok:
            raise ValueError(f"export_merged: merged_deltas key {key!r} is not a (layer, "
                             f"projection) with layer < {config.num_hidden_layers} and "
                             f"projection in {PROJECTIONS}")
    return lambda layer, projection: deltas.get((layer, projection))


def _tokenizer_files(tokenizer_dir) -> List[Path]:
    if tokenizer_dir is None:
        return []
    d = Path(tokenizer_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"export_merged: tokenizer_dir {d} does not exist")
    found = [d / n for n in TOKENIZER_FILES if (d / n).is_file()]
    if not any(f.name != "generation_config.json" for f in found):
        raise FileNotFoundError(f"export_merged: {d} holds none of the tokenizer files "
                                f"{TOKENIZER_FILES[:-1]}")
    return found


# -------------------------------------------------------------------- weights
def _tensor_plan(config: ModelConfig) -> List[Tuple[str, Tuple[int, ...]]]:
    """(HF name, shape) of every tensor written, in transformers' layer order."""
    h, v = config.hidden_size, config.vocab_size
    shapes = projection_shapes(config)
    plan = [("model.embed_tokens.weight", (v, h))]
    for i in range(config.num_hidden_layers):
        plan.append((f"model.layers.{i}.input_layernorm.weight", (h,)))
        plan += [(f"{projection_module_path(i, p)}.weight", shapes[p]) for p in PROJECTIONS]
        plan += [(name, shape) for name, shape, _ in family_tensors(config, i)]
        plan.append((f"model.layers.{i}.post_attention_layernorm.weight", (h,)))
    plan.append(("model.norm.weight", (h,)))
    if not config.tie_word_embeddings:
        plan.append(("lm_head.weight", (v, h)))
    return plan


def merged_export_bytes(config: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """The bytes of the weights export_merged writes for ``config`` in ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(itemsize * int(torch.Size(shape).numel()) for _, shape in _tensor_plan(config))


def _shards(plan, itemsize: int, max_bytes: int) -> List[List[Tuple[str, Tuple[int, ...]]]]:
    """Greedy split in order; a tensor larger than max_bytes gets a shard of its own."""
    shards, current, size = [], [], 0
    for name, shape in plan:
        nbytes = itemsize * int(torch.Size(shape).numel())
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _merged_tensors(config: ModelConfig, base: BaseWeights, get_delta, dtype,
                    names: List[str]) -> Iterator[Tuple[str, torch.Tensor]]:
    lookup = {"model.embed_tokens.weight": lambda: base.embed_tokens,
              "model.norm.weight": lambda: base.norm,
              "lm_head.weight": lambda: base.lm_head}
    for i, layer in enumerate(base.layers):
        lookup[f"model.layers.{i}.input_layernorm.weight"] = lambda l=layer: l.input_layernorm
        lookup[f"model.layers.{i}.post_attention_layernorm.weight"] = \
            lambda l=layer: l.post_attention_layernorm
        for p in PROJECTIONS:
            lookup[f"{projection_module_path(i, p)}.weight"] = \
                lambda i=i, p=p: _merged_projection(base, get_delta, i, p)
        for name, _, slot in family_tensors(config, i):
            lookup[name] = lambda l=layer, s=slot: family_tensor(l, s)
    for name in names:
        t = lookup[name]()
        yield name, t.detach().to("cpu", dtype).contiguous()


def _merged_projection(base: BaseWeights, get_delta, layer: int, projection: str) -> torch.Tensor:
    q = base.layers[layer].projections[projection]
    w = nf4_dequantize(q, torch.float32).float()
    delta = get_delta(layer, projection)
    if delta is None:
        return w
    name = f"{projection_module_path(layer, projection)}.weight"
    if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != tuple(w.shape):
        got = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
        raise ValueError(f"export_merged: delta for '{name}' has shape {got}; "
                         f"expected {tuple(w.shape)}")
    if not delta.is_floating_point() or not torch.isfinite(delta).all():
        raise ValueError(f"export_merged: delta for '{name}' must be finite floats")
    return w + delta.detach().to(w.device, torch.float32)


def _write_weights(tmp: Path, config: ModelConfig, base: BaseWeights, get_delta, dtype,
                   max_shard_size: int) -> None:
    plan = _tensor_plan(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _shards(plan, itemsize, max_shard_size)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(dict(_merged_tensors(config, base, get_delta, dtype, [n for n, _ in plan])),
                  str(tmp / SINGLE_FILE), metadata=metadata)
        return
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = dict(_merged_tensors(config, base, get_delta, dtype, [n for n, _ in shard]))
        save_file(tensors, str(tmp / file), metadata=metadata)
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing out_dir (overwrite=True) is
    moved aside first and removed only after the new one is in place."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        old.rmdir()
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
