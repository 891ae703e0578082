"""NF4 dequantization: the decode kernel, the @triton.jit decode helpers the fused
nf4_matmul kernels share (the code lookup, the nested absmax of each block, segment
by segment for a concatenated weight), the launcher and nf4_dequantize; also the
tiling and the no-FMA launch option the quantize launchers (nf4_encode) use.

The arithmetic is the dequantization rule of the csrc_triton.nf4 docstring.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _runtime
from .checks import FLOAT_DTYPES
from .records import OpRecord
from .nf4 import NF4Weight
from .nf4_codebook import NESTED_BLOCKSIZE

# ---------------------------------------------------------------------------
# tiling
# ---------------------------------------------------------------------------

# Elements per program. The interpreter pays a fixed cost per program and per
# NumPy call, so it gets large tiles; a GPU program keeps its tile in registers.
_INTERPRETER_TILE = 1 << 20  # Triton's largest tensor
_GPU_TILE = 1 << 12
# The launcher keeps separate product and sum (see _nf4_dequantize_kernel);
# the interpreter ignores this launch option.
_NO_FMA = dict(enable_fp_fusion=False)


def _blocks_per_program(n_blocks: int, blocksize: int) -> int:
    tile = _INTERPRETER_TILE if _runtime.INTERPRETING else _GPU_TILE
    return max(1, min(tile // blocksize, triton.next_power_of_2(n_blocks)))


# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------

@triton.jit
def _nf4_dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                           nested_offset_ptr, out_ptr, numel, n_bytes, n_blocks,
                           seg_block_1, seg_block_2, seg_group_1, seg_group_2,
                           BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
                           DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr,
                           SEGMENTED: tl.constexpr):
    """Decode BLOCKS_PER_PROGRAM consecutive NF4 blocks into the output dtype.

    Math (fp32, then one rounding to the output dtype):
      absmax[b] = absmax_f32[b], or with double quantization
      absmax[b] = (nested_code[absmax_u8[b]] * nested_absmax[b // NESTED]) + nested_offset
      out[i]    = code[nibble(i)] * absmax[i // BLOCKSIZE]
    where nibble(i) is the high nibble of byte i // 2 for even i, the low one for odd i.
    The launcher disables FMA contraction so the product and the sum each round
    exactly as bitsandbytes' separate fp32 operations do.
    """
    HALF: tl.constexpr = BLOCKSIZE // 2
    block = tl.program_id(0) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    block = block.to(tl.int64)
    in_range = block < n_blocks
    # Each byte is loaded once (contiguous: vectorized) and gives two elements;
    # the absmax is decoded once per block; the code table sits in registers.
    byte_index = block[:, None] * HALF + tl.arange(0, HALF)[None, :]
    # masked against the byte count (not 2 * index < numel), so the compiler sees
    # masks constant over 16 contiguous bytes and issues 16-byte loads
    byte = tl.load(packed_ptr + byte_index, mask=byte_index < n_bytes, other=0).to(tl.int32)

    scale = block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, block,
                         in_range, seg_block_1, seg_block_2, seg_group_1, seg_group_2,
                         DOUBLE_QUANT, NESTED, SEGMENTED)

    table = tl.load(code_ptr + tl.arange(0, 16))
    out_type = out_ptr.dtype.element_ty
    value_even = (nf4_code_lookup(table, byte >> 4) * scale[:, None]).to(out_type)
    value_odd = (nf4_code_lookup(table, byte & 15) * scale[:, None]).to(out_type)
    # interleave (even, odd) back into element order: one contiguous store
    values = tl.reshape(tl.join(value_even, value_odd), (BLOCKS_PER_PROGRAM, BLOCKSIZE))
    offsets = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + offsets, values, mask=offsets < numel)


@triton.jit
def nested_group_and_offset(nested_offset_ptr, block, valid, seg_block_1, seg_block_2,
                            seg_group_1, seg_group_2, NESTED: tl.constexpr,
                            SEGMENTED: tl.constexpr):
    """(nested group, nested offset) of the quantization blocks ``block``.

    An ordinary weight: group b // NESTED and its one offset. A segmented weight
    (up to three double-quantized weights concatenated by rows, NF4Weight.segment_rows)
    keeps each segment's own groups and offset: segment s starts at block
    seg_block_s and group seg_group_s (s = 1, 2; segment 0 at 0, 0; an absent
    segment starts past the last block), so block b of segment s uses group
    seg_group_s + (b - seg_block_s) // NESTED and offset nested_offset[s]:
    exactly the numbers the separate weights decode with.
    """
    if SEGMENTED:
        in_1 = block >= seg_block_1
        in_2 = block >= seg_block_2
        block_start = tl.where(in_2, seg_block_2, tl.where(in_1, seg_block_1, 0))
        group_start = tl.where(in_2, seg_group_2, tl.where(in_1, seg_group_1, 0))
        segment = in_1.to(tl.int32) + in_2.to(tl.int32)
        offset = tl.load(nested_offset_ptr + segment, mask=valid, other=0.0)
        return group_start + (block - block_start) // NESTED, offset
    else:
        return block // NESTED, tl.load(nested_offset_ptr)


@triton.jit
def block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, block, valid,
                 seg_block_1, seg_block_2, seg_group_1, seg_group_2,
                 DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr, SEGMENTED: tl.constexpr):
    """absmax[b] (fp32) for the quantization-block indices ``block``.

    With double quantization the stored absmax is a uint8 index and
    absmax[b] = nested_code[absmax_u8[b]] * nested_absmax[g(b)] + offset(b), with
    g(b) = b // NESTED and one offset, or per segment (nested_group_and_offset).
    Shared by the dequantize kernel and the NF4 matmuls' tile decode; where the
    launcher disables FMA contraction (dequantize) the product and the sum round
    separately, as bitsandbytes' fp32 operations do.
    """
    if DOUBLE_QUANT:
        group, offset = nested_group_and_offset(nested_offset_ptr, block, valid, seg_block_1,
                                                seg_block_2, seg_group_1, seg_group_2,
                                                NESTED, SEGMENTED)
        absmax_q = tl.load(absmax_ptr + block, mask=valid, other=0).to(tl.int32)
        nested_scale = tl.load(nested_absmax_ptr + group, mask=valid, other=0.0)
        return tl.load(nested_code_ptr + absmax_q) * nested_scale + offset
    else:
        return tl.load(absmax_ptr + block, mask=valid, other=0.0)


def segment_args(q: "NF4Weight") -> dict:
    """The runtime arguments of nested_group_and_offset for ``q`` (zeros when unused)."""
    if not q.segmented:
        return dict(seg_block_1=0, seg_block_2=0, seg_group_1=0, seg_group_2=0)
    if len(q.segment_rows) > 3:
        raise ValueError(f"NF4Weight: {len(q.segment_rows)} segments; the kernels decode at most 3")
    block_starts, group_starts = q.segment_starts()
    past = q.n_blocks       # an absent segment starts past the last block
    block_starts = block_starts + (past,) * (3 - len(block_starts))
    group_starts = group_starts + (0,) * (3 - len(group_starts))
    return dict(seg_block_1=block_starts[1], seg_block_2=block_starts[2],
                seg_group_1=group_starts[1], seg_group_2=group_starts[2])


@triton.jit
def nf4_code_lookup(table, nibble):
    """table[nibble] for a tensor of nibbles (0..15) of any shape; ``table`` is the
    [16] code loaded once per program, so the per-element lookup is a register /
    shared-memory gather (tl.gather), never a global-memory load."""
    flat = tl.reshape(nibble, (nibble.numel,))
    return tl.reshape(tl.gather(table, flat, 0), nibble.shape)



# ---------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------

def launch_nf4_dequantize(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """Low-level: decode a validated NF4Weight into a new [numel] tensor of ``dtype``."""
    # The interpreter truncates fp32 -> bf16 (NOTES.md); there the kernel writes
    # fp32 and torch rounds to nearest even, as a GPU store would.
    kernel_dtype = torch.float32 if (_runtime.INTERPRETING and dtype == torch.bfloat16) else dtype
    out = _runtime.new_output((q.numel,), kernel_dtype, q.device)
    absmax = q.absmax
    nested = (q.nested_absmax, q.nested_code, q.nested_offset) if q.double_quant else (absmax,) * 3
    per_program = _blocks_per_program(q.n_blocks, q.blocksize)
    grid = (triton.cdiv(q.n_blocks, per_program),)
    _runtime.record_launch("_nf4_dequantize_kernel")
    _nf4_dequantize_kernel[grid](q.packed, absmax, q.code, *nested, out, q.numel,
                                 (q.numel + 1) // 2, q.n_blocks, **segment_args(q),
                                 BLOCKSIZE=q.blocksize, BLOCKS_PER_PROGRAM=per_program,
                                 DOUBLE_QUANT=q.double_quant, NESTED=NESTED_BLOCKSIZE,
                                 SEGMENTED=q.segmented, **_NO_FMA)
    return out if kernel_dtype == dtype else out.to(dtype)


# ---------------------------------------------------------------------------
# public op
# ---------------------------------------------------------------------------

def nf4_dequantize(q: NF4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The weight ``q`` encodes, shape ``q.shape``, dtype ``dtype`` (default
    ``q.dtype``). In fp32 equal bit for bit to bitsandbytes' dequantize_4bit."""
    op = "nf4_dequantize"
    if not isinstance(q, NF4Weight):
        raise ValueError(f"{op}: argument 'q' must be an NF4Weight, got {type(q).__name__}")
    q.validate(op)
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: argument 'dtype' is {dtype}; expected float32, float16 "
                         "or bfloat16")
    return launch_nf4_dequantize(q, dtype).view(q.shape)


# The torch backend dequantizes inside its matmul (csrc_torch.nf4.dequantize_fp32, checked
# bit for bit against this kernel by tests/test_torch_backend.py); no launcher mirror.
RECORD = OpRecord(
    "nf4_dequantize", (nf4_dequantize,), reference="tests.reference.nf4",
    bench="bench.ops_nf4:nf4_dequantize_bench", compile_specs="tests.sm90_compile:nf4_dequantize_specs")
