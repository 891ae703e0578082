"""Every csrc_triton kernel compiles for Hopper (sm_90) the way its launcher would launch it
at LLaMA-3-8B shapes, in bf16, fp16 and fp32, without a GPU (tests/sm90_compile.py).

Checked on the compiled code: every spec compiles; no spec needs more shared memory
than sm_90 gives a block; the chosen configs of the hot kernels keep everything in
registers (no stack, no STL/LDL); every fp16/bf16 tl.dot kernel with BLOCK_M >= 64
issues HGMMA (wgmma); the NF4 decode's fp32 multiply-adds are not contracted into
FMAs (bit identity with bitsandbytes, which rounds the product and the sum).
The table printed at the end (pytest -s) carries the fused NF4 kernel's non-MMA
instructions per HGMMA in its main loop.

Every check runs under each supported triton (tests/stacks.py): the pinned 3.9 and
the lent GPU machine's 3.6, whose compiler decides spills differently.

The compile runs in a subprocess: it needs TRITON_INTERPRET=0 before triton is
imported, and this process runs the interpreter. The full autotune sweep is behind
the `sweep` marker (deselected by default in pytest.ini: `pytest -m sweep` runs it).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sm90_compile import SHARED_MEMORY_LIMIT
from tests.stacks import ROOT, STACKS, Stack, require, stack_env


def compile_reports(tmp_path: Path, stack: Stack, *extra: str, timeout: int) -> list:
    require(stack)
    out = tmp_path / "sm90.json"
    done = subprocess.run([sys.executable, "-m", "tests.sm90_compile", "--json", str(out), *extra],
                          cwd=ROOT, env=stack_env(stack, TRITON_INTERPRET="0"),
                          capture_output=True, text=True, timeout=timeout)
    print(done.stdout[-20000:])
    assert out.exists(), f"sm90_compile wrote no report (exit {done.returncode}):\n{done.stderr[-4000:]}"
    rows = json.loads(out.read_text())
    assert rows and all(r["triton"] == rows[0]["triton"] for r in rows)
    return rows


@pytest.fixture(scope="module", params=STACKS, ids=lambda s: s.name)
def reports(request, tmp_path_factory):
    return compile_reports(tmp_path_factory.mktemp("sm90"), request.param, timeout=900)


def test_each_stack_compiles_with_its_own_triton(reports, request):
    # the oldest stack's overlay must really replace the compiler, or it checks nothing
    stack = request.node.callspec.params["reports"]
    version = reports[0]["triton"]
    if stack.overlay is None:
        import triton
        assert version == triton.__version__
    else:
        assert f"triton=={version}" in stack.packages, (version, stack.packages)


def _names(rows) -> str:
    return ", ".join(f"{r['name']} ({r.get('error') or ''})".replace(" ()", "") for r in rows)


def test_every_kernel_compiles_for_sm90(reports):
    # the table is built from the op records: every record naming compile specs is in it
    from csrc_triton.records import all_records
    families = {r["spec"]["family"] for r in reports}
    assert families == {r.name for r in all_records() if r.compile_specs}, families
    kernels = {r["name"].split("/")[0] for r in reports}
    # every kernel family of csrc_triton is in the table
    assert {"nf4_quantize", "nested_quantize", "nf4_dequantize", "nf4_matmul_fwd",
            "nf4_matmul_bwd", "rms_norm_fwd", "rms_norm_bwd", "rope", "swiglu_fwd",
            "swiglu_bwd", "cross_entropy_lse", "cross_entropy_grad", "attention_forward",
            "attention_delta", "attention_dkdv", "attention_dq"} <= kernels, kernels
    failed = [r for r in reports if not r["ok"]]
    assert not failed, f"failed to compile for sm_90: {_names(failed)}"


def test_shared_memory_within_the_sm90_limit(reports):
    over = [r for r in reports if r["shared"] > SHARED_MEMORY_LIMIT and not r["spec"]["pruned"]]
    assert not over, f"over {SHARED_MEMORY_LIMIT} B of shared memory: " + ", ".join(
        f"{r['name']} ({r['shared']} B)" for r in over)


def test_hot_configs_do_not_spill(reports):
    spilling = [r for r in reports if r["spec"]["hot"] and (r["stack"] or r["spill_instructions"])]
    assert not spilling, "spills (stack bytes / STL+LDL): " + ", ".join(
        f"{r['name']} ({r['stack']} B / {r['spill_instructions']})" for r in spilling)


def test_low_precision_dots_use_wgmma(reports):
    expected = [r for r in reports if r["spec"]["expect_hgmma"]]
    assert expected, "no spec expects HGMMA: the table lost its matmul kernels"
    missing = [r for r in expected if not r["hgmma"]]
    assert not missing, f"no HGMMA (mma.sync or FFMA instead): {_names(missing)}"
    no_loop = [r for r in expected if not r["loop_mma"]]
    assert not no_loop, f"no main loop with MMAs found in the SASS: {_names(no_loop)}"
    for r in expected:
        print(f"{r['name']}: {r['non_mma_per_mma']:.1f} non-MMA instructions per HGMMA in the "
              f"main loop ({r['loop_instructions']} instructions, {r['loop_mma']} HGMMA)")


def test_the_64_bit_index_variants_compile_without_spills(reports):
    # every kernel that indexes activations has an INDEX_64 variant (what a launch past
    # 2^31 - 1 elements runs); hot, so test_hot_configs_do_not_spill holds it too
    wide = {r["name"].split("/")[0] for r in reports if r["name"].endswith("-idx64")}
    assert {"rms_norm_fwd", "rms_norm_bwd", "rope", "swiglu_fwd", "swiglu_bwd",
            "attention_forward", "attention_dkdv", "attention_dq"} <= wide, wide
    assert all(r["ok"] and r["spec"]["hot"] for r in reports if r["name"].endswith("-idx64"))


def test_nf4_decode_is_not_contracted_into_fma(reports):
    decode = [r for r in reports if r["name"].startswith(("nf4_dequantize/", "nf4_quantize/",
                                                           "nested_quantize/", "nf4_matmul"))]
    assert decode and all(r["spec"]["fp_fusion"] is False for r in decode)
    fused = [r for r in decode if r["ptx_fma_f32"]]
    assert not fused, f"fma.rn.f32 in the PTX: {_names(fused)}"
    # The check can fail: the same kernel compiled with contraction on has FMAs.
    control = [r for r in reports if r["name"].startswith("fma_control/")]
    assert control and all(r["ptx_fma_f32"] > 0 for r in control), _names(control)


def test_nf4_dequantize_moves_16_bytes_per_access(reports):
    # memory-bound by design: the packed bytes come in and the weights go out as
    # 16-byte vectors (LDG.E.128 / STG.E.128), not one element per instruction
    decode = [r for r in reports if r["name"].startswith("nf4_dequantize/")]
    assert decode
    narrow = [r for r in decode if not (r["wide_loads"] and r["wide_stores"])]
    assert not narrow, "no 16-byte loads or stores: " + ", ".join(
        f"{r['name']} ({r['wide_loads']} LDG.128, {r['wide_stores']} STG.128)" for r in narrow)


@pytest.mark.sweep
@pytest.mark.parametrize("stack", STACKS, ids=lambda s: s.name)
def test_full_config_sweep(tmp_path, stack):
    rows = compile_reports(tmp_path, stack, "--sweep", timeout=3000)
    kept = [r for r in rows if not r["spec"]["pruned"]]     # pruned: checked apart, below
    failed = [r for r in kept if not r["ok"]]
    assert not failed, f"failed to compile for sm_90: {_names(failed)}"
    over = [r for r in kept if r["shared"] > SHARED_MEMORY_LIMIT]
    assert not over, f"over the shared-memory limit: {_names(over)}"
    missing = [r for r in rows if r["spec"]["expect_hgmma"] and not r["hgmma"]]
    assert not missing, f"no HGMMA: {_names(missing)}"
    spilling = [r for r in rows if r["spec"]["hot"] and (r["stack"] or r["spill_instructions"])]
    assert not spilling, f"hot configs that spill: {_names(spilling)}"
    check_attention_pruning(rows)


def check_attention_pruning(rows) -> None:
    """The compiling triton's table in csrc_triton.attention_configs.PRUNED_BY_TRITON is
    exactly its compiler's verdict on the candidates: every pruned one fails (compile,
    shared memory or spills, at 32-bit or 64-bit indexing or with a gap), every other
    passes, and each kernel and head dim keeps at least one configuration."""
    from csrc_triton import attention_configs as configs
    from tests.sm90_attention import spec_name, verdict
    version = rows[0]["triton"]
    series = configs.triton_series(version)
    assert series in configs.PRUNED_BY_TRITON, f"no pruning table for triton {version}"
    table = configs.PRUNED_BY_TRITON[series]
    by_name = {r["name"]: r for r in rows}
    disagree = []
    for (kind, head_dim), candidates in configs.CANDIDATES.items():
        kept = []
        for c in candidates:
            name = spec_name(kind, head_dim, c)
            why = (verdict(by_name[name]) or verdict(by_name[name + "-idx64"])
                   or verdict(by_name[name + "-gap"]))
            listed = table.get((kind, head_dim, c))
            if (why is None) != (listed is None):
                disagree.append(f"{name}: compiler {why or 'passes'}, "
                                f"PRUNED_BY_TRITON[{series!r}] {listed or 'absent'}")
            if listed is None:
                kept.append(c)
        assert kept, (kind, head_dim, series)
    assert not disagree, (f"attention_configs.PRUNED_BY_TRITON[{series!r}] disagrees with "
                          "sm_90:\n" + "\n".join(disagree))
