"""Every csrc_triton kernel compiles for Hopper (sm_90) the way its launcher would launch it
at LLaMA-3-8B shapes, in bf16, fp16 and fp32, without a GPU (tests/sm90_compile.py).

Checked on the compiled code: every spec compiles; no spec needs more shared memory
than sm_90 gives a block; the chosen configs of the hot kernels keep everything in
registers (no stack, no STL/LDL); every fp16/bf16 tl.dot kernel with BLOCK_M >= 64
issues HGMMA (wgmma); the NF4 decode's fp32 multiply-adds are not contracted into
FMAs (bit identity with bitsandbytes, which rounds the product and the sum).
The table printed at the end (pytest -s) carries the fused NF4 kernel's non-MMA
instructions per HGMMA in its main loop.

The compile runs in a subprocess: it needs TRITON_INTERPRET=0 before triton is
imported, and this process runs the interpreter. The full autotune sweep is behind
the `sweep` marker (deselected by default in pytest.ini: `pytest -m sweep` runs it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sm90_compile import SHARED_MEMORY_LIMIT

ROOT = Path(__file__).resolve().parent.parent


def compile_reports(tmp_path: Path, *extra: str, timeout: int) -> list:
    out = tmp_path / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "ANITA_TRITON_MODE"}
    env.update(TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    done = subprocess.run([sys.executable, "-m", "tests.sm90_compile", "--json", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    print(done.stdout[-20000:])
    assert out.exists(), f"sm90_compile wrote no report (exit {done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return compile_reports(tmp_path_factory.mktemp("sm90"), timeout=900)


def _names(rows) -> str:
    return ", ".join(f"{r['name']} ({r.get('error') or ''})".replace(" ()", "") for r in rows)


def test_every_kernel_compiles_for_sm90(reports):
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
def test_full_config_sweep(tmp_path):
    rows = compile_reports(tmp_path, "--sweep", timeout=3000)
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
    """csrc_triton.attention_configs.PRUNED is exactly the compiler's verdict on the
    candidates: every pruned one fails (compile, shared memory or spills), every other
    passes, and each kernel and head dim keeps at least one configuration."""
    from csrc_triton import attention_configs as configs
    from tests.sm90_attention import spec_name, verdict
    by_name = {r["name"]: r for r in rows}
    disagree = []
    for (kind, head_dim), candidates in configs.CANDIDATES.items():
        for c in candidates:
            why = verdict(by_name[spec_name(kind, head_dim, c)])
            listed = configs.PRUNED.get((kind, head_dim, c))
            if (why is None) != (listed is None):
                disagree.append(f"{spec_name(kind, head_dim, c)}: compiler {why or 'passes'}, "
                                f"PRUNED {listed or 'absent'}")
        assert configs.gpu_configs(kind, head_dim), (kind, head_dim)
    assert not disagree, "attention_configs.PRUNED disagrees with sm_90:\n" + "\n".join(disagree)
