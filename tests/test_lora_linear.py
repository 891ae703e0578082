"""lora_linear (x W^T + scale * (drop(x) A^T) B^T, W in NF4) against the float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

from csrc_triton.lora_linear import (LoRAContext, lora_linear_op, lora_linear_backward,
                                     lora_linear_forward)
from csrc_triton.nf4_matmul import nf4_matmul_forward
from tests.helpers import assert_close, quantized
from tests.reference.lora_linear import reference_lora_linear
from tests.reference.nf4 import reference_nf4_dequantize
from tests.test_nf4_matmul import (FP32_ATOL, FP32_RTOL, LOW_PRECISION_ATOL, make_nf4_weight,
                                   matmul_tolerance, random_nf4_weight, unit_roundoff)

# a kernel against its float64 reference: also run under the oldest supported triton
# (tests/test_supported_tritons.py)
pytestmark = pytest.mark.kernels

OP = "lora_linear"


def small_matmul_tolerance(dtype: torch.dtype):
    """(atol, rtol) for dA / dB: torch fp32 matmuls over <= 150 rows, then one
    rounding to the LoRA dtype (rtol 2u: at most u, with 2x headroom)."""
    if dtype == torch.float32:
        return FP32_ATOL, FP32_RTOL
    return LOW_PRECISION_ATOL, 2 * unit_roundoff(dtype)


def make_lora(n: int, k: int, rank: int, dtype: torch.dtype):
    # Kaiming-like A and a non-zero B (PEFT starts B at 0, which would hide the
    # whole low-rank path from the test).
    a = (torch.randn(rank, k) / math.sqrt(k)).to(dtype)
    b = (torch.randn(n, rank) * 0.1).to(dtype)
    return a, b


def reference_with_grads(x64, w64, a64, b64, scale, keep_mask, dropout, dy64):
    """Float64 forward and torch.autograd.grad of it: (y, dx, dA, dB)."""
    x64, a64, b64 = (t.detach().clone().requires_grad_() for t in (x64, a64, b64))
    y64 = reference_lora_linear(x64, w64, a64, b64, scale, keep_mask, dropout)
    dx64, da64, db64 = torch.autograd.grad(y64, (x64, a64, b64), dy64)
    return y64.detach(), dx64, da64, db64


# (rank, dropout, scale, blocksize, double_quant, fp32 LoRA weights)
CASES = {
    "r1-nodrop-single32": (1, 0.0, 2.0, 32, False, False),
    "r8-drop-double64-fp32lora": (8, 0.25, 0.5, 64, True, True),
    "r16-drop-single64-fp32lora": (16, 0.1, -1.5, 64, False, True),
    "r5-drop-double32": (5, 0.3, 1.0, 32, True, False),
    "r16-nodrop-double32-fp32lora": (16, 0.0, 0.125, 32, True, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("m,k,n", [(37, 99, 70), (37, 99, 91), (37, 128, 45)],
                         ids=["37x99x70", "37x99x91", "37x128x45-aligned"])
def test_launchers_match_reference(dtype, case, m, k, n):
    rank, dropout, scale, blocksize, double_quant, fp32_lora = CASES[case]
    lora_dtype = torch.float32 if fp32_lora else dtype
    w, w64 = make_nf4_weight(n, k, blocksize, double_quant)
    a, b = make_lora(n, k, rank, lora_dtype)
    x = torch.randn(m, k).to(dtype)
    dy = torch.randn(m, n).to(dtype)
    check_against_reference(x, w, w64, a, b, scale, dropout, dy)


def test_rank_above_one_epilogue_chunk_and_multitile():
    # rank 70 > 64 makes both epilogues loop over rank chunks; 150x261x133
    # needs several output tiles and several steps of the main loops.
    w, w64 = make_nf4_weight(133, 261, 64, True)
    a, b = make_lora(133, 261, 70, torch.float32)
    x = torch.randn(150, 261).to(torch.float16)
    dy = torch.randn(150, 133).to(torch.float16)
    check_against_reference(x, w, w64, a, b, 0.75, 0.2, dy)


def check_against_reference(x, w, w64, a, b, scale, dropout, dy, path=None):
    y, ctx = lora_linear_forward(x, w, a, b, scale, dropout, True, None, path=path)
    assert isinstance(ctx, LoRAContext) and ctx.dropout == dropout
    if dropout == 0.0:
        assert ctx.keep_mask is None
    else:  # the mask the op used, so the reference can apply the same one
        assert ctx.keep_mask.dtype == torch.bool and ctx.keep_mask.shape == x.shape
    dx, da, db = lora_linear_backward(dy, x, w, a, b, scale, ctx, path=path)
    assert (y.dtype, dx.dtype, da.dtype, db.dtype) == (x.dtype, x.dtype, a.dtype, b.dtype)

    x64, dy64 = quantized(x, x.dtype), quantized(dy, dy.dtype)
    a64, b64 = quantized(a, a.dtype), quantized(b, b.dtype)
    y64, dx64, da64, db64 = reference_with_grads(x64, w64, a64, b64, scale, ctx.keep_mask,
                                                 dropout, dy64)
    # The LoRA terms are computed in fp32 (error ~1e-6), so the NF4 matmul's
    # tolerance carries over to y and dx.
    atol, rtol = matmul_tolerance(x.dtype, x64, w64.t())
    assert_close(OP, "forward", y, y64, atol=atol, rtol=rtol)
    atol, rtol = matmul_tolerance(x.dtype, dy64, w64)
    assert_close(OP, "dx", dx, dx64, atol=atol, rtol=rtol)
    atol, rtol = small_matmul_tolerance(a.dtype)
    assert_close(OP, "dA", da, da64, atol=atol, rtol=rtol)
    atol, rtol = small_matmul_tolerance(b.dtype)
    assert_close(OP, "dB", db, db64, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["nodrop", "drop"])
def test_autograd_function_matches_torch_autograd(dtype, dropout):
    # 3-D x; fp32 LoRA masters next to fp16 activations (the mixed QLoRA setup).
    w, w64 = make_nf4_weight(45, 77, 64, True)
    a, b = make_lora(45, 77, 8, torch.float32)
    x = torch.randn(2, 19, 77).to(dtype)
    dy = torch.randn(2, 19, 45).to(dtype)
    seed = int(torch.randint(0, 2**31, ()))
    # The same generator seed replays the mask; the low-level call exposes it.
    _, ctx = lora_linear_forward(x.reshape(-1, 77), w, a, b, 1.5, dropout, True,
                                 torch.Generator().manual_seed(seed))
    keep_mask = None if ctx.keep_mask is None else ctx.keep_mask.reshape(x.shape)

    xg, ag, bg = (t.clone().requires_grad_() for t in (x, a, b))
    y = lora_linear_op(xg, w, ag, bg, 1.5, dropout, True, torch.Generator().manual_seed(seed))
    dx, da, db = torch.autograd.grad(y, (xg, ag, bg), dy)

    x64, dy64 = quantized(x, dtype), quantized(dy, dtype)
    y64, dx64, da64, db64 = reference_with_grads(x64, w64, a.double(), b.double(), 1.5,
                                                 keep_mask, dropout, dy64)
    atol, rtol = matmul_tolerance(dtype, x64.reshape(-1, 77), w64.t())
    assert_close(OP, "autograd.forward", y, y64, atol=atol, rtol=rtol)
    atol, rtol = matmul_tolerance(dtype, dy64.reshape(-1, 45), w64)
    assert_close(OP, "autograd.dx", dx, dx64, atol=atol, rtol=rtol)
    # fp32 LoRA weights: fp32 gradients
    assert_close(OP, "autograd.dA", da, da64, atol=FP32_ATOL, rtol=FP32_RTOL)
    assert_close(OP, "autograd.dB", db, db64, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_frozen_input_gets_no_gradient():
    # x without requires_grad (e.g. a frozen embedding output): only dA, dB flow.
    w, w64 = make_nf4_weight(40, 63, 32, False)
    a, b = make_lora(40, 63, 4, torch.float32)
    x, dy = torch.randn(3, 7, 63), torch.randn(3, 7, 40)
    ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
    y = lora_linear_op(x, w, ag, bg, 0.5)
    da, db = torch.autograd.grad(y, (ag, bg), dy)
    _, _, da64, db64 = reference_with_grads(x.double(), w64, a.double(), b.double(), 0.5,
                                            None, 0.0, dy.double())
    assert_close(OP, "frozen_x.dA", da, da64, atol=FP32_ATOL, rtol=FP32_RTOL)
    assert_close(OP, "frozen_x.dB", db, db64, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_no_dropout_outside_training():
    w, w64 = make_nf4_weight(40, 63, 32, False)
    a, b = make_lora(40, 63, 4, torch.float32)
    x = torch.randn(21, 63)
    y, ctx = lora_linear_forward(x, w, a, b, 2.0, 0.5, False, None)
    assert ctx.keep_mask is None and ctx.dropout == 0.0
    expected = reference_lora_linear(x.double(), w64, a.double(), b.double(), 2.0)
    assert_close(OP, "eval_forward", y, expected, atol=FP32_ATOL, rtol=FP32_RTOL)
    y_autograd = lora_linear_op(x, w, a, b, 2.0, dropout=0.5, training=False)
    assert_close(OP, "eval_autograd_forward", y_autograd, expected, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_dropout_mask_statistics_and_determinism():
    w, _ = make_nf4_weight(40, 99, 32, False)
    a, b = make_lora(40, 99, 4, torch.float32)
    x = torch.randn(200, 99)
    p = 0.25
    _, ctx1 = lora_linear_forward(x, w, a, b, 1.0, p, True, torch.Generator().manual_seed(7))
    _, ctx2 = lora_linear_forward(x, w, a, b, 1.0, p, True, torch.Generator().manual_seed(7))
    _, ctx3 = lora_linear_forward(x, w, a, b, 1.0, p, True, torch.Generator().manual_seed(8))
    assert torch.equal(ctx1.keep_mask, ctx2.keep_mask)       # same seed, same mask
    assert not torch.equal(ctx1.keep_mask, ctx3.keep_mask)   # different seed, different mask
    kept = ctx1.keep_mask.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / x.numel())
    assert abs(kept - (1 - p)) < 6 * sigma, kept  # binomial keep fraction, 6 sigma


def test_zero_scale_is_the_plain_nf4_matmul():
    w, _ = make_nf4_weight(40, 63, 64, True)
    a, b = make_lora(40, 63, 3, torch.float32)
    x = torch.randn(9, 63)
    y, ctx = lora_linear_forward(x, w, a, b, 0.0, 0.0, True, None)
    dx, da, db = lora_linear_backward(torch.randn(9, 40), x, w, a, b, 0.0, ctx)
    # The epilogue adds exactly 0 * (finite low-rank term): bitwise equal.
    assert torch.equal(y, nf4_matmul_forward(x, w))
    assert not da.any() and not db.any()


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

def test_rejects_bad_arguments():
    w, _ = make_nf4_weight(10, 33, 32, False)
    a, b = make_lora(10, 33, 4, torch.float32)
    x = torch.randn(5, 33)

    def forward(**changes):
        args = dict(x2d=x, w=w, A=a, B=b, scale=1.0, dropout=0.1, training=True, generator=None)
        args.update(changes)
        return lora_linear_forward(**args)

    cases = [
        ("x2d.*shape", dict(x2d=torch.randn(5, 34))),               # K mismatch with W
        ("'A'.*shape", dict(A=torch.randn(4, 32))),                 # A's K mismatch
        (r"'B'.*shape.*\(10, 4\)", dict(B=torch.randn(10, 5))),    # B's rank != A's rank
        (r"'B'.*shape.*\(10, 4\)", dict(B=torch.randn(11, 4))),    # B's N != W's N
        ("'A'.*at least 1", dict(A=torch.randn(0, 33), B=torch.randn(10, 0))),
        ("'A'.*dtype", dict(A=a.to(torch.int32))),
        ("'B'.*dtype", dict(B=b.double())),
        ("x2d.*dtype", dict(x2d=x.double())),
        ("x2d.*contiguous", dict(x2d=torch.randn(33, 5).t())),
        ("'A'.*contiguous", dict(A=torch.randn(33, 4).t())),
        ("'A'.*on meta", dict(A=a.to("meta"))),
        ("dropout", dict(dropout=1.0)),
        ("dropout", dict(dropout=-0.1)),
        ("scale", dict(scale=float("nan"))),
        ("scale", dict(scale=torch.tensor(1.0))),
    ]
    for message, changes in cases:
        with pytest.raises(ValueError, match=message):
            forward(**changes)
    with pytest.raises(ValueError, match="x.*last dim 33"):
        lora_linear_op(torch.randn(2, 5, 34), w, a, b, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        lora_linear_op(torch.randn(2, 33, 5).transpose(1, 2), w, a, b, 1.0)
    if torch.cuda.is_available():  # a second real device exists only on a GPU machine
        with pytest.raises(ValueError, match="device|on cpu"):
            forward(A=a.to("cuda"))
        with pytest.raises(ValueError, match="generator"):
            forward(generator=torch.Generator(device="cuda"))

    _, ctx = forward()
    dy = torch.randn(5, 10)
    with pytest.raises(ValueError, match="dy2d.*shape"):
        lora_linear_backward(torch.randn(5, 11), x, w, a, b, 1.0, ctx)
    with pytest.raises(ValueError, match="dy2d.*dtype"):
        lora_linear_backward(dy.half(), x, w, a, b, 1.0, ctx)
    with pytest.raises(ValueError, match="keep_mask.*shape"):
        lora_linear_backward(dy, x, w, a, b, 1.0, ctx._replace(keep_mask=ctx.keep_mask[:4]))
    with pytest.raises(ValueError, match="xa.*shape"):
        lora_linear_backward(dy, x, w, a, b, 1.0, ctx._replace(xa=ctx.xa[:, :2]))


# ---------------------------------------------------------------------------
# GPU: bf16 at LLaMA-3-8B shapes
# ---------------------------------------------------------------------------

def low_precision_lora_tolerances(x64, dy64, a64, b64, scale, keep, m, n, k, dtype=torch.bfloat16):
    """(extra atol of y, extra atol of dx, atol of dA, atol of dB) for a LoRA projection
    whose rank-r products run in ``dtype`` with fp32 accumulation (a GPU, or PEFT under
    bf16), on top of the NF4 matmul's own matmul_tolerance. ``keep``: the dropout's
    scaled keep mask as float64 (1.0 without dropout).

    y, dx: the roundings of xd, A, xa and B add at most 4 u of s |xd| |A|^T |B|^T to y
    (likewise for dX with g = dY B). dA = s (dY B)^T xd and dB = s dY^T (xd A^T) are
    products of three matrices: the rounding of each factor's input (B or A, xd, and
    the rank-r product g or xa) and of the output adds at most 4 u relative to the
    absolute products, the fp32 sums gamma_(m+inner) <= 2 (m + inner) u_fp32."""
    u, u32 = unit_roundoff(dtype), unit_roundoff(torch.float32)
    xd64 = x64 * keep
    a_abs, b_abs = a64.abs(), b64.abs()
    lora_y = 4 * u * abs(scale) * (xd64.abs() @ a_abs.t() @ b_abs.t()).max().item()
    keep_max = float(keep.max()) if isinstance(keep, torch.Tensor) else float(keep)
    lora_dx = 4 * u * abs(scale) * keep_max * ((dy64.abs() @ b_abs) @ a_abs).max().item()
    bound_a = abs(scale) * ((dy64.abs() @ b_abs).t() @ xd64.abs()).max().item()
    bound_b = abs(scale) * (dy64.abs().t() @ (xd64.abs() @ a_abs.t())).max().item()
    return (lora_y, lora_dx, (4 * u + 2 * (m + n) * u32) * bound_a,
            (4 * u + 2 * (m + k) * u32) * bound_b)


def nf4_weight_and_value(n, k, device):
    """(NF4Weight, float64 value): random bytes and scales on a GPU (no 8B-sized quantize),
    a quantized Gaussian on the CPU."""
    if torch.device(device).type == "cuda":
        w = random_nf4_weight(n, k, 64, device)
        return w, reference_nf4_dequantize(w.to("cpu")).to(device)
    return make_nf4_weight(n, k, 64, True, device)


def check_lora_low_precision(n, k, m, rank, scale, dropout, *, device="cuda",
                             dtype=torch.bfloat16, path=None, label="bf16_llama3"):
    """lora_linear forward and backward in ``dtype`` against float64 (tolerances:
    matmul_tolerance + low_precision_lora_tolerances); ``path`` None: the dispatch by M.
    The GPU tests run it in bf16; test_low_precision_checks_run_on_the_cpu runs the same
    code at small shapes in fp16 through the interpreter."""
    w, w64 = nf4_weight_and_value(n, k, device)
    a = (torch.randn(rank, k, device=device) / math.sqrt(k))
    b = torch.randn(n, rank, device=device) * 0.1
    x = torch.randn(m, k, device=device).to(dtype)
    dy = (torch.randn(m, n, device=device) / math.sqrt(n)).to(dtype)
    y, ctx = lora_linear_forward(x, w, a, b, scale, dropout, True, None, path=path)
    dx, da, db = lora_linear_backward(dy, x, w, a, b, scale, ctx, path=path)

    x64, dy64 = quantized(x, dtype), quantized(dy, dtype)
    y64, dx64, da64, db64 = reference_with_grads(x64, w64, a.double(), b.double(), scale,
                                                 ctx.keep_mask, dropout, dy64)
    keep = 1.0 if ctx.keep_mask is None else ctx.keep_mask.double() / (1 - dropout)
    lora_y, lora_dx, atol_da, atol_db = low_precision_lora_tolerances(
        x64, dy64, a.double(), b.double(), scale, keep, m, n, k, dtype)
    atol, rtol = matmul_tolerance(dtype, x64, w64.t())
    assert_close(OP, f"{label}_forward", y, y64, atol=atol + lora_y, rtol=rtol)
    atol, rtol = matmul_tolerance(dtype, dy64, w64)
    assert_close(OP, f"{label}_dx", dx, dx64, atol=atol + lora_dx, rtol=rtol)
    assert_close(OP, f"{label}_dA", da, da64, atol=atol_da, rtol=0.0)
    assert_close(OP, f"{label}_dB", db, db64, atol=atol_db, rtol=0.0)


def test_low_precision_checks_run_on_the_cpu():
    """The GPU tests' check, at small shapes in fp16 on the interpreter (a wrong
    reference or bound in it would show here, not first on a lent GPU)."""
    check_lora_low_precision(48, 64, 5, 4, 0.5, 0.1, device="cpu", dtype=torch.float16,
                             path="fused", label="fp16_cpu_rehearsal")


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336), (1024, 4096)],
                         ids=["gate_proj", "down_proj", "k_proj"])
def test_bf16_llama3_8b_shapes(n, k):
    check_lora_low_precision(n, k, 2048, 16, 2.0, 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 100, 192])
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336)], ids=["gate_proj", "down_proj"])
def test_bf16_fused_path_with_dropout_at_small_m(n, k, m):
    """M <= 192 (generation, evaluation, small DPO batches): the dispatch takes the fused
    kernel, with the LoRA epilogue and dropout, at LLaMA-3-8B shapes in bf16."""
    from csrc_triton.nf4_dense import choose_path
    assert choose_path("lora_linear", m, dtype=torch.bfloat16) == "fused"
    check_lora_low_precision(n, k, m, 32, 0.5, 0.1, label="bf16_fused_small_m")
