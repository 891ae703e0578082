"""The run's memory budgets: the pinned host memory offloading may take (counted by the
planner, from the machine's free memory minus a margin, or a flag / environment
variable), and where the measured peak that is compared with the plan starts.

The planner figures are pure arithmetic at LLaMA-3-8B shapes (no allocation); the
CLI test runs train_dpo.py in this process on the bundled tiny model with the torch
backend (the kernels are not under test; the Triton interpreter would cost minutes)."""
from __future__ import annotations

import pytest
import torch

from anita_core.memory.planner import (GiB, MemoryBudgetError, host_bytes_per_offloaded_layer,
                                       plan_memory)
from anita_core.memory import budget as memory_budget
from tests.test_memory_plan import llama3_8b, shape_8b


def test_host_bytes_of_an_offloaded_layer_input_are_tokens_x_hidden_x_dtype():
    config, shape = llama3_8b(), shape_8b(32768)
    assert host_bytes_per_offloaded_layer(config, shape) == 32768 * 4096 * 2   # bf16


def test_the_planner_refuses_an_offloading_plan_the_host_cannot_hold():
    config, shape = llama3_8b(), shape_8b(32768)
    by = plan_memory(config, shape).by_strategy
    budget = (by["offload"] + by["recompute"]) // 2         # needs some layers offloaded
    unlimited = plan_memory(config, shape, budget)
    needed = unlimited.strategies.count("offload")
    per_layer = 32768 * 4096 * 2
    assert needed >= 1 and unlimited.host_bytes == needed * per_layer
    enough = plan_memory(config, shape, budget, host_budget_bytes=needed * per_layer)
    assert enough.strategies == unlimited.strategies and "host budget" in enough.describe()
    with pytest.raises(MemoryBudgetError, match=r"host budget .* holds %d" % (needed - 1)) as e:
        plan_memory(config, shape, budget, host_budget_bytes=needed * per_layer - 1)
    assert e.value.flag == "--host-memory-budget"       # the CLI names it (not read from the text)
    with pytest.raises(MemoryBudgetError, match="too small") as e:
        plan_memory(config, shape, by["offload"] - 1)
    assert e.value.flag == "--memory-budget"


def test_forced_offload_recomputes_the_layers_beyond_the_host_budget():
    config, shape = llama3_8b(), shape_8b(8192)
    per_layer = 8192 * 4096 * 2
    plan = plan_memory(config, shape, strategy="offload", host_budget_bytes=5 * per_layer + 7)
    assert plan.strategies == ["offload"] * 5 + ["recompute"] * 27
    assert plan.host_bytes == 5 * per_layer
    assert plan_memory(config, shape, strategy="offload").strategies == ["offload"] * 32


def test_the_issue_s_832k_token_plan_does_not_fit_a_128_gib_host():
    """The issue's 832,512-token plan for an 80 GB card offloaded 31 layer inputs; counted
    in full (the RoPE tables alone are 0.40 GiB at that length) it does not fit the card
    at all, and the planner says so. 800 x 1024 tokens do, with 31 layer inputs offloaded:
    31 x 819,200 x 4096 x 2 bytes = 193.75 GiB of pinned host memory; with the host budget
    of a 128 GiB machine (minus the default margin, 10%) it is refused, naming what the
    host holds: 115.2 GiB / (819,200 x 8192 bytes) = 18 layer inputs. A forced offload
    pins exactly 18 x 6.25 = 112.5 GiB: one pool, not 18 allocations each rounded up to
    the next power of two (8 GiB: 144 GiB on a 128 GiB machine)."""
    config = llama3_8b()
    device_budget = int(80e9) - max(GiB, int(80e9) // 20)
    host = 128 * GiB - max(4 * GiB, 128 * GiB // 10)
    with pytest.raises(MemoryBudgetError, match=r"70\.78 GiB is too small .* 832512 tokens: every "
                                                r"layer offloaded needs 71\.2. GiB"):
        plan_memory(config, shape_8b(832_512), device_budget, host_budget_bytes=host)
    with pytest.raises(MemoryBudgetError, match=r"31 of 32 layer inputs offloaded, 193\.75 GiB "
                                                r"of pinned host memory; the host budget "
                                                r"115\.2. GiB holds 18 "):
        plan_memory(config, shape_8b(819_200), device_budget, host_budget_bytes=host)
    forced = plan_memory(config, shape_8b(819_200), strategy="offload", host_budget_bytes=host)
    assert forced.strategies.count("offload") == 18
    assert forced.host_bytes == 18 * 819_200 * 4096 * 2 == int(112.5 * GiB) <= host


def test_the_plan_sizes_the_host_pool_and_every_micro_batch_shares_it(tmp_path):
    """apply_memory_plan hands a model that has no stash a HostOffload and reserves the
    plan's host bytes in its pool: the first offloading step makes one host allocation
    of exactly that figure, and a smaller micro-batch, then the largest, reuse it (no
    allocation per step, no growth). A plan that offloads nothing hands in nothing."""
    from anita_core.memory.offload import HostOffload
    from anita_core.model.ops import use_backend
    from tests.test_memory_plan import random_batch, tiny_model
    model = tiny_model(tmp_path, 3, 0.0, offload=False)
    batches = [{"input_ids": torch.zeros(2, 16, dtype=torch.long)}]
    recompute = memory_budget.apply_memory_plan(memory_budget.MemoryRequest("recompute"), model,
                                                batches, log=lambda line: None)
    assert recompute.strategies == ["recompute"] * 3 and model.activation_stash is None
    request = memory_budget.MemoryRequest("offload")
    plan = memory_budget.apply_memory_plan(request, model, batches, log=lambda line: None)
    per_layer = 2 * 16 * model.config.hidden_size * 4                    # fp32
    assert plan.strategies == ["offload"] * 3 and plan.host_bytes == 3 * per_layer
    assert isinstance(model.activation_stash, HostOffload)
    pool = model.activation_stash.pool
    assert pool.reserved == plan.host_bytes and pool.allocations == 0
    with use_backend("torch"):
        for batch, seq in ((1, 10), (2, 16)):
            model.train_step(*random_batch(model.config, batch, seq))
            assert pool.allocations == 1
            assert pool.nbytes == plan.host_bytes


def test_default_host_budget_is_available_memory_minus_a_margin(monkeypatch):
    monkeypatch.delenv(memory_budget.HOST_BUDGET_ENV, raising=False)
    monkeypatch.setattr(memory_budget, "available_host_bytes", lambda: 120 * GiB)
    cuda = torch.device("cuda")
    assert memory_budget.default_host_budget(cuda) == 108 * GiB           # 10% > 4 GiB
    monkeypatch.setattr(memory_budget, "available_host_bytes", lambda: 20 * GiB)
    assert memory_budget.default_host_budget(cuda) == 16 * GiB            # 4 GiB > 10%
    assert memory_budget.default_host_budget(torch.device("cpu")) is None  # CPU: unlimited
    monkeypatch.setenv(memory_budget.HOST_BUDGET_ENV, "2.5")
    assert memory_budget.default_host_budget(torch.device("cpu")) == int(2.5 * GiB)
    monkeypatch.setenv(memory_budget.HOST_BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match="ANITA_HOST_MEMORY_BUDGET='lots'"):
        memory_budget.default_host_budget(cuda)
    monkeypatch.undo()
    assert memory_budget.available_host_bytes() > 0          # this Linux machine's /proc/meminfo


def test_a_bad_host_budget_environment_is_a_usage_error(monkeypatch, capsys):
    import train_sft
    monkeypatch.setenv(memory_budget.HOST_BUDGET_ENV, "-1")
    with pytest.raises(SystemExit) as e:
        train_sft.main(["--max-steps", "1"])
    assert e.value.code == 2
    assert "ANITA_HOST_MEMORY_BUDGET='-1'" in capsys.readouterr().err


def test_reset_peak_memory_resets_the_cuda_statistic_only_on_a_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(device))
    memory_budget.reset_peak_memory(torch.device("cpu"))
    assert calls == []
    memory_budget.reset_peak_memory(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)]


def test_the_peak_statistic_starts_after_loading_and_the_reference_precompute(tmp_path, monkeypatch):
    """train_dpo.py with the reference precomputed: the peak statistic is reset after the
    model loaded and after the reference pass, right before the first training step,
    which is where the memory plan's prediction starts."""
    import anita_core.hf
    import train_dpo
    from anita_core.model.ops import use_backend
    from anita_core.train import reference_logprobs
    from anita_core.train.trainer import Trainer
    events = []

    def recording(name, fn):
        def wrapper(*args, **kwargs):
            events.append(name)
            return fn(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(anita_core.hf, "load_model", recording("load", anita_core.hf.load_model))
    monkeypatch.setattr(reference_logprobs, "prepare_reference_logps",
                        recording("reference", reference_logprobs.prepare_reference_logps))
    monkeypatch.setattr(memory_budget, "reset_peak_memory",
                        recording("reset", memory_budget.reset_peak_memory))
    monkeypatch.setattr(Trainer, "_train_one_step", recording("step", Trainer._train_one_step))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with use_backend("torch"):
            code = train_dpo.main(["--no-progress", "--eval-split", "0", "--batch-size", "2",
                                   "--max-samples", "4", "--max-length", "32",
                                   "--max-prompt-length", "0", "--max-steps", "1",
                                   "--output-dir", str(tmp_path / "run")])
    finally:
        torch.set_num_threads(previous_threads)
    assert code == 0
    assert events == ["load", "reference", "reset", "step"], events


def test_offload_activations_trains_on_the_host_offload_the_plan_hands_in(tmp_path, monkeypatch):
    """train_sft.py --offload-activations: the model loads with no stash; the plan
    offloads every layer and hands it a HostOffload, and the step's inputs went to
    that pool: one allocation of exactly the plan's host bytes, every input fetched back."""
    import train_sft
    from anita_core.memory.offload import HostOffload
    from anita_core.model.ops import use_backend
    applied, plan_memory_of_run = [], memory_budget.apply_memory_plan

    def recording(request, model, *args, **kwargs):
        assert model.activation_stash is None
        plan = plan_memory_of_run(request, model, *args, **kwargs)
        applied.append((model, plan))
        return plan
    monkeypatch.setattr(memory_budget, "apply_memory_plan", recording)
    previous_threads = torch.get_num_threads()
    try:
        with use_backend("torch"):
            code = train_sft.main(["--offload-activations", "--max-steps", "1", "--batch-size", "2",
                                   "--no-progress", "--eval-split", "0", "--threads", "1",
                                   "--output-dir", str(tmp_path / "run")])
    finally:
        torch.set_num_threads(previous_threads)
    assert code == 0
    (model, plan), = applied
    assert set(plan.strategies) == {"offload"} and plan.host_bytes > 0
    stash = model.activation_stash
    assert isinstance(stash, HostOffload) and stash.latest.done()
    assert stash.latest.pool is stash.pool
    assert stash.pool.allocations == 1 and stash.pool.nbytes == plan.host_bytes
