"""The two NF4 matmul paths (fused kernel, dequantize + torch.mm), the dispatch
by M between them, and the block backward's dequantize-once reuse."""
from __future__ import annotations

import importlib
from dataclasses import replace

import pytest
import torch

from csrc_triton import nf4_dense, nf4_dequantize
from csrc_triton.lora_linear import lora_linear_backward, lora_linear_forward
from csrc_triton.nf4_matmul import nf4_matmul_backward_input, nf4_matmul_forward
from tests.helpers import assert_close, quantized
from tests.reference.lora_linear import reference_nf4_matmul
from tests.test_lora_linear import check_against_reference, make_lora
from tests.test_nf4_matmul import make_nf4_weight, matmul_tolerance, random_nf4_weight

# a kernel against its float64 reference: also run under the oldest supported triton
# (tests/test_supported_tritons.py)
pytestmark = pytest.mark.kernels

OP = "nf4_matmul"
block_module = importlib.import_module("anita_core.model.projector")
nf4_matmul_module = importlib.import_module("csrc_triton.nf4_matmul")


@pytest.mark.parametrize("path", nf4_dense.PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("weight_kind", [(32, False), (64, True)], ids=["bs32", "bs64-double"])
def test_each_path_matches_reference(path, dtype, weight_kind):
    # 21 x 99 x 91: odd numel, blocks spanning rows; M far from the threshold
    # either way, so only ``path`` decides.
    w, w64 = make_nf4_weight(91, 99, *weight_kind)
    x = torch.randn(21, 99).to(dtype)
    y = nf4_matmul_forward(x, w, path=path)
    x64 = quantized(x, dtype)
    atol, rtol = matmul_tolerance(dtype, x64, w64.t())
    assert_close(OP, f"{path}.forward", y, reference_nf4_matmul(x64, w64), atol=atol, rtol=rtol)
    dy = torch.randn(21, 91).to(dtype)
    dy64 = quantized(dy, dtype)
    atol, rtol = matmul_tolerance(dtype, dy64, w64)
    assert_close(OP, f"{path}.backward_input", nf4_matmul_backward_input(dy, w, path=path),
                 dy64 @ w64, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["nodrop", "drop"])
def test_lora_on_the_dequantize_path(dtype, dropout):
    w, w64 = make_nf4_weight(45, 128, 64, True)
    a, b = make_lora(45, 128, 6, torch.float32)
    x = torch.randn(23, 128).to(dtype)
    dy = torch.randn(23, 45).to(dtype)
    check_against_reference(x, w, w64, a, b, -0.75, dropout, dy, path="dequant")


def test_caller_held_dense_weight_is_used_and_checked():
    w, _ = make_nf4_weight(40, 64, 64, False)
    a, b = make_lora(40, 64, 3, torch.float32)
    x, dy = torch.randn(9, 64), torch.randn(9, 40)
    dense = nf4_dense.dequantize_for_matmul(w, x.dtype)
    assert torch.equal(nf4_matmul_forward(x, w, dense_w=dense),
                       nf4_matmul_forward(x, w, path="dequant"))
    assert torch.equal(nf4_matmul_backward_input(dy, w, dense_w=dense),
                       nf4_matmul_backward_input(dy, w, path="dequant"))
    # the dense weight really is what gets multiplied (not a fresh decode)
    assert torch.equal(nf4_matmul_forward(x, w, dense_w=torch.zeros_like(dense)),
                       torch.zeros(9, 40))
    y, ctx = lora_linear_forward(x, w, a, b, 0.5, dense_w=dense)
    y2, _ = lora_linear_forward(x, w, a, b, 0.5, path="dequant")
    assert torch.equal(y, y2)
    dx, _, _ = lora_linear_backward(dy, x, w, a, b, 0.5, ctx, dense_w=dense)
    dx2, _, _ = lora_linear_backward(dy, x, w, a, b, 0.5, ctx, path="dequant")
    assert torch.equal(dx, dx2)
    for bad in (dense.half(), dense[:, :32].contiguous(), dense.t().contiguous()):
        with pytest.raises(ValueError, match="dense_w"):
            nf4_matmul_forward(x, w, dense_w=bad)
    with pytest.raises(ValueError, match="'path'"):
        nf4_matmul_forward(x, w, path="cublas")


def test_dispatch_by_m_and_its_override(monkeypatch):
    monkeypatch.delenv(nf4_dense.FUSED_MAX_M_VARIABLE, raising=False)
    limit = nf4_dense.fused_max_m_setting()
    assert limit == nf4_dense.FUSED_MAX_M_DEFAULT
    assert nf4_dense.choose_path("t", limit) == "fused"
    assert nf4_dense.choose_path("t", limit + 1) == "dequant"
    assert nf4_dense.choose_path("t", 10**6, "fused") == "fused"
    monkeypatch.setenv(nf4_dense.FUSED_MAX_M_VARIABLE, "0")
    assert nf4_dense.choose_path("t", 1) == "dequant"
    monkeypatch.setenv(nf4_dense.FUSED_MAX_M_VARIABLE, "100000")
    assert nf4_dense.choose_path("t", 4096) == "fused"
    for bad in ("-1", "lots", "1.5"):
        monkeypatch.setenv(nf4_dense.FUSED_MAX_M_VARIABLE, bad)
        with pytest.raises(ValueError, match=nf4_dense.FUSED_MAX_M_VARIABLE):
            nf4_dense.choose_path("t", 4)


def test_cost_model_threshold_moves_the_right_way():
    base = nf4_dense.fused_max_m()
    tile = nf4_dense.FUSED_TILE_M
    assert base >= tile and base % tile == 0       # at least one row of fused tiles
    c = nf4_dense.FUSED_DECODE_INSTRUCTIONS_PER_ELEMENT
    assert nf4_dense.fused_max_m(c / 8) > base      # a cheaper decode keeps the fused path longer
    assert nf4_dense.fused_max_m(c * 8) == tile     # never below one tile row
    assert nf4_dense.fused_max_m(copy_rate=nf4_dense.H100_COPY_BYTES_PER_S / 8) > base


def test_weight_too_large_for_int32_indexing_is_refused():
    w, _ = make_nf4_weight(10, 64, 64, False)
    huge = replace(w, shape=torch.Size([65536, 32768]))   # N*K = 2^31; fields never read
    with pytest.raises(ValueError, match="argument 'w'.*32-bit"):
        nf4_matmul_forward(torch.randn(2, 32768), huge)


JITTER_DRAWS = 4


def test_block_backward_dequantizes_each_projection_once(tmp_path, monkeypatch):
    from anita_core.hf import load_model
    from anita_core.lora import LoRAAdapters, LoRAConfig
    from tests.model_factory import make_tiny_llama_dir

    model = load_model(make_tiny_llama_dir(tmp_path), progress=False, dropout_seed=5)
    model.adapters = LoRAAdapters.init(
        LoRAConfig(r=4, alpha=8, dropout=0.2, seed=1, target_modules=("q_proj", "down_proj")),
        model.config)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    V = model.config.vocab_size
    ids, targets = torch.randint(0, V, (2, 7)), torch.randint(0, V, (2, 7))
    state = model.dropout_generator.get_state()

    def step():
        model.dropout_generator.set_state(state)
        model.adapters.zero_grad()
        loss, _ = model.train_step(ids, targets, grad_scale=1.0)
        return loss, [p.grad.clone() for p in model.adapters.parameters()]

    monkeypatch.setenv(nf4_dense.FUSED_MAX_M_VARIABLE, "100000")   # all fused
    fused_loss, fused_grads = step()

    calls = {"block": 0, "launcher": 0}

    def counting(where, original):
        def wrapped(*args, **kwargs):
            calls[where] += 1
            return original(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(block_module, "dequantize_for_matmul",
                        counting("block", nf4_dense.dequantize_for_matmul))
    monkeypatch.setattr(nf4_matmul_module, "dequantize_for_matmul",
                        counting("launcher", nf4_dense.dequantize_for_matmul))
    monkeypatch.setenv(nf4_dense.FUSED_MAX_M_VARIABLE, "0")        # all dequantize
    loss, grads = step()
    # NF4 matmul weights per layer: gate/up run as one (no adapter there), q/k/v one by
    # one (q's adapter draws its own dropout mask), o and down: 1 + 3 + 2
    projections = 6 * model.config.num_hidden_layers
    # forward pass: one decode per projection inside the launchers; backward:
    # one per projection in the block (recompute and dX share it), none in launchers
    assert calls == {"block": projections, "launcher": projections}
    assert_close("block_dequant_path", "loss", loss.reshape(1), fused_loss.reshape(1),
                 atol=0.0, rtol=1e-5)
    # fp32 both ways; only the accumulation order of every matmul differs. This small random
    # model is ill-conditioned (seen: moving every adapter weight by one ulp changes its
    # gradients by up to ~1.5e-5 of their largest element), so the bound is measured, not
    # assumed: the fused path's own change when every adapter weight moves by one ulp in a
    # random direction (independent signs, as rounding errors are), the largest of
    # JITTER_DRAWS such moves, times 4, per tensor. Measured over seeds 1-30 and the two
    # CI seeds it once failed on: the two paths' difference was at most 2.3x that
    # sensitivity (median 1.6x). (A single move of every weight up by one ulp, the old
    # estimate, varies more from seed to seed: the difference reached 7.6x it, failing
    # about one seed in ten.)
    params = list(model.adapters.parameters())
    saved = [p.detach().clone() for p in params]
    monkeypatch.setenv(nf4_dense.FUSED_MAX_M_VARIABLE, "100000")
    sensitivity = [0.0] * len(params)
    for _ in range(JITTER_DRAWS):
        with torch.no_grad():
            for p in params:
                up = torch.randint(0, 2, p.shape, dtype=torch.bool)
                p.copy_(torch.nextafter(p, torch.where(up, float("inf"), float("-inf"))))
        _, jittered = step()
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
        sensitivity = [max(s, float((moved - ref).abs().max()))
                       for s, moved, ref in zip(sensitivity, jittered, fused_grads)]
    for g, ref, moved_by in zip(grads, fused_grads, sensitivity):
        scale = float(ref.abs().max())
        assert scale > 0 and moved_by > 0
        assert_close("block_dequant_path", "grad", g, ref,
                     atol=max(4 * moved_by, 1e-6 * scale), rtol=0.0)


def _identity_products(w, dtype, path, device="cpu"):
    """(x W^T with x = I_K, dY W with dY = I_N): exactly W^T and W when the path
    multiplies by the weights nf4_dequantize returns (products by 1 and sums of
    exact zeros are exact in fp32 accumulation, and the output rounding is the
    one nf4_dequantize applies)."""
    n, k = w.shape
    eye_k = torch.eye(k, device=device, dtype=dtype)
    eye_n = torch.eye(n, device=device, dtype=dtype)
    return (nf4_matmul_forward(eye_k, w, path=path),
            nf4_matmul_backward_input(eye_n, w, path=path))


@pytest.mark.parametrize("path", nf4_dense.PATHS)
@pytest.mark.parametrize("shape,weight_kind", [((45, 128), (64, True)), ((37, 99), (32, False))],
                         ids=["45x128-aligned-bs64-double", "37x99-bs32-single"])
def test_both_paths_multiply_by_the_dequantized_weight_bit_for_bit(path, shape, weight_kind):
    # nf4_dequantize equals bitsandbytes' dequantize_4bit bit for bit (tests/test_nf4.py),
    # so this makes each path's decoded weight bit-identical to bitsandbytes' too.
    w, _ = make_nf4_weight(*shape, *weight_kind)
    expected = nf4_dequantize(w, torch.float32)
    y, dx = _identity_products(w, torch.float32, path)
    assert torch.equal(y, expected.t()), f"{path}: forward decodes different weights"
    assert torch.equal(dx, expected), f"{path}: backward decodes different weights"


@pytest.mark.gpu
@pytest.mark.parametrize("path", nf4_dense.PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_paths_use_the_dequantized_weight_bit_for_bit(path, dtype):
    # On a GPU an FMA-contracted absmax decode would change bits here (NOTES.md).
    w = random_nf4_weight(1024, 4096, 64, "cuda")
    expected = nf4_dequantize(w, dtype)
    y, dx = _identity_products(w, dtype, path, device="cuda")
    assert torch.equal(y, expected.t()) and torch.equal(dx, expected), path


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop"])
def test_gpu_compute_dtype_on_the_dequantize_path(monkeypatch, dropout):
    # What a GPU runs on the dequantize path (fp16 GEMMs with fp32 accumulation,
    # rank-r products in fp16, no fp32 copy of x), run here by torch on the CPU.
    from csrc_triton import _runtime
    from tests.test_lora_linear import reference_with_grads
    from tests.test_nf4_matmul import unit_roundoff
    monkeypatch.setattr(_runtime, "DOT_IN_FP32", False)
    dtype, m, n, k, scale = torch.float16, 33, 40, 128, 1.5
    w, w64 = make_nf4_weight(n, k, 64, True)
    a, b = make_lora(n, k, 5, torch.float32)
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    y, ctx = lora_linear_forward(x, w, a, b, scale, dropout, True, None, path="dequant")
    assert ctx.xa.dtype == dtype
    dx, da, db = lora_linear_backward(dy, x, w, a, b, scale, ctx, path="dequant")
    assert (y.dtype, dx.dtype, da.dtype, db.dtype) == (dtype, dtype, a.dtype, b.dtype)
    x64, dy64 = quantized(x, dtype), quantized(dy, dtype)
    y64, dx64, da64, db64 = reference_with_grads(x64, w64, a.double(), b.double(), scale,
                                                 ctx.keep_mask, dropout, dy64)
    # tolerances as in test_lora_linear's GPU test: the NF4 matmul's (W rounded to
    # fp16) plus 4 u of the absolute LoRA products; dA/dB: 4 u + fp32 sums.
    u, u32 = unit_roundoff(dtype), unit_roundoff(torch.float32)
    xd_abs = x64.abs() / (1 - dropout)
    a_abs, b_abs = a.double().abs(), b.double().abs()
    atol, rtol = matmul_tolerance(dtype, x64, w64.t())
    lora_y = 4 * u * scale * (xd_abs @ a_abs.t() @ b_abs.t()).max().item()
    assert_close(OP, "fp16_dequant.forward", y, y64, atol=atol + lora_y, rtol=rtol)
    atol, rtol = matmul_tolerance(dtype, dy64, w64)
    lora_dx = 4 * u * scale / (1 - dropout) * (dy64.abs() @ b_abs @ a_abs).max().item()
    assert_close(OP, "fp16_dequant.dx", dx, dx64, atol=atol + lora_dx, rtol=rtol)
    bound_a = scale * ((dy64.abs() @ b_abs).t() @ xd_abs).max().item()
    bound_b = scale * (dy64.abs().t() @ (xd_abs @ a_abs.t())).max().item()
    assert_close(OP, "fp16_dequant.dA", da, da64, atol=(4 * u + 2 * (m + n) * u32) * bound_a,
                 rtol=0.0)
    assert_close(OP, "fp16_dequant.dB", db, db64, atol=(4 * u + 2 * (m + k) * u32) * bound_b,
                 rtol=0.0)


def test_bench_crossover_is_the_last_fused_win_before_the_first_loss():
    from bench.nf4_matmul import crossover_rows
    timings = {1: (1.0, 2.0), 16: (1.0, 3.0), 64: (5.0, 4.0), 256: (1.0, 9.0)}  # (fused, dequant)
    rows = [dict(provider=provider, mode="forward", shape="N=8 K=8", m=m, median_ms=t)
            for m, pair in timings.items()
            for provider, t in zip(("ours_fused", "ours_dequant+matmul"), pair)]
    rows.append(dict(provider="ours_fused", mode="forward", shape="N=8 K=8", m=4096,
                     median_ms=""))   # a failed measurement is left out
    assert crossover_rows(rows) == [{"mode": "forward", "shape": "N=8 K=8",
                                     "fused wins up to": 16, "first M where dequant wins": 64}]
