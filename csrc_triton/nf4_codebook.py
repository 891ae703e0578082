"""The NF4 code book: the 16 NF4 code values, the signed 8-bit dynamic map that the
nested (double) quantization codes the block absmax with, and the block sizes.

Plain torch, no kernels: the bottom of the NF4 modules (nf4 holds the NF4Weight
that uses them, nf4_encode / nf4_decode the kernels, nf4_bnb the bitsandbytes forms).
"""
from __future__ import annotations

import functools

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


def is_supported_blocksize(blocksize) -> bool:
    # 64.0 or True would pass a plain `in` test and then break the kernels.
    return (isinstance(blocksize, int) and not isinstance(blocksize, bool)
            and blocksize in SUPPORTED_BLOCKSIZES)


def check_is_nf4_code(op: str, name: str, code: torch.Tensor) -> None:
    if not torch.equal(code.cpu(), nf4_code()):
        raise ValueError(f"{op}: {name} is not the NF4 code (expected the 16 values of "
                         "NF4_CODE_VALUES); only nf4 is supported")


def signed_dynamic_map(device=None) -> torch.Tensor:
    """A fresh copy (callers own it; checkpoints must not share it) of the signed
    8-bit dynamic map; see _build_signed_dynamic_map."""
    return _build_signed_dynamic_map().to(device, copy=True)


@functools.lru_cache(maxsize=1)
def _build_signed_dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic quantization map (Dettmers 2015), 256 fp32 values.

    Seven decades 10^-6 .. 10^0; decade k holds 2^k magnitudes, the midpoints of
    2^k + 1 evenly spaced points on [0.1, 1] (fp32 linspace) scaled by 10^(k-6),
    each with both signs: 2 * 127 values, plus 0 and 1, sorted ascending. This is
    the map bitsandbytes builds with create_dynamic_map(signed=True) and uses for
    the nested absmax of double quantization (equality is tested).
    """
    values = [0.0, 1.0]
    for decade in range(7):
        points = torch.linspace(0.1, 1.0, 2 ** decade + 1, dtype=torch.float32)
        magnitudes = (points[:-1] + points[1:]) / 2 * 10.0 ** (decade - 6)
        values += magnitudes.tolist() + (-magnitudes).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)
