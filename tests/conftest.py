"""pytest wiring: markers, per-test fresh random seeds, output poisoning, default run
folders kept out of the checkout (and checked for), and the largest-error table printed at
the end of each run."""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile

import pytest
import torch

# The kernel and model tests run the Triton kernels (the interpreter on a CPU),
# whatever the default backend of this machine; a test that wants the torch
# backend switches with anita_core.model.ops.use_backend("torch"). Set before
# anything imports anita_core.model.ops (and inherited by CLI subprocesses).
os.environ["ANITA_BACKEND"] = "triton"

import csrc_triton  # noqa: E402
from tests.helpers import ERROR_LOG  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (bf16 parity, real shapes); "
                                       "skipped when torch sees no CUDA device")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available() and not csrc_triton.INTERPRETING
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU with compiled Triton kernels")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Every test draws fresh random inputs; the seed is printed so a failure
    can be replayed with ANITA_TEST_SEED=<seed>."""
    seed = int(os.environ.get("ANITA_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    random.seed(seed)
    print(f"[seed] {request.node.nodeid}: ANITA_TEST_SEED={seed}")
    return seed


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Kernel outputs start as NaN, so an element a kernel never writes fails."""
    previous = csrc_triton.set_poison_outputs(True)
    yield
    csrc_triton.set_poison_outputs(previous)


# The default output folders of every CLI a test runs (runs/<script>-<preset>, eval's
# runs/eval/...), in this process or a child (which inherits the variable), go to a folder
# of this session's own: a suite never writes into a user's runs/, and never sees what a
# user's runs put there (the README's main job may run while the tests do).
SESSION_RUNS = tempfile.mkdtemp(prefix="anita-test-runs-")
os.environ["ANITA_RUNS_DIR"] = SESSION_RUNS


@pytest.fixture(autouse=True)
def no_run_folder_by_default():
    """A test runs the CLIs with --output-dir in tmp_path: a folder appearing in the session's
    runs folder is a CLI that ran with its default output, which outside the tests is the
    checkout's runs/. Only this session's processes write there: a user's job never trips it."""
    before = set(os.listdir(SESSION_RUNS))
    yield
    made = set(os.listdir(SESSION_RUNS)) - before
    for name in made:                    # the next test starts clean
        shutil.rmtree(os.path.join(SESSION_RUNS, name), ignore_errors=True)
    assert not made, f"the test wrote {sorted(made)} into the default runs folder; pass --output-dir"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_RUNS, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    if not ERROR_LOG:
        return
    terminalreporter.section("largest error against the float64 reference, per op")
    terminalreporter.write_line(f"{'op':32s} {'checks':>7s} {'max |diff|':>12s} {'max rel (fro)':>14s}"
                                f" {'tolerance used':>15s}")
    for op in sorted(ERROR_LOG):
        e = ERROR_LOG[op]
        terminalreporter.write_line(
            f"{op:32s} {e['checks']:7d} {e['max_abs']:12.3e} {e['max_rel_fro']:14.3e}"
            f" {e['max_used']:15.3f}")
    path = os.environ.get("ANITA_ERROR_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(dict(ERROR_LOG), f, indent=1, sort_keys=True)
