"""NF4 quantization: the quantize kernel, the nested (double) quantization kernel of
the block absmax, their launchers and nf4_quantize, byte for byte as bitsandbytes'
CPU quantize_4bit (the rules of the csrc_triton.nf4 docstring).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime
from .checks import FLOAT_DTYPES, check_tensor
from .records import OpRecord
from .nf4 import NF4Weight
from .nf4_codebook import (NESTED_BLOCKSIZE, SUPPORTED_BLOCKSIZES, is_supported_blocksize,
                           nf4_code, signed_dynamic_map)
from .nf4_decode import _NO_FMA, _blocks_per_program

# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------

@triton.jit
def _nf4_quantize_kernel(w_ptr, code_ptr, packed_ptr, absmax_ptr, numel, n_blocks,
                         BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr):
    """Quantize BLOCKS_PER_PROGRAM consecutive blocks of the flattened weight.

    Math (fp32, bitsandbytes' CPU rule): for block b with elements x,
      a_b = max |x|;  s_b = max(a_b, 1e-38)
      y = x * (1 / s_b)  for a full block,  y = x / s_b  for the partial last block
      idx(y) = #{ j : (code[j] + code[j+1]) * 0.5 < y }     (15 midpoints; ties go low)
      packed[i/2] = 16 * idx(y_i) + idx(y_{i+1})  for even i (missing odd element: y = 0)
      absmax[b] = a_b for a full block, s_b for the partial one.
    The count is kept in fp32 (exact for 0..255) because the interpreter checks
    every int32 add for overflow, which costs more than the whole comparison.
    """
    HALF: tl.constexpr = BLOCKSIZE // 2
    block = tl.program_id(0) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    block = block.to(tl.int64)  # block * BLOCKSIZE can pass 2^31 on the masked tail rows
    offsets = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    # Masked slots load 0: they neither raise the absmax nor change the padding nibble.
    x = tl.load(w_ptr + offsets, mask=offsets < numel, other=0.0).to(tl.float32)

    absmax = tl.max(tl.abs(x), axis=1)
    # 1e-38 is below fp32's smallest normal: a bare literal is typed fp64 by triton 3.6
    # (which then refuses it in div_rn), so the floor is made an fp32 tensor explicitly
    safe = tl.maximum(absmax, tl.full([BLOCKS_PER_PROGRAM], 1e-38, tl.float32))
    partial = (block + 1) * BLOCKSIZE > numel
    reciprocal = tl.div_rn(tl.full([BLOCKS_PER_PROGRAM], 1.0, tl.float32), safe)
    # Full blocks multiply by the rounded reciprocal, the partial block divides:
    # the two differ in the last bit now and then, and that bit can cross a midpoint.
    y = tl.where(partial[:, None], tl.div_rn(x, safe[:, None]), x * reciprocal[:, None])

    index = tl.zeros([BLOCKS_PER_PROGRAM, BLOCKSIZE], dtype=tl.float32)
    lower = tl.load(code_ptr)
    for j in tl.static_range(15):
        upper = tl.load(code_ptr + j + 1)
        index += (y > (lower + upper) * 0.5).to(tl.float32)
        lower = upper

    # Even element -> high nibble: weight 16 on even columns, 1 on odd, summed per pair.
    nibble_weight = tl.where(tl.arange(0, BLOCKSIZE) % 2 == 0, 16.0, 1.0)
    byte = tl.sum(tl.reshape(index * nibble_weight[None, :], [BLOCKS_PER_PROGRAM, HALF, 2]),
                  axis=2)
    byte_offsets = block[:, None] * HALF + tl.arange(0, HALF)[None, :]
    tl.store(packed_ptr + byte_offsets, byte.to(tl.uint8), mask=byte_offsets * 2 < numel)
    tl.store(absmax_ptr + block, tl.where(partial, safe, absmax), mask=block < n_blocks)


@triton.jit
def _nested_quantize_kernel(absmax_ptr, offset_ptr, map_ptr, absmax_q_ptr, nested_absmax_ptr,
                            n_blocks, n_groups,
                            GROUP: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr):
    """Double quantization of the fp32 block absmax, GROUPS_PER_PROGRAM groups of GROUP.

    Math (fp32, the rule of bitsandbytes' CPU quantize_blockwise, which looks the
    code up in a 65536-entry table instead of searching for the nearest value):
      v = absmax - offset;   m_g = max |v| over group g   (stored as nested_absmax)
      x = clamp(v * (1 / m_g), -1, 1)
      t = trunc(((x + 1) * 0.5) * 65535 + 0.5)            (each op rounded to fp32)
      grid(t) = -1 + (2 t) / 65535
      q = #{ k : (M[k] + M[k+1]) * 0.5 < grid(t) }        (255 midpoints of the map M)
      q = 0 for a group whose m_g is 0.
    The count is an 8-step binary search over the midpoints, each one formed
    from two gathered map entries.
    """
    group = tl.program_id(0) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    flat = group[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    valid = flat < n_blocks
    v = tl.load(absmax_ptr + flat, mask=valid, other=0.0) - tl.load(offset_ptr)
    v = tl.where(valid, v, 0.0)  # padding must not raise a group's max
    group_max = tl.max(tl.abs(v), axis=1)
    # A group with m_g = 0 (all equal, or padding) gets index 0 below; dividing
    # by 1 there keeps the arithmetic finite.
    divisor = tl.where(group_max == 0.0, 1.0, group_max)
    reciprocal = tl.div_rn(tl.full([GROUPS_PER_PROGRAM], 1.0, tl.float32), divisor)
    x = tl.minimum(tl.maximum(v * reciprocal[:, None], -1.0), 1.0)
    t = ((x + 1.0) * 0.5) * 65535.0 + 0.5
    grid_point = tl.div_rn(2.0 * t.to(tl.int32).to(tl.float32),
                           tl.full([GROUPS_PER_PROGRAM, GROUP], 65535.0, tl.float32)) - 1.0

    below = tl.zeros([GROUPS_PER_PROGRAM, GROUP], dtype=tl.int32)  # midpoints < grid_point
    for level in tl.static_range(8):
        step = 128 >> level
        k = below + (step - 1)  # at most 254: the steps sum to 255
        midpoint = (tl.load(map_ptr + k) + tl.load(map_ptr + k + 1)) * 0.5
        below = tl.where(midpoint < grid_point, below + step, below)
    # bitsandbytes writes index 0 for a group whose m_g is 0.
    index = tl.where(group_max[:, None] == 0.0, 0, below)

    tl.store(absmax_q_ptr + flat, index.to(tl.uint8), mask=valid)
    tl.store(nested_absmax_ptr + group, group_max, mask=group < n_groups)



# ---------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------

def launch_nf4_quantize(flat: torch.Tensor, blocksize: int):
    """Low-level: (packed uint8 [ceil(n/2)], absmax fp32 [n_blocks]) of a
    contiguous 1-D fp32/fp16/bf16 tensor. No argument checks."""
    numel = flat.numel()
    n_blocks = -(-numel // blocksize)
    packed = _runtime.new_output(((numel + 1) // 2,), torch.uint8, flat.device)
    absmax = _runtime.new_output((n_blocks,), torch.float32, flat.device)
    code = nf4_code(flat.device)
    per_program = _blocks_per_program(n_blocks, blocksize)
    grid = (triton.cdiv(n_blocks, per_program),)
    _runtime.record_launch("_nf4_quantize_kernel")
    _nf4_quantize_kernel[grid](flat, code, packed, absmax, numel, n_blocks,
                               BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=per_program, **_NO_FMA)
    return packed, absmax


def launch_dynamic_quantize(values: torch.Tensor, offset: torch.Tensor,
                            dynamic_map: torch.Tensor):
    """Low-level: quantize (values - offset) in groups of 256 against ``dynamic_map``
    (bitsandbytes' quantize_blockwise rule on CPU). ``values`` contiguous fp32 1-D,
    ``offset`` fp32 0-d, ``dynamic_map`` fp32 [256] ascending. Returns
    (indices uint8 [n], group absmax fp32 [ceil(n/256)]). No argument checks."""
    n = values.numel()
    n_groups = -(-n // NESTED_BLOCKSIZE)
    indices = _runtime.new_output((n,), torch.uint8, values.device)
    group_max = _runtime.new_output((n_groups,), torch.float32, values.device)
    per_program = _blocks_per_program(n_groups, NESTED_BLOCKSIZE)
    grid = (triton.cdiv(n_groups, per_program),)
    _runtime.record_launch("_nested_quantize_kernel")
    _nested_quantize_kernel[grid](values, offset, dynamic_map, indices, group_max, n, n_groups,
                                  GROUP=NESTED_BLOCKSIZE, GROUPS_PER_PROGRAM=per_program,
                                  **_NO_FMA)
    return indices, group_max


def launch_nested_quantize(absmax: torch.Tensor):
    """Low-level: double-quantize a contiguous fp32 absmax vector. Returns
    (absmax_u8 [n_blocks], nested_absmax fp32 [ceil(n_blocks/256)], nested_code
    fp32 [256], nested_offset fp32 0-d). No argument checks."""
    # torch's own mean on this device: bitsandbytes takes the offset the same
    # way, and a different summation order would change its last bit.
    offset = absmax.mean()
    nested_code = signed_dynamic_map(absmax.device)
    absmax_q, nested_absmax = launch_dynamic_quantize(absmax, offset, nested_code)
    return absmax_q, nested_absmax, nested_code, offset



# ---------------------------------------------------------------------------
# public op
# ---------------------------------------------------------------------------

def check_quantize_args(w, blocksize, double_quant) -> None:
    """The checks of nf4_quantize (shared with csrc_torch's)."""
    op = "nf4_quantize"
    check_tensor(op, "w", w, dtypes=FLOAT_DTYPES)
    if w.numel() == 0:
        raise ValueError(f"{op}: argument 'w' is empty (shape {tuple(w.shape)})")
    if w.dim() == 0:
        raise ValueError(f"{op}: argument 'w' must have at least one dimension")
    if not is_supported_blocksize(blocksize):
        raise ValueError(f"{op}: argument 'blocksize' is {blocksize!r}; expected one of "
                         f"{SUPPORTED_BLOCKSIZES}")
    if not isinstance(double_quant, bool):
        raise ValueError(f"{op}: argument 'double_quant' must be a bool, got {double_quant!r}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{op}: argument 'w' has inf or NaN elements; NF4 cannot "
                         "represent them")


def nf4_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """Quantize ``w`` (fp32/fp16/bf16, contiguous, any shape) to NF4, byte for byte
    as ``bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4",
    compress_statistics=double_quant)`` does on CPU. Not differentiable."""
    check_quantize_args(w, blocksize, double_quant)
    w = w.detach()
    packed, absmax = launch_nf4_quantize(w.reshape(-1), blocksize)
    nested = {}
    if double_quant:
        absmax, nested_absmax, nested_code, offset = launch_nested_quantize(absmax)
        nested = dict(nested_absmax=nested_absmax, nested_code=nested_code, nested_offset=offset)
    return NF4Weight(packed=packed, absmax=absmax, shape=w.shape, blocksize=blocksize,
                     dtype=w.dtype, code=nf4_code(w.device), **nested)


RECORD = OpRecord(
    "nf4_quantize", (nf4_quantize,), torch_mirror="csrc_torch.nf4", reference="tests.reference.nf4",
    parity="tests.test_torch_backend:nf4_quantize_parity", bench="bench.ops_nf4:nf4_quantize_bench",
    compile_specs="tests.sm90_compile:nf4_quantize_specs")
