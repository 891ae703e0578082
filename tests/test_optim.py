"""build_optimizer's AdamW (foreach on a CPU, fused on CUDA) makes the updates the
one-tensor-at-a-time loop (what anita used before, foreach=False) makes, to fp32
rounding: both are compared, element by element, with torch's AdamW run in float64.

Tolerance (per element, after T steps). With u = 2^-24 and fp32 everywhere:
  m_t, v_t   each a sum of positive-weighted terms of one sign (the gradients below
             keep each element's sign), so each stays within 3 u t of its exact value
             relatively (two products and a sum per step, errors adding over steps);
  r_t        = (m_t / bc1) / (sqrt(v_t / bc2) + eps): relative error <= 3ut + 1.5ut
             from m and v, plus ~4 roundings of its own: <= 9 u t;
  p_t        = p_{t-1} (1 - lr wd) - lr r_t: two roundings of size |p_{t-1}|, and
             lr_t |r_t| 9 u t from r; p's earlier errors carry over with factor <= 1.
  So |p_T - p_T(exact)| <= sum_t (3 u |p_{t-1}| + 9 u t lr_t |r_t|), taken from the
float64 run, with a factor 2 for second-order terms and the rounding of Python-float
scalars (lr, bias corrections) to fp32 inside the ops.
"""
from __future__ import annotations

import pytest
import torch

from anita_core.train.optim import build_optimizer

U = 2.0 ** -24
SHAPES = [(8, 64), (64, 8), (16, 176), (176, 16), (3,)]
STEPS = 12
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.999), 1e-8, 0.01
LRS = [5e-3 * min(1.0, (t + 1) / 3) * (1 - t / STEPS) for t in range(STEPS)]   # warmup, decay


def _problem(seed: int):
    """fp32 starting parameters, and per step fp32 gradients whose every element keeps
    one sign over the steps, with magnitudes from 1e-3 to 1 varying step to step."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) * 0.1 for s in SHAPES]
    signs = [torch.randint(0, 2, s, generator=g) * 2.0 - 1.0 for s in SHAPES]
    scales = [10.0 ** (-3 * torch.rand(s, generator=g)) for s in SHAPES]
    grads = [[sign * scale * (0.5 + torch.rand(s, generator=g)) for sign, scale, s in
              zip(signs, scales, SHAPES)] for _ in range(STEPS)]
    return params, grads


def _run(optimizer_for, params, grads, dtype=torch.float32, device="cpu"):
    """The parameters after every step (float64 copies on the CPU), and the optimizer."""
    ps = [torch.nn.Parameter(p.to(device, dtype, copy=True)) for p in params]
    opt = optimizer_for(ps)
    trajectory = []
    for t, step_grads in enumerate(grads):
        for p, g in zip(ps, step_grads):
            p.grad = g.to(device, dtype)
        for group in opt.param_groups:
            group["lr"] = LRS[t]
        opt.step()
        trajectory.append([p.detach().to("cpu", torch.float64) for p in ps])
    return trajectory, opt


def _bounds(params, reference):
    """Per tensor, the module docstring's bound after the last step."""
    bounds = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    previous = [p.to(torch.float64) for p in params]
    for t, (lr, now) in enumerate(zip(LRS, reference), start=1):
        for i, (before, after) in enumerate(zip(previous, now)):
            update = (before * (1 - lr * WEIGHT_DECAY) - after).abs()      # lr |r_t|
            bounds[i] += 3 * U * before.abs() + 9 * U * t * update
        previous = now
    return [2 * b for b in bounds]


def _check(name, trajectory, reference, bounds):
    for i, (ours, ref, bound) in enumerate(zip(trajectory[-1], reference[-1], bounds)):
        diff = (ours - ref).abs()
        assert bool((diff <= bound).all()), (
            f"{name} tensor {i}: max |diff| {float(diff.max()):.3e}, "
            f"worst used {float((diff / bound).max()):.2f} of the bound")


def _reference(params, grads):
    trajectory, _ = _run(lambda ps: torch.optim.AdamW(ps, lr=LRS[0], betas=BETAS, eps=EPS,
                                                      weight_decay=WEIGHT_DECAY, foreach=False),
                         params, grads, dtype=torch.float64)
    return trajectory


def _before(ps):            # what build_optimizer made before issue 19
    return torch.optim.AdamW(ps, lr=LRS[0], betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                             foreach=False)


def _now(ps):
    return build_optimizer("adamw", ps, LRS[0], WEIGHT_DECAY, betas=BETAS, eps=EPS)


def test_foreach_adamw_makes_the_same_updates_to_fp32_rounding():
    params, grads = _problem(0)
    reference = _reference(params, grads)
    bounds = _bounds(params, reference)
    before, _ = _run(_before, params, grads)
    now, opt = _run(_now, params, grads)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    _check("foreach=False (before)", before, reference, bounds)
    _check("build_optimizer (foreach)", now, reference, bounds)
    # not vacuous: every parameter moved by far more than the bound allows, and an
    # update that is a little different (Adam's coupled L2 decay) is caught
    for start, end, bound in zip(params, reference[-1], bounds):
        assert bool(((end - start.double()).abs() > 100 * bound).all())
    coupled, _ = _run(lambda ps: torch.optim.Adam(ps, lr=LRS[0], betas=BETAS, eps=EPS,
                                                  weight_decay=WEIGHT_DECAY), params, grads)
    with pytest.raises(AssertionError, match="of the bound"):
        _check("Adam with L2 decay", coupled, reference, bounds)


@pytest.mark.gpu
def test_fused_adamw_on_cuda_makes_the_same_updates_to_fp32_rounding():
    params, grads = _problem(1)
    reference = _reference(params, grads)
    bounds = _bounds(params, reference)
    now, opt = _run(_now, params, grads, device="cuda")
    assert opt.defaults["fused"] is True
    before, _ = _run(_before, params, grads, device="cuda")
    _check("foreach=False on CUDA (before)", before, reference, bounds)
    _check("build_optimizer on CUDA (fused)", now, reference, bounds)
