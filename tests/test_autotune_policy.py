"""ANITA_AUTOTUNE: 'pruned' launches one config per launch shape, chosen by the rows it
covers, without triton's Autotuner (so no timing run on any triton: 3.6's Autotuner
times even a one-config list); 'full' is triton.autotune as written. Every autotuned
kernel of csrc_triton, the lazily built attention ones included, is built through
autotune_policy.autotune and so follows the policy."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import csrc_triton  # noqa: F401  (decides the interpreter before triton kernels are built)
from csrc_triton import attention, attention_configs, autotune_policy

PACKAGE = Path(csrc_triton.__file__).parent


@triton.jit
def _copy_kernel(x_ptr, y_ptr, M, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(y_ptr + rows, tl.load(x_ptr + rows, mask=rows < M) + BLOCK_N, mask=rows < M)


# nf4_matmul's config list (csrc_triton.nf4_matmul.GPU_CONFIGS), as BLOCK_M / BLOCK_N / warps
CONFIGS = [(128, 128, 8), (64, 64, 4), (64, 128, 4), (64, 64, 4), (16, 64, 4), (16, 128, 4)]


def configs():
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w) for m, n, w in CONFIGS]


def chosen(launcher, **launch):
    c = launcher.choose(launch)
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps


def test_pruned_keeps_one_config_by_the_rows_it_covers():
    launcher = autotune_policy.autotune(_copy_kernel, configs(), key=["M"], policy="pruned")
    assert isinstance(launcher, autotune_policy.PrunedLauncher)
    assert chosen(launcher, M=1) == (16, 64, 4)           # the first 16-row tile
    assert chosen(launcher, M=16) == (16, 64, 4)
    assert chosen(launcher, M=17) == (64, 64, 4)          # the first 64-row tile
    assert chosen(launcher, M=192) == (128, 128, 8)       # above every BLOCK_M: the largest
    assert chosen(launcher, N=8) == (128, 128, 8)         # no M in the launch: the first


def test_pruned_launches_the_chosen_config_directly():
    # a real launch (the interpreter here): the grid sees the config's meta-parameters
    # and the kernel gets the chosen BLOCK_N, which it adds to every element
    launcher = autotune_policy.autotune(_copy_kernel, configs(), key=["M"], policy="pruned")
    x = torch.arange(40, dtype=torch.float32)
    y = torch.full_like(x, float("nan"))
    grids = []

    def grid(meta):
        grids.append(meta["BLOCK_M"])
        return (triton.cdiv(meta["M"], meta["BLOCK_M"]),)

    launcher[grid](x_ptr=x, y_ptr=y, M=40)
    assert grids == [64]                                  # M = 40: the first 64-row config
    assert torch.equal(y, x + 64)


def test_full_is_triton_autotune_over_every_config():
    tuner = autotune_policy.autotune(_copy_kernel, configs(), key=["M"], policy="full")
    assert type(tuner).__name__ == "Autotuner"
    assert len(tuner.configs) == len(CONFIGS)


def test_lazily_built_attention_kernels_follow_the_policy(monkeypatch):
    # the attention tuners are built on first use, after csrc_triton's import: they
    # read the policy then, not at import
    monkeypatch.setattr(attention, "_tuned", {})
    monkeypatch.setenv(autotune_policy.ENV, "pruned")
    for kind in attention_configs.KINDS:
        launcher = attention.tuned_kernel(kind, 128)
        assert isinstance(launcher, autotune_policy.PrunedLauncher), kind
        assert len(launcher.configs) == len(attention_configs.gpu_configs(kind, 128))
    monkeypatch.setattr(attention, "_tuned", {})
    monkeypatch.setenv(autotune_policy.ENV, "full")
    assert type(attention.tuned_kernel("forward", 128)).__name__ == "Autotuner"


def test_every_autotuned_kernel_is_built_through_the_policy():
    # triton.autotune anywhere else in the package would escape ANITA_AUTOTUNE
    escaping = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "autotune_policy.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "autotune":
                escaping.append(f"{path.name}:{node.lineno}")
    assert not escaping, f"triton.autotune outside autotune_policy: {escaping}"


def test_a_bad_policy_names_the_variable(monkeypatch):
    monkeypatch.setenv(autotune_policy.ENV, "fastest")
    with pytest.raises(ValueError, match="ANITA_AUTOTUNE='fastest'"):
        autotune_policy.policy_from_env()
    monkeypatch.setenv(autotune_policy.ENV, "Pruned")
    assert autotune_policy.policy_from_env() == "pruned"
