"""The bitsandbytes forms of an NF4Weight: its (packed, QuantState) pair and the
serialized state dict of a pre-quantized 4-bit checkpoint (what transformers saves
for a bitsandbytes Linear4bit), written and read. The NF4Weight methods to_bnb,
from_bnb, to_state_dict and from_state_dict delegate here; bitsandbytes is imported
only inside to_bnb.

This module does not import nf4 (nf4 imports it): the readers take the class to build.
"""
from __future__ import annotations

import json
from typing import Dict

import torch

from ._checks import FLOAT_DTYPES, check_tensor
from .nf4_codebook import NESTED_BLOCKSIZE, SUPPORTED_BLOCKSIZES, _is_supported_blocksize, nf4_code

# Key suffixes of a serialized 4-bit weight (bitsandbytes QuantState.as_dict(packed=True),
# written by transformers next to '<module>.weight').
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
_OTHER_QUANT_STATE_KEYS = ("quant_state.bitsandbytes__fp4",)


def to_bnb(weight):
    """NF4Weight.to_bnb."""
    from bitsandbytes.functional import QuantState

    weight.validate("NF4Weight.to_bnb")
    weight.refuse_segmented("NF4Weight.to_bnb")
    nested = None
    if weight.double_quant:
        nested = QuantState(absmax=weight.nested_absmax, code=weight.nested_code.clone(),
                            blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    state = QuantState(absmax=weight.absmax, shape=weight.shape, code=weight.code.clone(),
                       blocksize=weight.blocksize, quant_type="nf4", dtype=weight.dtype,
                       offset=weight.nested_offset, state2=nested)
    return weight.packed.view(-1, 1), state


def from_bnb(cls, packed: torch.Tensor, quant_state):
    """NF4Weight.from_bnb: a ``cls`` (an NF4Weight)."""
    op = "NF4Weight.from_bnb"
    if getattr(quant_state, "quant_type", None) != "nf4":
        raise ValueError(f"{op}: quant_state.quant_type is "
                         f"{getattr(quant_state, 'quant_type', None)!r}; expected 'nf4'")
    if quant_state.shape is None:
        raise ValueError(f"{op}: quant_state.shape is None; the logical shape is needed")
    check_tensor(op, "packed", packed, dtypes=(torch.uint8,))
    nested = {}
    if quant_state.nested:
        if quant_state.state2.blocksize != NESTED_BLOCKSIZE:
            raise ValueError(f"{op}: quant_state.state2.blocksize is "
                             f"{quant_state.state2.blocksize}; expected {NESTED_BLOCKSIZE}")
        nested = dict(nested_absmax=quant_state.state2.absmax,
                      nested_code=quant_state.state2.code,
                      nested_offset=torch.as_tensor(quant_state.offset).reshape(()))
    weight = cls(packed=packed.reshape(-1), absmax=quant_state.absmax,
                 shape=torch.Size(quant_state.shape), blocksize=int(quant_state.blocksize),
                 dtype=quant_state.dtype, code=quant_state.code, **nested)
    weight.validate(op)
    _check_is_nf4_code(op, "quant_state.code", weight.code)
    return weight


def to_state_dict(weight, prefix: str = "") -> Dict[str, torch.Tensor]:
    """NF4Weight.to_state_dict."""
    weight.validate("NF4Weight.to_state_dict")
    weight.refuse_segmented("NF4Weight.to_state_dict")
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
    tensors[f"{base}.{QUANT_STATE_KEY}"] = torch.tensor(
        list(packed_meta), dtype=torch.uint8, device=weight.device)
    return tensors


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_is_nf4_code(op: str, name: str, code: torch.Tensor) -> None:
    if not torch.equal(code.cpu(), nf4_code()):
        raise ValueError(f"{op}: {name} is not the NF4 code (expected the 16 values of "
                         "NF4_CODE_VALUES); only nf4 is supported")



def from_state_dict(cls, tensors, prefix, dtype):
    """NF4Weight.from_state_dict: a ``cls`` (an NF4Weight)."""
    op = "NF4Weight.from_state_dict"
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

    state_key = f"{base}.{QUANT_STATE_KEY}"
    for other in _OTHER_QUANT_STATE_KEYS:
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
    if not _is_supported_blocksize(blocksize):
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
    _check_is_nf4_code(op, f"'{base}.quant_map'", code)
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
    weight = cls(packed=packed, absmax=absmax, shape=torch.Size(shape), blocksize=blocksize,
                 dtype=dtype if dtype is not None else stored_dtype, code=code, **nested)
    return weight.validate(op)

