"""The supported range is stated once (setup.py) and checked at both ends.

- setup.py's torch and triton bounds are the stacks the tests run: the oldest
  triton is the one tests/stacks.py puts in front (3.6, the lent GPU machine's),
  the newest the pinned one. (The oldest torch, 2.11, is the GPU machine's CUDA
  build, about 4.6 GB with its libraries: bench/device_twin.sh rehearses it, CI
  does not download it.)
- Every kernel test (marker ``kernels``) passes through the oldest triton's
  interpreter too; the sm_90 compile check runs under both (test_hopper_compile).
- triton 3.6's interpreter with numpy >= 2.4 is refused in one line at the first
  launch, not deep inside the interpreter.
- No @triton.jit function holds a float literal outside fp32's normal range where
  triton would type it: triton 3.6 makes such a literal fp64 (1e-38 broke NF4
  quantize there), 3.9 keeps it fp32.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest
import torch
import triton

from tests.stacks import OLDEST, PINNED, ROOT, require, stack_env

FP32_MIN_NORMAL = 2.0 ** -126
FP32_MAX = (2 - 2.0 ** -23) * 2.0 ** 127


def _bounds(requirement: str):
    from packaging.requirements import Requirement
    return Requirement(requirement).specifier


def _setup_requirements() -> dict:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            reqs = [ast.literal_eval(e) for e in node.value.elts]
            return {re.split(r"[<>=!~ ]", r, maxsplit=1)[0]: r for r in reqs}
    raise AssertionError("setup.py has no install_requires")


def _version(text: str) -> str:
    return text.split("+")[0]


def test_setup_py_states_the_range_the_tests_check():
    reqs = _setup_requirements()
    oldest_triton = next(p.split("==")[1] for p in OLDEST.packages if p.startswith("triton=="))
    triton_range, torch_range = _bounds(reqs["triton"]), _bounds(reqs["torch"])
    from packaging.version import Version
    lower = [Version(s.version) for s in triton_range if s.operator == ">="]
    assert lower == [Version(oldest_triton)], (reqs["triton"], oldest_triton)
    assert triton_range.contains(_version(triton.__version__)), (reqs["triton"], triton.__version__)
    assert not triton_range.contains("3.5.1"), reqs["triton"]
    assert [s.version for s in torch_range if s.operator == ">="] == ["2.11"], reqs["torch"]
    assert torch_range.contains(_version(torch.__version__)), (reqs["torch"], torch.__version__)
    # an upper bound: a triton or torch nobody has checked is not promised
    assert any(s.operator in ("<", "<=") for s in triton_range), reqs["triton"]
    assert any(s.operator in ("<", "<=") for s in torch_range), reqs["torch"]


def test_the_oldest_stack_runs_its_own_triton():
    require(OLDEST)
    done = subprocess.run([sys.executable, "-c", "import numpy, triton; "
                           "print(triton.__version__, numpy.__version__)"],
                          cwd=ROOT, env=stack_env(OLDEST), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [p.split("==")[1] for p in OLDEST.packages], done.stdout


def test_kernel_tests_pass_under_the_oldest_triton_interpreter():
    require(OLDEST)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         "-m", "kernels and not sweep and not real_model", "--durations=0"],
        cwd=ROOT, env=stack_env(OLDEST, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=1800)
    tail = done.stdout[-6000:] + done.stderr[-2000:]
    print(tail)
    assert done.returncode == 0, f"kernel tests under triton 3.6 failed:\n{tail}"
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed.group(1)) >= 300, tail      # the kernel tests ran, not none


def test_the_oldest_interpreter_with_a_new_numpy_is_refused_in_one_line():
    # numpy is imported from the venv (>= 2.4) before the oldest triton is put first
    require(OLDEST)
    script = (
        "import sys, numpy\n"
        f"sys.path.insert(0, {str(OLDEST.overlay)!r})\n"
        "import torch, triton, csrc_triton\n"
        "assert triton.__version__.startswith('3.6'), triton.__version__\n"
        "if tuple(int(p) for p in numpy.__version__.split('.')[:2]) < (2, 4):\n"
        "    print('OLD-NUMPY'); sys.exit(0)\n"
        "try:\n"
        "    csrc_triton.nf4_quantize(torch.randn(4, 64))\n"
        "except RuntimeError as e:\n"
        "    print('REFUSED', e)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                          env=stack_env(PINNED, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.startswith("OLD-NUMPY"):
        pytest.fail("this venv's numpy is < 2.4: the refusal cannot be shown here")
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("REFUSED csrc_triton: "), done.stdout
    assert "numpy<2.4" in lines[0] and "triton 3.6.0" in lines[0], lines[0]


def _jit_functions():
    for path in sorted((ROOT / "csrc_triton").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                yield path.name, node


def _outside_fp32_normal(value) -> bool:
    return (isinstance(value, float) and value == value and value != 0.0
            and abs(value) != float("inf")
            and not FP32_MIN_NORMAL <= abs(value) <= FP32_MAX)


def test_no_kernel_float_literal_that_triton_36_would_type_fp64():
    found, functions = [], 0
    for name, fn in _jit_functions():
        functions += 1
        typed = set()        # literals that are tl.full's value with an explicit dtype
        for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
            if ast.unparse(call.func) in ("tl.full", "tl.full_like") and len(call.args) >= 3:
                typed.add(id(call.args[1]))
        for node in ast.walk(fn):
            if (isinstance(node, ast.Constant) and _outside_fp32_normal(node.value)
                    and id(node) not in typed):
                found.append(f"{name}:{node.lineno} {fn.name}: {node.value!r}")
    assert functions >= 20, functions                    # the scan found the kernels
    assert not found, "float literals triton 3.6 types as fp64: " + ", ".join(found)


def test_the_literal_scan_catches_what_broke_nf4_quantize():
    fn = ast.parse("def k(absmax):\n    return tl.maximum(absmax, 1e-38)\n").body[0]
    assert any(isinstance(n, ast.Constant) and _outside_fp32_normal(n.value)
               for n in ast.walk(fn))
    fixed = ast.parse("def k(a):\n    return tl.maximum(a, tl.full([4], 1e-38, tl.float32))\n")
    call = next(n for n in ast.walk(fixed) if isinstance(n, ast.Call)
                and ast.unparse(n.func) == "tl.full")
    assert _outside_fp32_normal(call.args[1].value) and len(call.args) == 3

