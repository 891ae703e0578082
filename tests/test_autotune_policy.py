"""ANITA_AUTOTUNE: 'pruned' leaves one config per launch, chosen by the rows it covers,
so a cold cache compiles one config per shape class and times none; 'full' leaves
Triton's autotuner as written. The autotuners are built here around a jit function
(under the interpreter nothing in csrc_triton is autotuned, but Triton builds the
wrapper and its pruning hook the same way)."""
from __future__ import annotations

import sys
import types

import pytest
import triton
import triton.language as tl

import csrc_triton  # noqa: F401  (decides the interpreter before triton kernels are built)
from csrc_triton import autotune_policy


@triton.jit
def _copy_kernel(x_ptr, y_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pass


# nf4_matmul's config list (csrc_triton.nf4_matmul.GPU_CONFIGS), as BLOCK_M / BLOCK_N / warps
CONFIGS = [(128, 128, 8), (64, 64, 4), (64, 128, 4), (64, 64, 4), (16, 64, 4), (16, 128, 4)]


def tuner(key=("M", "N")):
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w) for m, n, w in CONFIGS]
    return triton.autotune(configs=configs, key=list(key))(_copy_kernel)


def chosen(t, **launch):
    t.nargs = {}
    configs = t.prune_configs(launch)
    assert len(configs) == 1, configs
    return configs[0].kwargs["BLOCK_M"], configs[0].kwargs["BLOCK_N"], configs[0].num_warps


def test_pruned_keeps_one_config_by_the_rows_it_covers():
    t = tuner()
    assert autotune_policy.apply("pruned", [t]) == 1
    assert chosen(t, M=1, N=4096) == (16, 64, 4)          # the first 16-row tile
    assert chosen(t, M=16, N=4096) == (16, 64, 4)
    assert chosen(t, M=17, N=4096) == (64, 64, 4)         # the first 64-row tile
    assert chosen(t, M=192, N=4096) == (128, 128, 8)      # above every BLOCK_M: the largest
    assert autotune_policy.apply("pruned", [t]) == 0      # applied once


def test_full_leaves_the_autotuner_as_written():
    t = tuner()
    assert autotune_policy.apply("full", [t]) == 0
    t.nargs = {}
    assert len(t.prune_configs({"M": 1, "N": 8})) == len(CONFIGS)


def test_a_kernel_without_m_in_its_launch_gets_its_first_config():
    t = tuner()
    autotune_policy.apply("pruned", [t])
    assert chosen(t, N=8) == (128, 128, 8)


def test_every_autotuner_of_the_package_is_found(monkeypatch):
    module = types.ModuleType("csrc_triton._policy_probe")
    module.kernel, module.other = tuner(), tuner()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    found = autotune_policy.autotuned_kernels()
    assert module.kernel in found and module.other in found
    assert all(type(k).__name__ == "Autotuner" for k in found)


def test_a_bad_policy_names_the_variable(monkeypatch):
    monkeypatch.setenv(autotune_policy.ENV, "fastest")
    with pytest.raises(ValueError, match="ANITA_AUTOTUNE='fastest'"):
        autotune_policy.policy_from_env()
    monkeypatch.setenv(autotune_policy.ENV, "Pruned")
    assert autotune_policy.policy_from_env() == "pruned"
