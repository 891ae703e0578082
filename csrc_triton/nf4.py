"""NF4: 4-bit NormalFloat blockwise quantization, bit-compatible with bitsandbytes.

Public API
  nf4_quantize(w, blocksize=64, double_quant=False) -> NF4Weight
  nf4_dequantize(q, dtype=None) -> Tensor
  NF4Weight.to_bnb() / NF4Weight.from_bnb(packed, quant_state)
  NF4Weight.to_state_dict(prefix) / NF4Weight.from_state_dict(tensors, prefix, dtype=None)
  signed_dynamic_map(device=None)     the 256-entry code of the nested (double) quantization

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

import functools
import json
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _runtime
from ._checks import FLOAT_DTYPES, check_same_device, check_tensor

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


def _is_supported_blocksize(blocksize) -> bool:
    # 64.0 or True would pass a plain `in` test and then break the kernels.
    return (isinstance(blocksize, int) and not isinstance(blocksize, bool)
            and blocksize in SUPPORTED_BLOCKSIZES)


# Key suffixes of a serialized 4-bit weight (bitsandbytes QuantState.as_dict(packed=True),
# written by transformers next to '<module>.weight').
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
_OTHER_QUANT_STATE_KEYS = ("quant_state.bitsandbytes__fp4",)


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
        if not _is_supported_blocksize(self.blocksize):
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

    # -- bitsandbytes objects (bitsandbytes imported only here) -----------------------

    def to_bnb(self):
        """(packed uint8 [ceil(numel/2), 1], bitsandbytes.functional.QuantState).

        The returned tensors share memory with this weight (code maps are copied).
        Needs bitsandbytes installed."""
        from bitsandbytes.functional import QuantState

        self.validate("NF4Weight.to_bnb")
        self.refuse_segmented("NF4Weight.to_bnb")
        nested = None
        if self.double_quant:
            nested = QuantState(absmax=self.nested_absmax, code=self.nested_code.clone(),
                                blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        state = QuantState(absmax=self.absmax, shape=self.shape, code=self.code.clone(),
                           blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype,
                           offset=self.nested_offset, state2=nested)
        return self.packed.view(-1, 1), state

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> "NF4Weight":
        """Wrap bitsandbytes' (packed, QuantState) from quantize_4bit(quant_type="nf4").
        Shares memory with the given tensors. ValueError if the state is not a
        supported NF4 state."""
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

    # -- the serialized form of pre-quantized 4-bit checkpoints (no bitsandbytes) -----

    def to_state_dict(self, prefix: str = "") -> Dict[str, torch.Tensor]:
        """The tensors transformers saves for a 4-bit linear at module path ``prefix``
        (e.g. 'model.layers.0.self_attn.q_proj.'): '{prefix}weight' (uint8
        [ceil(numel/2), 1]), '{prefix}weight.absmax', '.quant_map', with double
        quantization '.nested_absmax' and '.nested_quant_map', and
        '{prefix}weight.quant_state.bitsandbytes__nf4': the remaining fields as
        UTF-8 JSON bytes in a uint8 tensor. Tensors share memory with this weight
        except the two code maps, which are copied (safetensors refuses shared maps)."""
        self.validate("NF4Weight.to_state_dict")
        self.refuse_segmented("NF4Weight.to_state_dict")
        base = f"{prefix}weight"
        meta = {"quant_type": "nf4", "blocksize": self.blocksize,
                "dtype": _dtype_name(self.dtype), "shape": list(self.shape)}
        tensors = {base: self.packed.view(-1, 1), f"{base}.absmax": self.absmax,
                   f"{base}.quant_map": self.code.clone()}
        if self.double_quant:
            tensors[f"{base}.nested_absmax"] = self.nested_absmax
            tensors[f"{base}.nested_quant_map"] = self.nested_code.clone()
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                        nested_offset=float(self.nested_offset.item()))
        packed_meta = json.dumps(meta).encode("utf-8")
        tensors[f"{base}.{QUANT_STATE_KEY}"] = torch.tensor(
            list(packed_meta), dtype=torch.uint8, device=self.device)
        return tensors

    @classmethod
    def from_state_dict(cls, tensors: Dict[str, torch.Tensor], prefix: str = "",
                        dtype: Optional[torch.dtype] = None) -> "NF4Weight":
        """Read what to_state_dict (or transformers / bitsandbytes) wrote at ``prefix``.
        ``dtype`` overrides the dequantization dtype recorded in the checkpoint.
        ValueError naming the key for a missing key, a wrong dtype or shape, a
        non-NF4 quant type or an unreadable quant-state record."""
        return _read_state_dict(cls, tensors, prefix, dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_is_nf4_code(op: str, name: str, code: torch.Tensor) -> None:
    if not torch.equal(code.cpu(), nf4_code()):
        raise ValueError(f"{op}: {name} is not the NF4 code (expected the 16 values of "
                         "NF4_CODE_VALUES); only nf4 is supported")


def _read_state_dict(cls, tensors, prefix, dtype) -> NF4Weight:
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
    safe = tl.maximum(absmax, 1e-38)
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

    if DOUBLE_QUANT:
        group, offset = nested_group_and_offset(nested_offset_ptr, block, in_range, seg_block_1,
                                                seg_block_2, seg_group_1, seg_group_2,
                                                NESTED, SEGMENTED)
        absmax_q = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
        nested_scale = tl.load(nested_absmax_ptr + group, mask=in_range, other=0.0)
        scale = tl.load(nested_code_ptr + absmax_q) * nested_scale
        scale = scale + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)

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
# launchers
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
# public ops
# ---------------------------------------------------------------------------

def check_quantize_args(w, blocksize, double_quant) -> None:
    """The checks of nf4_quantize (shared with csrc_torch's)."""
    op = "nf4_quantize"
    check_tensor(op, "w", w, dtypes=FLOAT_DTYPES)
    if w.numel() == 0:
        raise ValueError(f"{op}: argument 'w' is empty (shape {tuple(w.shape)})")
    if w.dim() == 0:
        raise ValueError(f"{op}: argument 'w' must have at least one dimension")
    if not _is_supported_blocksize(blocksize):
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
