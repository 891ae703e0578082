"""The NF4 weight as a 2-D matmul operand: argument checks and the kernel arguments
it expands to (shared by nf4_matmul's fused kernels and lora_linear)."""
from __future__ import annotations

import torch

from .checks import check_numel, check_same_device, check_tensor
from .nf4 import NF4Weight
from .nf4_codebook import NESTED_BLOCKSIZE
from .nf4_decode import segment_args


def check_nf4_weight(op: str, w) -> None:
    """Validate an NF4Weight used as a 2-D matmul operand; ValueError otherwise."""
    if not isinstance(w, NF4Weight):
        raise ValueError(f"{op}: argument 'w' must be an NF4Weight, got {type(w).__name__}")
    if len(w.shape) != 2 or w.numel == 0:
        raise ValueError(f"{op}: argument 'w' must be a non-empty 2-D weight [N, K]; "
                         f"got shape {tuple(w.shape)}")
    if not isinstance(w.blocksize, int) or w.blocksize <= 0:
        raise ValueError(f"{op}: w.blocksize must be a positive int, got {w.blocksize!r}")
    # the kernels index W's elements (n * K + k) in int32, not only its packed bytes
    check_numel(op, f"argument 'w' (shape {tuple(w.shape)})", w.numel)

    def field(name, tensor, dtype, numel):
        check_tensor(op, f"w.{name}", tensor, dtypes=(dtype,))
        if tensor.numel() != numel:
            raise ValueError(f"{op}: w.{name} has {tensor.numel()} elements; expected {numel} "
                             f"for a weight of shape {tuple(w.shape)} with blocksize {w.blocksize}")

    field("packed", w.packed, torch.uint8, (w.numel + 1) // 2)
    field("code", w.code, torch.float32, 16)
    if w.double_quant:
        field("absmax", w.absmax, torch.uint8, w.n_blocks)
        field("nested_absmax", w.nested_absmax, torch.float32, w.n_nested_groups())
        if w.nested_code is None or w.nested_offset is None:
            raise ValueError(f"{op}: double-quantized w needs nested_code and nested_offset")
        field("nested_code", w.nested_code, torch.float32, 256)
        field("nested_offset", w.nested_offset, torch.float32,
              len(w.segment_rows) if w.segmented else 1)
    else:
        field("absmax", w.absmax, torch.float32, w.n_blocks)
    check_same_device(op, packed=w.packed, absmax=w.absmax, code=w.code,
                      nested_absmax=w.nested_absmax, nested_code=w.nested_code,
                      nested_offset=w.nested_offset)


def weight_args(w: NF4Weight) -> dict:
    # Unused nested pointers get a harmless stand-in (the kernel never reads them).
    absmax = w.absmax.reshape(-1)
    return dict(packed_ptr=w.packed.reshape(-1), absmax_ptr=absmax, code_ptr=w.code.reshape(-1),
                nested_absmax_ptr=w.nested_absmax.reshape(-1) if w.double_quant else absmax,
                nested_code_ptr=w.nested_code.reshape(-1) if w.double_quant else absmax,
                nested_offset_ptr=w.nested_offset.reshape(-1) if w.double_quant else absmax,
                **segment_args(w))


def weight_constexprs(w: NF4Weight) -> dict:
    blocksize = w.blocksize
    row_aligned = w.shape[1] % blocksize == 0 and blocksize & (blocksize - 1) == 0
    return dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=w.double_quant, NESTED=NESTED_BLOCKSIZE,
                SEGMENTED=w.segmented, ROW_ALIGNED=row_aligned)
