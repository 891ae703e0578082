"""Pre-quantized bitsandbytes 4-bit checkpoints (``quantization_config`` with
``load_in_4bit``), as transformers' ``save_pretrained`` writes them.

Each quantized projection ``<module>.weight`` is stored as its packed NF4
bytes (uint8 ``[ceil(numel/2), 1]``, or the same bytes viewed as
``bnb_4bit_quant_storage``) next to the serialized bitsandbytes QuantState:

    <module>.weight.absmax                          uint8 (double quant) or fp32
    <module>.weight.quant_map                       fp32 [16], the NF4 code
    <module>.weight.nested_absmax                   fp32   (double quant only)
    <module>.weight.nested_quant_map                fp32 [256] (double quant only)
    <module>.weight.quant_state.bitsandbytes__nf4   uint8 JSON: quant_type, blocksize,
                                                    dtype, shape, nested_blocksize,
                                                    nested_dtype, nested_offset
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

import torch

from csrc_triton import NF4Weight
from csrc_triton.checks import FLOAT_DTYPES
from csrc_triton.nf4_codebook import (NESTED_BLOCKSIZE, SUPPORTED_BLOCKSIZES, check_is_nf4_code,
                                      is_supported_blocksize)

# Key suffixes of a serialized 4-bit weight (bitsandbytes QuantState.as_dict(packed=True),
# written by transformers next to '<module>.weight'): the one definition of these names.
QUANT_STATE_SUFFIX = "quant_state.bitsandbytes__nf4"
BASE_AUX_SUFFIXES = ("absmax", "quant_map", QUANT_STATE_SUFFIX)
NESTED_AUX_SUFFIXES = ("nested_absmax", "nested_quant_map")
ALL_AUX_SUFFIXES = BASE_AUX_SUFFIXES + NESTED_AUX_SUFFIXES
OTHER_4BIT_SUFFIXES = ("quant_state.bitsandbytes__fp4",)


def read_quantization_config(raw_config: Dict[str, Any], source: str) -> Optional[Dict[str, Any]]:
    """None for a full-precision checkpoint; the bnb settings for an NF4 one.

    Returns {"double_quant": bool, "skip_modules": [str, ...]}. Any other
    quantization (8-bit, fp4, GPTQ, AWQ, ...) is a ValueError naming the field.
    """
    qc = raw_config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"{source}: field 'quantization_config' must be an object, got {qc!r}")
    method = qc.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ValueError(f"{source}: field 'quantization_config.quant_method' is {method!r}; "
                         "only bitsandbytes 4-bit NF4 checkpoints are supported")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise ValueError(f"{source}: field 'quantization_config.load_in_8bit' is true; "
                         "only bitsandbytes 4-bit NF4 checkpoints are supported")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise ValueError(f"{source}: field 'quantization_config.load_in_4bit' is not true; "
                         "only bitsandbytes 4-bit NF4 checkpoints are supported")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' own default is fp4
    if quant_type != "nf4":
        raise ValueError(f"{source}: field 'quantization_config.bnb_4bit_quant_type' is "
                         f"{quant_type!r}; only 'nf4' is supported")
    skip = qc.get("llm_int8_skip_modules") or []
    if not isinstance(skip, list) or not all(isinstance(name, str) for name in skip):
        raise ValueError(f"{source}: field 'quantization_config.llm_int8_skip_modules' must be a "
                         f"list of module names, got {skip!r}")
    return {"double_quant": bool(qc.get("bnb_4bit_use_double_quant", False)),
            "skip_modules": list(skip)}


def is_skipped_module(module_path: str, skip_modules) -> bool:
    """transformers leaves a module unquantized when a skip entry names it or
    one of its parents (``model.layers.0.mlp``) or its last component."""
    parts = module_path.split(".")
    prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return any(s in prefixes or s == parts[-1] for s in skip_modules)


def expected_aux_suffixes(double_quant: bool) -> Tuple[str, ...]:
    return ALL_AUX_SUFFIXES if double_quant else BASE_AUX_SUFFIXES


def packed_nbytes(shape: Tuple[int, int]) -> int:
    return -(-shape[0] * shape[1] // 2)


def nf4_from_bnb_tensors(weight_name: str, tensors: Dict[str, torch.Tensor],
                         expected_shape: Tuple[int, int], compute_dtype: torch.dtype,
                         source: str) -> NF4Weight:
    """Build the NF4Weight of one projection from its stored tensors.

    ``tensors`` maps "" (the packed weight) and each aux suffix to its tensor.
    Raises ValueError naming ``source`` and the tensor when the quant state
    disagrees with config.json (shape, quant type) or with itself.
    """
    packed = tensors[""]
    if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8: same bytes
        packed = packed.contiguous().view(torch.uint8)
    assert weight_name.endswith("weight")
    state = {f"{weight_name}.{k}": v for k, v in tensors.items() if k}
    state[weight_name] = packed.reshape(-1, 1)
    try:
        q = nf4_from_state_dict(state, prefix=weight_name[: -len("weight")],
                                      dtype=compute_dtype)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{source}: tensor '{weight_name}': bad bitsandbytes quant state ({e})") from e
    if tuple(q.shape) != tuple(expected_shape):
        raise ValueError(f"{source}: tensor '{weight_name}' has quantized shape {tuple(q.shape)} "
                         f"but config.json implies {tuple(expected_shape)}")
    return q


def nf4_to_state_dict(weight: NF4Weight, prefix: str = "") -> Dict[str, torch.Tensor]:
    """The tensors transformers saves for a 4-bit linear at module path ``prefix``
    (e.g. 'model.layers.0.self_attn.q_proj.'): '{prefix}weight' (uint8
    [ceil(numel/2), 1]), '{prefix}weight.absmax', '.quant_map', with double
    quantization '.nested_absmax' and '.nested_quant_map', and
    '{prefix}weight.quant_state.bitsandbytes__nf4': the remaining fields as
    UTF-8 JSON bytes in a uint8 tensor. Tensors share memory with ``weight``
    except the two code maps, which are copied (safetensors refuses shared maps)."""
    weight.validate("nf4_to_state_dict")
    weight.refuse_segmented("nf4_to_state_dict")
    base = f"{prefix}weight"
    meta = {"quant_type": "nf4", "blocksize": weight.blocksize,
            "dtype": _dtype_name(weight.dtype), "shape": list(weight.shape)}
    tensors = {base: weight.packed.view(-1, 1), f"{base}.absmax": weight.absmax,
               f"{base}.quant_map": weight.code.clone()}
    if weight.double_quant:
        tensors[f"{base}.nested_absmax"] = weight.nested_absmax
        tensors[f"{base}.nested_quant_map"] = weight.nested_code.clone()
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                    nested_offset=float(weight.nested_offset.item()))
    packed_meta = json.dumps(meta).encode("utf-8")
    tensors[f"{base}.{QUANT_STATE_SUFFIX}"] = torch.tensor(
        list(packed_meta), dtype=torch.uint8, device=weight.device)
    return tensors


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def nf4_from_state_dict(tensors: Dict[str, torch.Tensor], prefix: str = "",
                        dtype: Optional[torch.dtype] = None) -> NF4Weight:
    """Read what nf4_to_state_dict (or transformers / bitsandbytes) wrote at ``prefix``.
    ``dtype`` overrides the dequantization dtype recorded in the checkpoint.
    ValueError naming the key for a missing key, a wrong dtype or shape, a
    non-NF4 quant type or an unreadable quant-state record."""
    op = "nf4_from_state_dict"
    base = f"{prefix}weight"

    def get(key):
        if key not in tensors:
            raise ValueError(f"{op}: missing key '{key}'")
        value = tensors[key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{op}: '{key}' must be a torch.Tensor, got {type(value).__name__}")
        return value

    def expect(key, dtype_, shape):
        value = get(key)
        if value.dtype != dtype_ or tuple(value.shape) != tuple(shape):
            raise ValueError(f"{op}: '{key}' is {value.dtype} of shape {tuple(value.shape)}; "
                             f"expected {dtype_} of shape {tuple(shape)}")
        return value.contiguous()

    state_key = f"{base}.{QUANT_STATE_SUFFIX}"
    for other in OTHER_4BIT_SUFFIXES:
        if f"{base}.{other}" in tensors:
            raise ValueError(f"{op}: '{base}.{other}' found: this weight is not nf4 "
                             "(only nf4 is supported)")
    record = get(state_key)
    try:
        meta = json.loads(bytes(record.detach().to("cpu", torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{op}: '{state_key}' is not UTF-8 JSON: {error}") from None

    def meta_field(name, kind):
        if name not in meta or not isinstance(meta[name], kind):
            raise ValueError(f"{op}: '{state_key}' lacks a valid '{name}' field (got "
                             f"{meta.get(name)!r})")
        return meta[name]

    if meta_field("quant_type", str) != "nf4":
        raise ValueError(f"{op}: '{state_key}' has quant_type {meta['quant_type']!r}; "
                         "expected 'nf4'")
    blocksize = meta_field("blocksize", int)
    if not is_supported_blocksize(blocksize):
        raise ValueError(f"{op}: '{state_key}' has blocksize {blocksize}; expected one of "
                         f"{SUPPORTED_BLOCKSIZES}")
    shape = meta_field("shape", list)
    if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"{op}: '{state_key}' has shape {shape}; expected positive ints")
    stored_dtype = getattr(torch, meta_field("dtype", str), None)
    if stored_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: '{state_key}' has dtype {meta['dtype']!r}; expected "
                         "float32, float16 or bfloat16")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: argument 'dtype' is {dtype}; expected float32, float16 "
                         "or bfloat16")

    numel = torch.Size(shape).numel()
    n_blocks = -(-numel // blocksize)
    packed = expect(base, torch.uint8, ((numel + 1) // 2, 1)).reshape(-1)
    code = expect(f"{base}.quant_map", torch.float32, (16,))
    check_is_nf4_code(op, f"'{base}.quant_map'", code)
    nested = {}
    if "nested_offset" in meta or f"{base}.nested_absmax" in tensors:
        if meta_field("nested_blocksize", int) != NESTED_BLOCKSIZE:
            raise ValueError(f"{op}: '{state_key}' has nested_blocksize "
                             f"{meta['nested_blocksize']}; expected {NESTED_BLOCKSIZE}")
        if meta_field("nested_dtype", str) != "float32":
            raise ValueError(f"{op}: '{state_key}' has nested_dtype {meta['nested_dtype']!r}; "
                             "expected 'float32'")
        offset = meta_field("nested_offset", (int, float))
        absmax = expect(f"{base}.absmax", torch.uint8, (n_blocks,))
        nested = dict(
            nested_absmax=expect(f"{base}.nested_absmax", torch.float32,
                                 (-(-n_blocks // NESTED_BLOCKSIZE),)),
            nested_code=expect(f"{base}.nested_quant_map", torch.float32, (256,)),
            nested_offset=torch.tensor(float(offset), dtype=torch.float32, device=packed.device))
    else:
        absmax = expect(f"{base}.absmax", torch.float32, (n_blocks,))
    weight = NF4Weight(packed=packed, absmax=absmax, shape=torch.Size(shape), blocksize=blocksize,
                 dtype=dtype if dtype is not None else stored_dtype, code=code, **nested)
    return weight.validate(op)
