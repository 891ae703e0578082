"""Host synchronizations (issue 19): at most 1 per micro-batch and 3 per optimizer
step, logging included, counted by bench.host_syncs on real train_sft-like steps;
the counter sees each kind of read; the host-side facts that replace the device
reads change no result."""
from __future__ import annotations

import pytest
import torch

from anita_core.model.batch_facts import BatchFacts, batch_facts
from anita_core.model.ops import use_backend
from bench import host_syncs, step_anatomy

MAX_PER_MICRO_BATCH = 1
MAX_PER_STEP = 3


def test_the_counter_sees_every_kind_of_read_and_only_device_ones():
    counter = host_syncs.HostSyncCounter()
    host = torch.tensor([[1, -100, 3]])
    device = torch.randn(4)
    counter.mark_host(host)
    with counter:
        counter.section = "host"
        int((host != -100).sum()), host.tolist(), bool(host[0, 0] > 0)   # the CPU-side batch
        made = torch.zeros(4)                    # no device named: a CPU tensor on a GPU too
        float(made.sum())
        counter.section = "reads"
        float(device.sum()), device.tolist(), bool(device[0] > 0), device[0].item()
        counter.section = "sizes"
        device.nonzero(), device[device > 0], device.masked_select(device > 0), device.unique()
        counter.section = "copies"
        up = host.to(torch.device("cpu"))                       # blocking upload
        host.to(torch.device("cpu"), non_blocking=True)         # no wait
        down = device.cpu()
        down.tolist()                                           # already on the host
        made.copy_(device)                                      # into a host tensor
        counter.section = "after upload"
        int(up.sum())                            # the model's copy is a device tensor
    sections = counter.per_section()
    assert "host" not in sections, counter.in_section("host")
    assert sections == {"reads": 4, "sizes": 4, "copies": 3, "after upload": 1}, counter.syncs
    assert {s.what for s in counter.in_section("sizes")} == {
        "nonzero", "index with a boolean mask", "masked_select", "_unique2"}
    assert counter.is_host(host) and not counter.is_host(up)   # the upload left the batch on the host
    assert all(s.where.startswith("tests/test_host_syncs.py:") for s in counter.syncs)


@pytest.fixture(scope="module")
def optimizer_steps():
    """Two optimizer steps of 4 micro-batches (the first warms up), triton backend (the
    GPU's path, here through the interpreter; the torch backend is the CPU path, whose
    blocked attention reads its block starts on the host by design)."""
    args = host_syncs.parse_args(["--backend", "triton", "--dtype", "fp32", "--seq", "32",
                                  "--rank", "4", "--accumulation", "4", "--steps", "2"])
    return host_syncs.measure(args)


def test_an_optimizer_step_syncs_at_most_3_times_and_a_micro_batch_at_most_once(optimizer_steps):
    steps = optimizer_steps["steps"]
    assert [len(s["per_micro_batch"]) for s in steps] == [4, 4]
    for row in steps:
        assert row["per_step"] <= MAX_PER_STEP, optimizer_steps["syncs"]
        assert max(row["per_micro_batch"]) <= MAX_PER_MICRO_BATCH, optimizer_steps["syncs"]
    # what remains: the step's sums with its gradient norm (read_floats) and the weights
    # check (all_finite), both in host_reads, the module the trainer reads the device through
    where = sorted(s["where"].split(":")[0] for s in optimizer_steps["syncs"]
                   if s["section"] == "step 2")
    assert where == ["anita_core/train/host_reads.py"] * 2, where


def test_a_micro_batch_of_the_triton_backend_reads_nothing_back():
    """One SFT train_step under the Triton interpreter, as step_anatomy counts it."""
    flags = ["--dtype", "bf16", "--batch", "1", "--seq", "24", "--rank", "4"]
    with use_backend("triton"):
        result = step_anatomy.measure(step_anatomy.parse_args(flags))
    assert result["host_syncs"] == []


def test_facts_from_the_host_change_no_bit_of_the_loss_or_the_gradients():
    from anita_core.hf import load_model
    from anita_core.lora import LoRAAdapters, LoRAConfig
    from anita_core.cli.common import BUNDLED_MODEL
    with use_backend("triton"):
        model = load_model(BUNDLED_MODEL, progress=False)
        model.adapters = LoRAAdapters.init(LoRAConfig(r=4, alpha=8, dropout=0.0, seed=2), model.config)
        with torch.no_grad():
            for p in model.adapters.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
        V = model.config.vocab_size
        ids = torch.randint(0, V, (2, 19))
        targets = torch.randint(0, V, (2, 19))
        targets[0, :7] = -100
        positions = torch.cat([torch.arange(12), torch.arange(7)]).expand(2, 19).contiguous()
        segments = torch.tensor([0] * 12 + [1] * 7).expand(2, 19).contiguous()
        facts = batch_facts(ids, targets, positions, V)
        assert facts == BatchFacts(num_targets=38 - 7, position_bound=12)
        results = []
        for given in (None, facts):
            model.adapters.zero_grad()
            counter = host_syncs.HostSyncCounter()
            with counter:
                loss, _ = model.train_step(ids, targets, positions, segments, grad_scale=0.25,
                                           facts=given)
            results.append((loss, [p.grad.clone() for p in model.adapters.parameters()],
                            len(counter.syncs)))
        (loss_a, grads_a, syncs_a), (loss_b, grads_b, syncs_b) = results
        assert torch.equal(loss_a, loss_b)
        assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
        assert syncs_a >= 3 and syncs_b == 0, (syncs_a, syncs_b)


def test_batch_facts_refuse_what_the_model_would():
    ids = torch.tensor([[1, 2, 3]])
    targets = torch.tensor([[2, 3, -100]])
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 3\); got range \[1, 3\]"):
        batch_facts(ids, targets, None, 3)
    with pytest.raises(ValueError, match=r"targets\[1\] \(flattened\) = 9 is outside"):
        batch_facts(ids, torch.tensor([[2, 9, -100]]), None, 5)
    with pytest.raises(ValueError, match="position_ids must be >= 0, got -1"):
        batch_facts(ids, targets, torch.tensor([[-1, 0, 1]]), 10)
    assert batch_facts(ids, targets, None, 10) == BatchFacts(num_targets=2, position_bound=3)
