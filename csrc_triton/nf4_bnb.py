"""The bitsandbytes object form of an NF4Weight: its (packed, QuantState) pair, as
bitsandbytes.functional.quantize_4bit returns it. The NF4Weight methods to_bnb and
from_bnb delegate here; bitsandbytes is imported only inside to_bnb. The serialized
form (a checkpoint's key names) is anita_core/hf/bnb.py's: the kernel package knows
no state-dict keys.

This module does not import nf4 (nf4 imports it): the readers take the class to build.
"""
from __future__ import annotations

import torch

from .checks import check_tensor
from .nf4_codebook import NESTED_BLOCKSIZE, check_is_nf4_code


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
    check_is_nf4_code(op, "quant_state.code", weight.code)
    return weight
