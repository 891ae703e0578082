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

from typing import Any, Dict, Optional, Tuple

import torch

from csrc_triton import NF4Weight

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
        q = NF4Weight.from_state_dict(state, prefix=weight_name[: -len("weight")],
                                      dtype=compute_dtype)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{source}: tensor '{weight_name}': bad bitsandbytes quant state ({e})") from e
    if tuple(q.shape) != tuple(expected_shape):
        raise ValueError(f"{source}: tensor '{weight_name}' has quantized shape {tuple(q.shape)} "
                         f"but config.json implies {tuple(expected_shape)}")
    return q
