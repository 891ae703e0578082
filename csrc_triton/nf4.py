"""NF4: 4-bit NormalFloat blockwise quantization, bit-compatible with bitsandbytes.

PLACEHOLDER BODY: the container below is final; the quantize/dequantize
kernels are being written (issue 2).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

# The 16 NF4 code values (QLoRA, Dettmers et al. 2023), exactly as bitsandbytes
# stores them in float32. Index 7 is exact zero.
NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256)
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax in blocks of 256


def nf4_code(device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


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
    nested_offset: Optional[torch.Tensor] = None   # float32 scalar tensor

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


def nf4_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    raise NotImplementedError("nf4_quantize: being written (issue 2)")


def nf4_dequantize(q: NF4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    raise NotImplementedError("nf4_dequantize: being written (issue 2)")
