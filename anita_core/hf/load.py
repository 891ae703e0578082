"""Load a HuggingFace LLaMA safetensors checkpoint as anita's frozen base model.

    config, base = load_base_weights("path/to/Meta-Llama-3-8B-Instruct")

The seven projections of every layer come out as NF4 (``NF4Weight``);
embeddings, norms and lm_head stay dense in ``compute_dtype``.

Memory: the checkpoint is read one tensor at a time, each projection is
quantized the moment it arrives, and the file pages of every consumed tensor
are handed back (pages.py), so the host never holds the
full-precision model, nor even a whole shard: the peak is the result (NF4
projections + dense embeddings, norms, lm_head) plus about one tensor in
flight. bench/load_memory.py measures it.

Pre-quantized bitsandbytes 4-bit checkpoints (config.json has a
``quantization_config`` with ``load_in_4bit`` and ``bnb_4bit_quant_type:
nf4``) are read as stored, without re-quantizing; see bnb.py.

Structural problems are found from config.json and the file headers before
any tensor data is read: a missing directory or shard (FileNotFoundError), a
non-Llama config, a missing tensor, an unexpected tensor (e.g. an extra
layer), a shape or dtype that disagrees with config.json (ValueError). NaN/inf
weights and inconsistent bitsandbytes quant states are found while reading.
Each message names the file and the tensor or field. Nothing half-loaded is
ever returned.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from safetensors import safe_open

from csrc_triton import NF4Weight
from csrc_triton.nf4_codebook import SUPPORTED_BLOCKSIZES
from anita_core.hf.bnb import (OTHER_4BIT_SUFFIXES, QUANT_STATE_SUFFIX,
                                       expected_aux_suffixes, is_skipped_module,
                                       nf4_from_bnb_tensors, packed_nbytes,
                                       read_quantization_config)
from anita_core.hf.pages import MappedPageReleaser, return_freed_heap_to_os
from anita_core.hf.family_tensors import family_layer_fields, family_tensors
from anita_core.hf.files import FLOAT_TAGS, TensorCatalog, catalog_checkpoint
from anita_core.model.llama import QLoRALlama
from anita_core.model.config import CONFIG_FILENAME, ModelConfig, projection_shapes
from anita_core.model.ops import nf4_quantize
from anita_core.model.weights import (PROJECTIONS, BaseWeights, LayerWeights,
                                projection_module_path)

COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class _Dense:
    """A tensor kept dense: where it goes in BaseWeights."""
    shape: Tuple[int, ...]
    layer: Optional[int]       # None for model-level tensors
    slot: str                  # embed_tokens / norm / lm_head / input_layernorm / ...


@dataclass(frozen=True)
class _Projection:
    """A projection weight: quantized on load, or read pre-quantized."""
    shape: Tuple[int, int]
    layer: int
    projection: str
    prequantized: bool
    aux: Tuple[str, ...] = ()  # suffixes of the bnb quant-state tensors


def _is_ignorable(name: str) -> bool:
    """Tensors old checkpoints carry that hold nothing we need: RoPE
    inverse-frequency buffers (recomputed from config.json)."""
    return name.endswith("rotary_emb.inv_freq")


def _read_raw_config(directory: Path) -> Tuple[dict, str]:
    path = directory / CONFIG_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not a model folder: it holds config.json and safetensors)")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:   # JSONDecodeError, or an integer past Python's 4,300 digits
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw, str(path)


def check_checkpoint(path: Union[str, Path]) -> ModelConfig:
    """The ModelConfig of a checkpoint directory after every check that reads no
    tensor data (what load_base_weights checks before it reads): config.json and
    its quantization_config, the index and every file header against them. Cheap
    at any model size: a command checks its --model with it before anything loads."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: checkpoint directory does not exist")
    raw_config, source = _read_raw_config(directory)
    quant = read_quantization_config(raw_config, source)
    config = ModelConfig.from_dict(raw_config, source=source)
    _plan(config, catalog_checkpoint(directory), quant, source, source)
    return config


def _plan(config: ModelConfig, catalog: TensorCatalog, quant: Optional[dict],
          config_source: str, quant_source: str) -> Dict[str, object]:
    """What each stored tensor is and where it goes, checked against config.json.

    Returns {stored tensor name: _Dense | _Projection}; aux quant-state
    tensors are reached through their _Projection. Raises on any mismatch.
    """
    listing = catalog.listing
    entries = catalog.entries
    # a config claiming more layers than the files hold tensors (a typo, or 10**9) is
    # refused before the plan below is built for each of them; short of that, the
    # first missing tensor is named
    if config.num_hidden_layers > len(entries):
        raise ValueError(f"{listing}: holds {len(entries)} tensors, too few for the "
                         f"{config.num_hidden_layers} layers {config_source} declares")
    h, v = config.hidden_size, config.vocab_size
    plan: Dict[str, object] = {EMBED: _Dense((v, h), None, "embed_tokens"),
                               FINAL_NORM: _Dense((h,), None, "norm")}
    if not config.tie_word_embeddings:
        plan[LM_HEAD] = _Dense((v, h), None, "lm_head")
    shapes = projection_shapes(config)
    for layer in range(config.num_hidden_layers):
        for norm in LAYER_NORMS:
            plan[f"model.layers.{layer}.{norm}.weight"] = _Dense((h,), layer, norm)
        for name, shape, slot in family_tensors(config, layer):
            plan[name] = _Dense(shape, layer, slot)
        for proj in PROJECTIONS:
            module = projection_module_path(layer, proj)
            name = f"{module}.weight"
            stored_quantized = f"{name}.{QUANT_STATE_SUFFIX}" in entries
            if stored_quantized and quant is None:
                raise ValueError(f"{listing}: tensor '{name}' is stored bitsandbytes-quantized "
                                 f"but {quant_source} has no quantization_config")
            if quant is not None and not stored_quantized and \
                    not is_skipped_module(module, quant["skip_modules"]):
                raise ValueError(f"{listing}: tensor '{name}.{QUANT_STATE_SUFFIX}' is missing "
                                 f"({quant_source} declares a bitsandbytes NF4 checkpoint)")
            aux = expected_aux_suffixes(quant["double_quant"]) if stored_quantized else ()
            plan[name] = _Projection(shapes[proj], layer, proj, stored_quantized, aux)

    # Every expected tensor present with the right shape and dtype.
    for name, item in plan.items():
        if name not in entries:
            raise ValueError(f"{listing}: tensor '{name}' is missing (expected by {config_source})")
        entry = entries[name]
        if isinstance(item, _Projection) and item.prequantized:
            nbytes = entry.nbytes
            if nbytes != packed_nbytes(item.shape):
                raise ValueError(
                    f"{entry.file}: tensor '{name}' holds {nbytes} packed bytes (shape "
                    f"{list(entry.shape)}, {entry.dtype}) but config.json implies "
                    f"{packed_nbytes(item.shape)} for a {list(item.shape)} NF4 weight")
            for suffix in item.aux:
                if f"{name}.{suffix}" not in entries:
                    raise ValueError(f"{listing}: tensor '{name}.{suffix}' is missing "
                                     "(part of the bitsandbytes quant state)")
            continue
        if tuple(entry.shape) != tuple(item.shape):
            raise ValueError(f"{entry.file}: tensor '{name}' has shape {list(entry.shape)} "
                             f"but {config_source} implies {list(item.shape)}")
        if entry.dtype not in FLOAT_TAGS:
            raise ValueError(f"{entry.file}: tensor '{name}' has dtype {entry.dtype}; "
                             f"expected a float type ({', '.join(FLOAT_TAGS)})")

    # Nothing unexpected (an extra layer, another architecture's tensors, ...).
    known = set(plan)
    for name, item in plan.items():
        if isinstance(item, _Projection):
            known.update(f"{name}.{s}" for s in item.aux)
    for name in entries:
        if name in known or _is_ignorable(name):
            continue
        if name == LM_HEAD and config.tie_word_embeddings:
            continue  # some tied checkpoints store the shared matrix twice; it is embed_tokens
        if any(name.endswith(s) for s in OTHER_4BIT_SUFFIXES):
            raise ValueError(f"{entries[name].file}: tensor '{name}' is bitsandbytes FP4; "
                             "only NF4 is supported")
        raise ValueError(f"{entries[name].file}: unexpected tensor '{name}' (not part of a "
                         f"{config.num_hidden_layers}-layer {config.model_type} model as {config_source} "
                         "describes it)")
    return plan


def load_base_weights(path: Union[str, Path], config: Optional[ModelConfig] = None, *,
                      compute_dtype: torch.dtype = torch.float32,
                      device: Union[str, torch.device] = "cpu", blocksize: int = 64,
                      double_quant: bool = True,
                      progress: bool = True) -> Tuple[ModelConfig, BaseWeights]:
    """Read a Llama checkpoint directory into (ModelConfig, BaseWeights).

    path: directory with config.json and model.safetensors, or sharded
        model-*.safetensors + model.safetensors.index.json.
    config: use this instead of config.json's model fields (config.json is
        still read for a quantization_config, when present).
    compute_dtype: dtype of embeddings, norms and lm_head, and the dtype each
        NF4Weight dequantizes to.
    device: where the result lives; quantization runs there.
    blocksize, double_quant: NF4 settings for quantize-on-load (bitsandbytes
        semantics); a pre-quantized checkpoint keeps its own.
    progress: show a tqdm bar over the tensors read.
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"load_base_weights: compute_dtype {compute_dtype} is not one of "
                         f"{', '.join(map(str, COMPUTE_DTYPES))}")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"load_base_weights: blocksize {blocksize} is not one of "
                         f"{SUPPORTED_BLOCKSIZES}")
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: checkpoint directory does not exist")
    device = torch.device(device)

    raw_config, config_source = _read_raw_config(directory)
    quant = read_quantization_config(raw_config, config_source)
    if config is None:
        config = ModelConfig.from_dict(raw_config, source=config_source)
        model_source = config_source
    else:
        config.validate()
        model_source = f"the given config ({config.source})"
    catalog = catalog_checkpoint(directory)
    plan = _plan(config, catalog, quant, model_source, config_source)

    dense: Dict[Tuple[Optional[int], str], torch.Tensor] = {}
    quantized: Dict[Tuple[int, str], NF4Weight] = {}
    total = sum(1 + len(item.aux) if isinstance(item, _Projection) else 1 for item in plan.values())
    bar = _progress_bar(total, directory.name, progress)
    try:
        for file in catalog.files():
            names = [n for n in catalog.names_in(file) if n in plan]
            if not names:
                continue
            with safe_open(str(file), framework="pt") as f:
                pages = MappedPageReleaser(file)
                for name in names:
                    item = plan[name]
                    if isinstance(item, _Dense):
                        t = f.get_tensor(name)
                        _check_finite(t, file, name)
                        dense[(item.layer, item.slot)] = _private_copy(t, device, compute_dtype)
                        pages.release(t)
                        del t
                        bar.update(1)
                    elif item.prequantized:
                        parts = {"": f.get_tensor(name)}
                        parts.update(_read_aux(catalog, f, file, name, item.aux))
                        quantized[(item.layer, item.projection)] = nf4_from_bnb_tensors(
                            name, {k: _private_copy(t, device, t.dtype) for k, t in parts.items()},
                            item.shape, compute_dtype, str(file))
                        for t in parts.values():
                            pages.release(t)
                        del parts
                        bar.update(1 + len(item.aux))
                    else:
                        w = f.get_tensor(name)
                        _check_finite(w, file, name)
                        quantized[(item.layer, item.projection)] = _quantize(
                            w, device, blocksize, double_quant, compute_dtype)
                        pages.release(w)
                        del w
                        bar.update(1)
                    return_freed_heap_to_os()
    finally:
        bar.close()

    layers: List[LayerWeights] = []
    for layer in range(config.num_hidden_layers):
        layers.append(LayerWeights(
            input_layernorm=dense[(layer, "input_layernorm")],
            post_attention_layernorm=dense[(layer, "post_attention_layernorm")],
            projections={p: quantized.pop((layer, p)) for p in PROJECTIONS},
            **family_layer_fields({slot: dense[(layer, slot)]
                                   for _, _, slot in family_tensors(config, layer)})))
    base = BaseWeights(embed_tokens=dense[(None, "embed_tokens")], layers=layers,
                       norm=dense[(None, "norm")], lm_head=dense.get((None, "lm_head")))
    return config, base


def _private_copy(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``t`` converted into memory of our own. safetensors (0.8) hands out
    tensors that are views of the file's shared memory map: keeping one would
    tie the model to the file (rewriting the checkpoint would change the
    weights, truncating it would crash the process)."""
    out = torch.empty(t.shape, dtype=dtype, device=device)
    out.copy_(t)
    return out


def _quantize(w: torch.Tensor, device: torch.device, blocksize: int, double_quant: bool,
              compute_dtype: torch.dtype) -> NF4Weight:
    """NF4 of one dense projection, on ``device``, dequantizing to compute_dtype.
    fp64 input is quantized from its fp32 rounding (what bitsandbytes would see)."""
    if w.dtype not in COMPUTE_DTYPES:
        w = w.to(torch.float32)
    # Reads straight from the memory-mapped file on CPU; the NF4 result is new memory.
    q = nf4_quantize(w.to(device).contiguous(), blocksize=blocksize, double_quant=double_quant)
    return replace(q, dtype=compute_dtype)


def _read_aux(catalog: TensorCatalog, current, current_file: Path, name: str,
              suffixes) -> Dict[str, torch.Tensor]:
    """The quant-state tensors of ``name``; usually in the same shard, but an
    index may put them elsewhere."""
    out = {}
    for suffix in suffixes:
        full = f"{name}.{suffix}"
        file = catalog.entries[full].file
        if file == current_file:
            out[suffix] = current.get_tensor(full)
        else:
            with safe_open(str(file), framework="pt") as other:
                out[suffix] = other.get_tensor(full)
    return out


def _check_finite(t: torch.Tensor, file: Path, name: str) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{file}: tensor '{name}' has {bad} non-finite (NaN/inf) values")


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, label: str, enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=f"loading {label}", unit="tensor")


def load_model(path: Union[str, Path], *, adapters=None, compute_dtype: torch.dtype = torch.float32,
               device="cpu", blocksize: int = 64, double_quant: bool = True, progress: bool = True,
               **model_kwargs) -> QLoRALlama:
    """A QLoRALlama on a local HF LLaMA checkpoint (projections quantized to NF4 on load).

    ``model_kwargs`` go to QLoRALlama (activation_stash, dropout_seed, ...)."""
    config, base = load_base_weights(path, compute_dtype=compute_dtype, device=device,
                                     blocksize=blocksize, double_quant=double_quant,
                                     progress=progress)
    return QLoRALlama(config, base, adapters, **model_kwargs)
