"""nf4_matmul: y = x @ W^T with W stored in NF4, on one of two paths chosen by M.

Small M (<= nf4_dense.fused_max_m_setting(), 192 by default): the fused kernels of
nf4_matmul_kernels, which decode each W tile from the packed bytes in registers and
never write a full-precision copy of W (at these M the matmul is bound by reading W,
and the fused kernel reads 4x fewer bytes than a bf16 matmul).

Large M: nf4_dense's path, dequantize once then cuBLAS (the decode, repeated for
every row of output tiles, would cost more than the tensor cores' work).

Here: the block sizes (the autotuned GPU configs, the interpreter's blocks), the
launchers with their LoRA and SwiGLU epilogue arguments (used by ``lora_linear``),
nf4_matmul_forward / nf4_matmul_backward_input, and the autograd.Function of nf4_matmul.

Bias (Qwen2's q/k/v): the forward takes an optional frozen ``bias`` [N] in the
activations' dtype, y = x W^T + b. The fused path adds it in the kernel's epilogue
(HAS_BIAS, in fp32 before the one rounding); the dequantize path passes it to the GEMM
(torch.addmm with the 1-D bias: on CUDA PyTorch runs it as cuBLASLt's bias epilogue, so
no pass over y is added; on the CPU it is the same call). Backward: dL/dx = dY W
whether or not y had a bias (b does not depend on x), and b is frozen (no dL/db), so
the backward launchers take no bias.

Index width: the fused kernels index activations in 32 bits (they only see M up to
the dispatch threshold); a launch whose activations pass 2^31 - 1 elements takes the
dequantize path (torch.mm indexes in 64 bits) whatever M's threshold says, and an
explicit path='fused' for it is refused.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton

from . import _runtime
from .checks import FLOAT_DTYPES, check_rows, check_same_device, check_tensor, wide_index
from .autotune_policy import autotune
from .nf4 import NF4Weight
from .nf4_decode import _NO_FMA
from .nf4_dense import (check_dense_weight, choose_path, dense_backward_input, dense_forward,
                        dequantize_for_matmul)
from .nf4_matmul_kernels import _nf4_matmul_bwd_input_kernel, _nf4_matmul_fwd_kernel
from .nf4_operand import check_nf4_weight, weight_args, weight_constexprs
from .records import OpRecord
from .swiglu import swiglu_backward

# ---------------------------------------------------------------------------
# block sizes
# ---------------------------------------------------------------------------

class GpuConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8       # row tiles walked per column strip, for L2 reuse of W tiles


# The autotuner's choices on a GPU, for the M the fused path sees (<= the dispatch
# threshold, 192 by default: 128-row tiles and 64-row ones). BLOCK_M 16
# tiles use mma.sync (HMMA: wgmma needs 64 rows) and waste less at M <= 16.
# Every one compiles for sm_90 within the shared-memory limit in bf16 and fp16
# (tests/test_hopper_compile.py, `-m sweep`).
GPU_CONFIGS = (
    GpuConfig(128, 128, 64, 8, 3), GpuConfig(64, 64, 64, 4, 4), GpuConfig(64, 128, 64, 4, 3),
    GpuConfig(64, 64, 128, 4, 3), GpuConfig(16, 64, 128, 4, 3), GpuConfig(16, 128, 64, 4, 3))
# The configs held to the no-spill / HGMMA bar by the default compile check:
# the reference tile and the small-M one.
CHOSEN_GPU_CONFIGS = GPU_CONFIGS[:2]


def lora_operand_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    """dtype of the LoRA epilogue's operands (xa or g, and B or A) for these activations:
    the activations' own on a GPU (the epilogue's rank-r dot runs on the tensor cores
    with fp32 accumulation), fp32 where the kernels compute in fp32."""
    return torch.float32 if _operands_in_fp32(activation_dtype) else activation_dtype


def _gpu_configs():
    return [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k,
                           "GROUP_M": c.group_m}, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in GPU_CONFIGS]


if _runtime.INTERPRETING:
    # The interpreter cannot autotune (NOTES.md); the launcher picks blocks.
    _fwd_kernel = _nf4_matmul_fwd_kernel
    _bwd_input_kernel = _nf4_matmul_bwd_input_kernel
else:
    _fwd_kernel = autotune(_nf4_matmul_fwd_kernel, _gpu_configs(), key=["M", "N", "K"])
    _bwd_input_kernel = autotune(_nf4_matmul_bwd_input_kernel, _gpu_configs(),
                                 key=["M", "N", "K"])


def _interpreter_block(size: int, cap: int) -> int:
    # Interpreter cost ~ programs x loop steps (NOTES.md): each program and each
    # operation costs a fixed Python overhead, while NumPy handles a tile of
    # 512 x 256 as fast as a small one, so cover a whole dimension where we can.
    return min(cap, max(16, triton.next_power_of_2(size)))


def _launch(kernel, name: str, grid_dims, args, constexprs, flops: int):
    """Launch with launcher-chosen blocks on the interpreter, autotuned on GPU.
    FMA contraction is off, so the absmax decode nested_code * nested_absmax +
    offset rounds twice, as in nf4_dequantize and bitsandbytes (the MMAs and the
    single multiply per element do not depend on it).

    ``name`` and ``flops`` (2 per multiply-add) go to _runtime.record_launch.
    grid_dims: (rows, columns) of the output tile grid, as sizes of the
    dimensions that BLOCK_M and the second block constexpr cut.
    """
    rows, (column_size, column_block_name) = grid_dims
    _runtime.record_launch(name, flops)
    if _runtime.INTERPRETING:
        blocks = {"BLOCK_M": _interpreter_block(rows, 512), "BLOCK_N": _interpreter_block(args["N"], 256),
                  "BLOCK_K": _interpreter_block(args["K"], 256), "GROUP_M": 1}
        n_tiles = triton.cdiv(rows, blocks["BLOCK_M"]) * triton.cdiv(
            column_size, blocks[column_block_name])
        kernel[(n_tiles,)](**args, **constexprs, **blocks, **_NO_FMA)
    else:
        def grid(meta):
            return (triton.cdiv(rows, meta["BLOCK_M"])
                    * triton.cdiv(column_size, meta[column_block_name]),)
        kernel[grid](**args, **constexprs, **_NO_FMA)


def _lora_block(rank: int) -> int:
    # tl.dot needs every dimension >= 16; ranks above 64 loop in chunks.
    return min(64, max(16, triton.next_power_of_2(rank)))


# ---------------------------------------------------------------------------
# launchers (2-D)
# ---------------------------------------------------------------------------

class LoraForwardEpilogue(NamedTuple):
    """y += scale * xa @ B^T on the output tile."""
    xa: torch.Tensor       # [M, r], any float dtype (cast to lora_operand_dtype)
    lora_b: torch.Tensor   # [N, r], contiguous, any float dtype
    scale: float


class LoraBackwardEpilogue(NamedTuple):
    """dx += scale * keep/(1-p) * (g @ A) on the output tile."""
    g: torch.Tensor                    # [M, r] = dY B, any float dtype
    lora_a: torch.Tensor               # [r, K], contiguous, any float dtype
    scale: float
    keep: Optional[torch.Tensor]       # uint8 [M, K] (1 = kept), None without dropout
    keep_scale: float                  # 1 / (1 - p)


def _lora_operand(t: torch.Tensor, activation_dtype: torch.dtype) -> torch.Tensor:
    # [M, r] or [N, r] / [r, K]: a small copy at most
    return t.to(lora_operand_dtype(activation_dtype)).contiguous()


def _operands_in_fp32(dtype: torch.dtype) -> bool:
    return _runtime.DOT_IN_FP32 or dtype == torch.float32


def check_bias(op: str, bias, n: int, dtype: torch.dtype, device: torch.device) -> None:
    """``bias`` is None or a contiguous [n] tensor of the activations' dtype on their device."""
    if bias is None:
        return
    check_tensor(op, "bias", bias, dtypes=(dtype,), ndim=1, shape=(n,))
    if bias.device != device:
        raise ValueError(f"{op}: argument 'bias' is on {bias.device}; expected the activations' "
                         f"device {device}")


def refuse_trainable_bias(op: str, bias) -> None:
    """The autograd Functions treat the bias as a frozen base weight (no gradient)."""
    if isinstance(bias, torch.Tensor) and bias.requires_grad:
        raise ValueError(f"{op}: argument 'bias' requires grad; the bias is a frozen base "
                         "weight here (no gradient is computed): pass bias.detach()")


def _choose(op: str, M: int, path: Optional[str], dtype: torch.dtype, dense_w, *tensors) -> str:
    """nf4_dense.choose_path, except that activations past 32-bit indexing (``tensors``,
    by their span) always take the dequantize path (refused for an explicit 'fused')."""
    chosen = "dequant" if dense_w is not None else choose_path(op, M, path, dtype)
    if chosen == "fused" and wide_index(*tensors):
        if path == "fused":
            raise ValueError(f"{op}: path 'fused' indexes activations in 32 bits, and these pass "
                             f"{_runtime.MAX_INT32_NUMEL} elements; use path 'dequant' or None")
        chosen = "dequant"
    return chosen


def launch_forward(op: str, x2d: torch.Tensor, w: NF4Weight,
                   lora: Optional[LoraForwardEpilogue] = None, *,
                   dense_w: Optional[torch.Tensor] = None,
                   path: Optional[str] = None,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x2d @ W^T (+ LoRA epilogue) (+ bias [N]). Arguments must already be validated
    (the bias by check_bias).

    ``path`` 'fused' | 'dequant' | None (by M: nf4_dense.choose_path). The
    dequantize path uses ``dense_w`` (= dequantize_for_matmul(w, x2d.dtype)) when
    given, so a caller running forward and backward on one layer decodes W once."""
    M, K = x2d.shape
    N = w.shape[0]
    y = _runtime.new_output((M, N), x2d.dtype, x2d.device)
    if M == 0:
        return y
    if _choose(op, M, path, x2d.dtype, dense_w, x2d, y) == "dequant":
        if dense_w is None:
            dense_w = dequantize_for_matmul(w, x2d.dtype)
        check_dense_weight(op, dense_w, w, x2d.dtype)
        return dense_forward(x2d, dense_w, y, lora, bias)
    rank = 0 if lora is None else lora.xa.shape[1]
    args = dict(x_ptr=x2d, y_ptr=y, M=M, N=N, K=K, R=max(rank, 1),
                bias_ptr=x2d if bias is None else bias,
                xa_ptr=x2d if lora is None else _lora_operand(lora.xa, x2d.dtype),
                lora_b_ptr=x2d if lora is None else _lora_operand(lora.lora_b, x2d.dtype),
                lora_scale=0.0 if lora is None else float(lora.scale),
                **weight_args(w))
    constexprs = dict(HAS_LORA=lora is not None, BLOCK_R=_lora_block(rank),
                      HAS_BIAS=bias is not None, OPERANDS_IN_FP32=_operands_in_fp32(x2d.dtype),
                      **weight_constexprs(w))
    _launch(_fwd_kernel, "_nf4_matmul_fwd_kernel", (M, (N, "BLOCK_N")), args, constexprs,
            2 * M * N * (K + rank))
    return y


def check_swiglu_input(op: str, swiglu_input, M: int, K: int, dtype: torch.dtype):
    """``swiglu_input`` = (gate, up), each [M, K] in the activations' dtype, rows of
    contiguous elements (e.g. the two halves of the fused gate/up output), or None.
    Returns their row strides (None without)."""
    if swiglu_input is None:
        return None
    if not isinstance(swiglu_input, (tuple, list)) or len(swiglu_input) != 2:
        raise ValueError(f"{op}: argument 'swiglu_input' must be (gate, up) or None")
    return tuple(check_rows(op, f"swiglu_input.{name}", t, dtypes=(dtype,), shape=(M, K))
                 for name, t in zip(("gate", "up"), swiglu_input))


def launch_backward_input(op: str, dy2d: torch.Tensor, w: NF4Weight, out_dtype: torch.dtype,
                          lora: Optional[LoraBackwardEpilogue] = None, *,
                          dense_w: Optional[torch.Tensor] = None, path: Optional[str] = None,
                          swiglu_input: Optional[tuple] = None) -> torch.Tensor:
    """dx = dy2d @ W (+ LoRA epilogue). Arguments must already be validated.
    ``dense_w`` and ``path`` as in launch_forward (dense_w in dy2d's dtype).
    ``swiglu_input`` = (gate, up) with x = silu(gate) * up: returns [dgate, dup]
    [M, 2K] instead of dx (the kernel's SwiGLU epilogue; on the dequantize path the
    matmul writes dL/dx into dx's first K columns and swiglu_backward turns them, in
    place, into dgate there and dup beside them: one buffer, no concatenation)."""
    M, N = dy2d.shape
    K = w.shape[1]
    dx = _runtime.new_output((M, K * (1 if swiglu_input is None else 2)), out_dtype, dy2d.device)
    if M == 0:
        return dx
    swiglu_strides = (0, 0) if swiglu_input is None else (swiglu_input[0].stride(0),
                                                          swiglu_input[1].stride(0))
    if _choose(op, M, path, dy2d.dtype, dense_w, dy2d, dx,
               *(swiglu_input or ())) == "dequant":
        if dense_w is None:
            dense_w = dequantize_for_matmul(w, dy2d.dtype)
        check_dense_weight(op, dense_w, w, dy2d.dtype)
        if swiglu_input is None:
            return dense_backward_input(dy2d, dense_w, dx, lora)
        dm = dense_backward_input(dy2d, dense_w, dx[:, :K], lora)
        swiglu_backward(dm, *swiglu_input, out=(dm, dx[:, K:]))
        return dx
    rank = 0 if lora is None else lora.g.shape[1]
    has_dropout = lora is not None and lora.keep is not None
    args = dict(dy_ptr=dy2d, dx_ptr=dx, M=M, N=N, K=K, R=max(rank, 1),
                g_ptr=dy2d if lora is None else _lora_operand(lora.g, dy2d.dtype),
                lora_a_ptr=dy2d if lora is None else _lora_operand(lora.lora_a, dy2d.dtype),
                keep_ptr=lora.keep if has_dropout else dy2d,
                gate_ptr=dy2d if swiglu_input is None else swiglu_input[0],
                up_ptr=dy2d if swiglu_input is None else swiglu_input[1],
                lora_scale=0.0 if lora is None else float(lora.scale),
                keep_scale=1.0 if lora is None else float(lora.keep_scale),
                stride_gate=swiglu_strides[0], stride_up=swiglu_strides[1],
                **weight_args(w))
    constexprs = dict(HAS_LORA=lora is not None, HAS_DROPOUT=has_dropout,
                      HAS_SWIGLU=swiglu_input is not None,
                      BLOCK_R=_lora_block(rank),
                      OPERANDS_IN_FP32=_operands_in_fp32(dy2d.dtype), **weight_constexprs(w))
    _launch(_bwd_input_kernel, "_nf4_matmul_bwd_input_kernel", (M, (K, "BLOCK_K")), args,
            constexprs, 2 * M * K * (N + rank))
    return dx


def nf4_matmul_forward(x2d: torch.Tensor, w: NF4Weight, *, dense_w: Optional[torch.Tensor] = None,
                       path: Optional[str] = None,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y2d = x2d @ W^T (+ bias) for x2d [M, K] fp32/fp16/bf16, W [N, K] in NF4 and an
    optional frozen bias [N] in x2d's dtype; y2d in x2d's dtype.
    ``dense_w``/``path``: see launch_forward."""
    op = "nf4_matmul_forward"
    check_nf4_weight(op, w)
    check_tensor(op, "x2d", x2d, dtypes=FLOAT_DTYPES, ndim=2, shape=(None, w.shape[1]),
                 max_numel=None)
    check_same_device(op, x2d=x2d, w=w.packed)
    check_bias(op, bias, w.shape[0], x2d.dtype, x2d.device)
    return launch_forward(op, x2d, w, dense_w=dense_w, path=path, bias=bias)


def nf4_matmul_backward_input(dy2d: torch.Tensor, w: NF4Weight, *,
                              dense_w: Optional[torch.Tensor] = None,
                              path: Optional[str] = None,
                              swiglu_input: Optional[tuple] = None) -> torch.Tensor:
    """dx2d = dy2d @ W for dy2d [M, N] and W [N, K] in NF4; dx2d in dy2d's dtype.
    ``dense_w``/``path``/``swiglu_input``: see launch_backward_input. The same whether
    or not the forward had a bias (frozen, and y's bias term has no x in it)."""
    op = "nf4_matmul_backward_input"
    check_nf4_weight(op, w)
    check_tensor(op, "dy2d", dy2d, dtypes=FLOAT_DTYPES, ndim=2, shape=(None, w.shape[0]),
                 max_numel=None)
    check_same_device(op, dy2d=dy2d, w=w.packed)
    check_swiglu_input(op, swiglu_input, dy2d.shape[0], w.shape[1], dy2d.dtype)
    return launch_backward_input(op, dy2d, w, dy2d.dtype, dense_w=dense_w, path=path,
                                 swiglu_input=swiglu_input)


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------

class NF4Matmul(torch.autograd.Function):
    """y = x @ W^T (+ bias) over the last dim of x; gradient flows to x only (W and the
    bias are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: NF4Weight,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        op = "nf4_matmul"
        check_nf4_weight(op, w)
        check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, max_numel=None)
        if x.dim() < 1 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"{op}: argument 'x' has shape {tuple(x.shape)}; expected "
                             f"last dim {w.shape[1]} (= in_features K of w {tuple(w.shape)})")
        check_same_device(op, x=x, w=w.packed)
        check_bias(op, bias, w.shape[0], x.dtype, x.device)
        refuse_trainable_bias(op, bias)
        ctx.w = w
        ctx.x_shape = x.shape
        y2d = launch_forward(op, x.reshape(-1, w.shape[1]), w, bias=bias)
        return y2d.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        w = ctx.w
        if not ctx.needs_input_grad[0]:
            return None, None, None
        dy2d = dy.reshape(-1, w.shape[0]).contiguous()
        dx2d = launch_backward_input("nf4_matmul.backward", dy2d, w, dy.dtype)
        return dx2d.reshape(ctx.x_shape), None, None


def nf4_matmul_op(x: torch.Tensor, w: NF4Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ W^T (+ bias). x: [..., K] fp32/fp16/bf16, contiguous; W: NF4Weight of
    logical shape [N, K]; bias: None or [N] in x's dtype. Returns [..., N] in x's dtype
    (fp32 accumulation). Differentiable in x; W and the bias get no gradient (a bias
    that requires grad is refused)."""
    return NF4Matmul.apply(x, w, bias)


RECORD = OpRecord(
    "nf4_matmul", (nf4_matmul_forward, nf4_matmul_backward_input, choose_path,
                   dequantize_for_matmul),
    torch_mirror="csrc_torch.nf4_matmul", reference="tests.reference.nf4",
    parity="tests.test_torch_backend:nf4_matmul_parity", bench="bench.ops_nf4:nf4_matmul_bench",
    compile_specs="tests.sm90_compile:nf4_matmul_specs")
