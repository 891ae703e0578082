"""Every bench entry point that loads a model takes its device from the one place that
decides it (bench.common.bench_device) and hands it to load_model: with a GPU and
compiled kernels the GPU benchmarks load on CUDA (the triton backend refuses CPU
tensors there, which is how step_anatomy broke on a GPU), the CPU benchmarks by design
stay on the CPU. A CUDA machine is simulated: torch.cuda.is_available answers True,
csrc_triton.INTERPRETING False, and load_model records its device and stops the run."""
from __future__ import annotations

import ast
import os
from pathlib import Path
from unittest import mock

import pytest
import torch

import csrc_triton
from bench import common

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "anita_core" / "assets" / "tiny-llama3")


class LoadReached(BaseException):
    """Raised by the recording load_model: the entry point got that far (a BaseException,
    so an entry point's own `except Exception` around a step cannot swallow it)."""


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(csrc_triton, "INTERPRETING", False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "simulated CUDA device")
    seen = []

    def recording_load_model(path, *args, **kwargs):
        seen.append(torch.device(kwargs.get("device", "cpu")))
        raise LoadReached(path)
    return seen, recording_load_model


def run_step_anatomy(monkeypatch, load, tmp_path):
    import anita_core.hf.load
    from bench import step_anatomy
    monkeypatch.setattr(anita_core.hf.load, "load_model", load)
    step_anatomy.measure(step_anatomy.parse_args([]))


def run_train(monkeypatch, load, tmp_path):
    from bench import train, train_models
    monkeypatch.setattr(train_models, "load_model", load)
    monkeypatch.setattr(common, "measure_ceilings", lambda ctx: common.Ceilings(1.0, 1.0, "", ""))
    train.main(["--frameworks", "anita", "--checkpoint", TINY, "--seq-lens", "8", "--batch", "1",
                "--no-max-seq", "--no-plot", "--no-progress", "--out", str(tmp_path / "t.csv")])


def run_max_context_step(monkeypatch, load, tmp_path):
    from bench import max_context_step
    monkeypatch.setattr(max_context_step, "load_model", load)
    monkeypatch.setattr(common, "measure_ceilings", lambda ctx: common.Ceilings(1.0, 1.0, "", ""))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: mock.Mock(total_memory=int(141e9)))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda *a, **k: None)
    max_context_step.main(["--checkpoint", TINY, "--no-progress", "--out", str(tmp_path / "m.csv")])


def run_cpu_real_model(monkeypatch, load, tmp_path):
    import anita_core.hf
    from anita_core.model import ops
    from bench import cpu_real_model
    monkeypatch.setattr(anita_core.hf, "load_model", load)
    previous = ops.active_backend()
    try:
        cpu_real_model.main(["--model", TINY])
    finally:
        ops.set_backend(previous)


def run_host_syncs(monkeypatch, load, tmp_path):
    import anita_core.hf
    from bench import host_syncs
    monkeypatch.setattr(anita_core.hf, "load_model", load)
    host_syncs.measure(host_syncs.parse_args([]))


def run_distributed_overlap(monkeypatch, load, tmp_path):
    import argparse
    import anita_core.hf
    from bench import distributed
    monkeypatch.setattr(anita_core.hf, "load_model", load)
    threads = torch.get_num_threads()
    try:
        with mock.patch.dict(os.environ):
            distributed._overlap_worker(0, 1, 0, TINY, argparse.Namespace(lora_r=4), {})
    finally:
        torch.set_num_threads(threads)


def run_dpo_packing(monkeypatch, load, tmp_path):
    import anita_core.hf
    from bench import dpo_packing
    monkeypatch.setattr(anita_core.hf, "load_model", load)
    dpo_packing.main(["--hidden", "0", "--pairs", "bundled", "--timed-batches", "1"])


# module -> (how to run it up to load_model, the device it must load on with a GPU)
ENTRY_POINTS = {
    "step_anatomy": (run_step_anatomy, "cuda"),
    "train_models": (run_train, "cuda"),             # bench.train --checkpoint
    "max_context_step": (run_max_context_step, "cuda"),
    "host_syncs": (run_host_syncs, "cuda"),
    "cpu_real_model": (run_cpu_real_model, "cpu"),    # times the CPU path by design
    "distributed": (run_distributed_overlap, "cpu"),  # 2 gloo ranks on the CPU
    "dpo_packing": (run_dpo_packing, "cuda"),         # --hidden 0: the bundled model
}


def load_model_calls():
    """(module, call) for every load_model(...) call in bench/."""
    for path in sorted((REPO / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) \
                    == "load_model":
                yield path.stem, node


def test_every_load_model_call_in_bench_is_handed_a_device():
    modules = set()
    for module, call in load_model_calls():
        modules.add(module)
        device = [k.value for k in call.keywords if k.arg == "device"]
        assert device, f"bench/{module}.py:{call.lineno}: load_model without device="
        assert not isinstance(device[0], ast.Constant), \
            f"bench/{module}.py:{call.lineno}: a literal device instead of bench_device()"
    assert modules == set(ENTRY_POINTS), "an entry point loads a model and is not checked here"


@pytest.mark.parametrize("module", list(ENTRY_POINTS))
def test_entry_point_loads_on_the_device_bench_device_decides(module, fake_cuda, monkeypatch,
                                                              tmp_path):
    seen, load = fake_cuda
    run, expected = ENTRY_POINTS[module]
    assert common.bench_device().type == "cuda"            # the simulated GPU machine
    with pytest.raises(LoadReached):
        run(monkeypatch, load, tmp_path)
    assert seen == [torch.device(expected)], (module, seen)


def test_bench_device_without_a_gpu_is_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.bench_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(csrc_triton, "INTERPRETING", True)     # forced interpreter on a GPU box
    assert common.bench_device() == torch.device("cpu")
    assert common.bench_device(cpu_only=True) == torch.device("cpu")
