"""NF4: 4-bit NormalFloat blockwise quantization, bit-compatible with bitsandbytes.
This module holds the format, NF4Weight; the other NF4 modules:
  nf4_codebook   NF4_CODE_VALUES / nf4_code(), signed_dynamic_map(device=None) (the
                 256-entry code of the nested (double) quantization), the block sizes
  nf4_encode     nf4_quantize(w, blocksize=64, double_quant=False) -> NF4Weight
  nf4_decode     nf4_dequantize(q, dtype=None) -> Tensor, and the kernels' decode helpers
  nf4_bnb        what NF4Weight.to_bnb() / NF4Weight.from_bnb(packed, quant_state) run
  (a checkpoint's state-dict keys: anita_core/hf/bnb.py nf4_to_state_dict / nf4_from_state_dict)

Bit identity with ``bitsandbytes.functional.quantize_4bit(w, blocksize,
quant_type="nf4", compress_statistics=double_quant)`` on CPU, i.e. with the rules
bitsandbytes 0.50 applies there (learnt from its source and checked by tests):

* the weight is flattened row-major and cut into blocks of ``blocksize``; the
  last block may be partial. Everything is computed in fp32 (fp16/bf16 inputs
  are upcast exactly).
* absmax[b] = max |x| over the block. A full block is scaled by multiplying
  with the fp32 reciprocal 1/max(absmax, 1e-38); the partial last block is
  divided by max(absmax, 1e-38) instead, and stores that clamped value (so an
  all-zero partial block stores 1e-38 while an all-zero full block stores 0).
* the 4-bit index is the number of NF4 midpoints (code[j] + code[j+1]) / 2
  (fp32) lying strictly below the scaled value: a value exactly on a midpoint
  takes the lower code. Indices pack two per byte, the even element in the
  high nibble; an odd numel pads the last low nibble with the index of 0.0 (7).
* double quantization: offset = mean of the fp32 absmax (torch's own mean on
  the same device, so the summation order is the one bitsandbytes uses);
  v = absmax - offset is quantized in groups of 256 against the signed dynamic
  map M: nested_absmax[g] = m = max |v| over the group, x = clamp(v * (1/m), -1, 1),
  and -- because bitsandbytes' CPU code reads the index from a 65536-entry
  table rather than searching for the nearest code -- the index is the number
  of midpoints (M[k] + M[k+1]) / 2 below the table's grid point
  -1 + 2 t / 65535, t = trunc(((x + 1) * 0.5) * 65535 + 0.5). This is not
  always the nearest code (it can differ within ~1.5e-5 of a midpoint); a
  group whose m is 0 gets index 0.
* dequantization: absmax = nested_code[q] * nested_absmax[b // 256] + offset
  (a rounded product, then a rounded sum: never fused into an FMA), and
  w = code[idx] * absmax in fp32, rounded once to the output dtype. (Caution:
  bitsandbytes 0.50's CPU dequantize_4bit hands weights with an even last dim
  to a C kernel that picks the wrong block whenever that dim is not a multiple
  of the blocksize, and for 1-D weights; its generic path -- odd last dim --
  and its quantizer use the flat layout above, which is what this module does.)

No backward: quantization is piecewise constant (its gradient is zero almost
everywhere and undefined at the midpoints) and the NF4 base weight of QLoRA is
frozen, so neither op is differentiable and no autograd.Function is provided.
Gradients flow through the dequantized weight inside nf4_matmul / lora_linear,
never into the NF4 storage.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

import torch

from . import nf4_bnb
from .checks import FLOAT_DTYPES, check_same_device, check_tensor
from .nf4_codebook import NESTED_BLOCKSIZE, SUPPORTED_BLOCKSIZES, is_supported_blocksize, nf4_code


@dataclass
class NF4Weight:
    """A frozen weight stored in NF4, laid out exactly as bitsandbytes lays it out.

    The weight (logical ``shape``, usually [out_features, in_features]) is
    flattened row-major and cut into blocks of ``blocksize`` elements. Element i
    is ``code[idx_i] * absmax[i // blocksize]``; two 4-bit indices share a byte,
    the even element in the high nibble.

    With double quantization the per-block absmax is itself stored as uint8:
    ``absmax[b] = nested_code[absmax_u8[b]] * nested_absmax[b // 256] + nested_offset``.
    """

    packed: torch.Tensor                    # uint8 [ceil(numel / 2)]
    absmax: torch.Tensor                    # float32 [n_blocks], or uint8 if double-quantized
    shape: torch.Size                       # logical shape of the weight
    blocksize: int
    dtype: torch.dtype                      # what nf4_dequantize returns by default
    code: torch.Tensor = field(default=None)  # float32 [16]
    nested_absmax: Optional[torch.Tensor] = None   # float32 [ceil(n_blocks / 256)]
    nested_code: Optional[torch.Tensor] = None     # float32 [256], signed dynamic map
    nested_offset: Optional[torch.Tensor] = None   # float32 scalar tensor ([S] if segmented)
    # Rows of each weight when this one is their row concatenation (nf4_concat:
    # q/k/v as one matmul operand); None for an ordinary weight. Double-quantized
    # segments keep their own nested groups and offset, see segment_starts.
    segment_rows: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        if self.code is None:
            self.code = nf4_code(self.packed.device)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def segmented(self) -> bool:
        """Whether the nested absmax is decoded per segment (a concatenation of
        double-quantized weights); single-quantized segments are a plain concatenation."""
        return self.segment_rows is not None and self.double_quant

    def segment_starts(self) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """(first block, first nested group) of each segment: segment s decodes block b
        with nested group group_start[s] + (b - block_start[s]) // 256 and offset
        nested_offset[s]."""
        rows = self.segment_rows if self.segment_rows is not None else (self.shape[0],)
        blocks = [r * self.numel // self.shape[0] // self.blocksize for r in rows]
        block_starts, group_starts = [0], [0]
        for n in blocks[:-1]:
            block_starts.append(block_starts[-1] + n)
            group_starts.append(group_starts[-1] + -(-n // NESTED_BLOCKSIZE))
        return tuple(block_starts), tuple(group_starts)

    def n_nested_groups(self) -> int:
        if not self.segmented:
            return -(-self.n_blocks // NESTED_BLOCKSIZE)
        block_starts, group_starts = self.segment_starts()
        return group_starts[-1] + -(-(self.n_blocks - block_starts[-1]) // NESTED_BLOCKSIZE)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device) -> "NF4Weight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, packed=move(self.packed), absmax=move(self.absmax),
                       code=move(self.code), nested_absmax=move(self.nested_absmax),
                       nested_code=move(self.nested_code),
                       nested_offset=move(self.nested_offset))

    def nbytes(self) -> int:
        tensors = (self.packed, self.absmax, self.code, self.nested_absmax,
                   self.nested_code, self.nested_offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # -- validation -------------------------------------------------------------------

    def validate(self, op: str = "NF4Weight") -> "NF4Weight":
        """Check that every field is consistent with ``shape`` and ``blocksize``;
        ValueError naming the field otherwise. Returns self."""
        if len(self.shape) == 0 or self.numel == 0:
            raise ValueError(f"{op}: NF4Weight.shape must be non-empty, got {tuple(self.shape)}")
        if not is_supported_blocksize(self.blocksize):
            raise ValueError(f"{op}: NF4Weight.blocksize is {self.blocksize!r}; "
                             f"expected one of {SUPPORTED_BLOCKSIZES}")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: NF4Weight.dtype is {self.dtype}; expected float32, "
                             "float16 or bfloat16")

        def expect(name, tensor, dtype, shape):
            check_tensor(op, f"NF4Weight.{name}", tensor, dtypes=(dtype,), shape=shape)

        expect("packed", self.packed, torch.uint8, ((self.numel + 1) // 2,))
        expect("code", self.code, torch.float32, (16,))
        if self.double_quant:
            expect("absmax", self.absmax, torch.uint8, (self.n_blocks,))
            expect("nested_absmax", self.nested_absmax, torch.float32, (self.n_nested_groups(),))
            if self.nested_code is None or self.nested_offset is None:
                raise ValueError(f"{op}: a double-quantized NF4Weight needs nested_code "
                                 "and nested_offset as well as nested_absmax")
            expect("nested_code", self.nested_code, torch.float32, (256,))
            expect("nested_offset", self.nested_offset, torch.float32,
                   (len(self.segment_rows),) if self.segmented else ())
        else:
            expect("absmax", self.absmax, torch.float32, (self.n_blocks,))
            if self.nested_code is not None or self.nested_offset is not None:
                raise ValueError(f"{op}: NF4Weight has nested_code/nested_offset but no "
                                 "nested_absmax")
        check_same_device(op, packed=self.packed, absmax=self.absmax, code=self.code,
                          nested_absmax=self.nested_absmax, nested_code=self.nested_code,
                          nested_offset=self.nested_offset)
        return self

    def refuse_segmented(self, op: str) -> None:
        if self.segment_rows is not None:
            raise ValueError(f"{op}: this NF4Weight concatenates {len(self.segment_rows)} "
                             "weights (a compute operand); save or export its segments instead")

    # -- bitsandbytes objects (nf4_bnb; bitsandbytes imported only there) -------------

    def to_bnb(self):
        """(packed uint8 [ceil(numel/2), 1], bitsandbytes.functional.QuantState).

        The returned tensors share memory with this weight (code maps are copied).
        Needs bitsandbytes installed."""
        return nf4_bnb.to_bnb(self)

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> "NF4Weight":
        """Wrap bitsandbytes' (packed, QuantState) from quantize_4bit(quant_type="nf4").
        Shares memory with the given tensors. ValueError if the state is not a
        supported NF4 state."""
        return nf4_bnb.from_bnb(cls, packed, quant_state)
