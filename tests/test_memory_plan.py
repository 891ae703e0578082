"""The memory planner against what a train_step really holds, the three layer
strategies against each other, and the planner's choices and errors.

Peaks are tracked by a TorchDispatchMode that registers every storage an ATen op
creates (not the storages of its inputs: views, in-place ops) with a weak
reference to the storage itself (StorageWeakRef: a view keeps its storage alive,
a dropped Python wrapper does not end it), and sums the storages still alive
after every op. The kernels run on the Triton backend (the suite's, under the
interpreter): its torch allocations are those of the GPU path (the torch backend
has its own dense-weight cache and [S, S] attention temporaries). What the
tracker cannot see (a kernel's registers, an op's internal scratch) the planner
does not count either. The offloader's host copies are not device memory and are
left out of the tally.

Tolerance 10% (the issue's): the planner omits the RoPE tables' growth, position
ids and a few [T] integer vectors (about 1% here)."""
from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from anita_core.hf import load_model
from anita_core.model import block
from anita_core.lora import LoRAAdapters, LoRAConfig
from anita_core.model.memory_plan import (STRATEGIES, MemoryBudgetError, StepShape, activation_peak,
                                          plan_memory, shape_for_model)
from anita_core.model.config import ModelConfig
from tests.model_factory import make_tiny_llama_dir

TOLERANCE = 0.10


class LiveDeviceBytes(TorchDispatchMode):
    """Peak bytes of the storages created inside the mode and still alive, not
    counting ``host`` tensors (a callable returning the offloader's host copies)."""

    def __init__(self, host=lambda: ()):
        super().__init__()
        self.live, self.peak, self.host = {}, 0, host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live and key not in inputs and storage.nbytes():
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        host = {t.untyped_storage().data_ptr() for t in self.host()}
        now = sum(n for key, (_, n) in self.live.items() if key not in host)
        self.peak = max(self.peak, now)
        return out


def tiny_model(tmp_path, num_layers, dropout):
    model = load_model(make_tiny_llama_dir(tmp_path, num_layers=num_layers), progress=False,
                       dropout_seed=5)
    model.adapters = LoRAAdapters.init(
        LoRAConfig(r=4, alpha=8, dropout=dropout, seed=3,
                   target_modules=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")),
        model.config)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():       # B = 0 at init would leave every dA zero
        for p in model.adapters.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def tracked_step(model, strategies, ids, targets):
    """(tracked peak, predicted peak, loss, grads, generator state after) of one step."""
    model.set_layer_strategies(strategies)
    params = list(model.adapters.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)      # LoRA grads are static bytes, not activations
    model.rope_tables(ids.shape[1])       # so are the RoPE tables
    model.dropout_generator.manual_seed(11)
    tracker = LiveDeviceBytes(host=lambda: model.offloader.host_tensors())
    with tracker:
        loss, _ = model.train_step(ids, targets)
    shape = shape_for_model(model, *ids.shape)
    predicted = activation_peak(model.config, shape, model.strategies())
    return (tracker.peak, predicted, loss, [p.grad.clone() for p in params],
            model.dropout_generator.get_state())


def force_mlp_chunk_rows(monkeypatch, model, rows):
    """Make block.mlp_chunk_rows give ``rows`` (< MLP_CHUNK_ALIGN) for this model."""
    per_row = model.config.intermediate_size * model.dtype.itemsize
    assert rows < block.MLP_CHUNK_ALIGN
    monkeypatch.setattr(block, "MLP_CHUNK_BYTES", rows * per_row)


@pytest.mark.parametrize("num_layers, batch, seq, dropout, mixed, chunk_rows", [
    # LoRA dropout on: masks kept or replayed; fused NF4 path (M = 48)
    (3, 2, 24, 0.3, ["offload", "keep", "recompute"], None),
    # M = 200 > 192: the dequantize path, dense W held by a recompute (not by a kept layer)
    (2, 1, 200, 0.0, ["keep", "offload"], None),
    # the MLP in 4 chunks of 13 rows and a tail of 10, dropout masks drawn per chunk
    (2, 2, 31, 0.3, ["keep", "recompute"], 13),
    # no dropout: q/k/v and gate/up fused, the MLP in 5 chunks of 8 rows
    (2, 1, 40, 0.0, ["recompute", "keep"], 8),
])
def test_strategies_same_gradients_and_peak_as_predicted(tmp_path, monkeypatch, num_layers, batch,
                                                         seq, dropout, mixed, chunk_rows):
    model = tiny_model(tmp_path, num_layers, dropout)
    if chunk_rows is not None:
        force_mlp_chunk_rows(monkeypatch, model, chunk_rows)
    T = batch * seq
    assert block.mlp_chunk_rows(T, model.config.intermediate_size, model.dtype) == (chunk_rows or T)
    g = torch.Generator().manual_seed(num_layers)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (batch, seq), generator=g)
    targets = torch.randint(0, V, (batch, seq), generator=g)
    assert shape_for_model(model, batch, seq).dense_weights == (batch * seq > 192)
    runs = {}
    for name, strategies in [("recompute", "recompute"), ("keep", "keep"), ("offload", "offload"),
                             ("mixed", mixed)]:
        runs[name] = tracked_step(model, strategies, ids, targets)
        tracked, predicted = runs[name][:2]
        print(f"{name}: tracked {tracked} predicted {predicted} ratio {predicted / tracked:.3f}")
        assert abs(predicted - tracked) <= TOLERANCE * tracked, (name, tracked, predicted)
    base_loss, base_grads, base_state = runs["recompute"][2:]
    for name, (_, _, loss, grads, state) in runs.items():
        assert torch.equal(loss, base_loss), name
        for a, b in zip(grads, base_grads):
            assert torch.equal(a, b), name            # bitwise, fp32
        assert torch.equal(state, base_state), name   # dropout generator left where it was
    assert all(torch.count_nonzero(g) for g in base_grads)     # every adapter was reached
    # keeping activations costs memory, offloading saves it (more than 2 layers)
    assert runs["keep"][0] > runs["recompute"][0]
    if num_layers > 2:
        assert runs["offload"][0] < runs["recompute"][0]
    assert not model.offloader.held and not model.offloader.arriving


def test_mlp_chunks_match_one_chunk_and_lower_the_peak_as_predicted(tmp_path, monkeypatch):
    """Several MLP chunks against one: the same loss and LoRA gradients up to the
    order of fp32 sums (the forward's rows are computed alike, but a chunk's M can
    pick another tiling and dA/dB add per-chunk partial sums: rtol 1e-5 on fp32 sums
    of <= 200 terms, whose rounding is ~200 * 6e-8 relative to their magnitudes), and
    a tracked peak that falls with the chunk rows, each within 10% of the replay's.
    M = 200: the attention's projections take the dequantize path, the chunks' the
    fused one. The smallest chunks come out ~9% under the tracker here: the Triton
    interpreter holds the arguments of each kernel's latest launch until its next
    one (checked: the recompute's h1, last read by the last chunk's rms_norm_backward,
    stays alive through the attention's backward), which a compiled launch does not,
    and that fixed excess weighs more as the chunks shrink the rest."""
    model = tiny_model(tmp_path, 2, 0.0)
    g = torch.Generator().manual_seed(7)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (1, 200), generator=g)
    targets = torch.randint(0, V, (1, 200), generator=g)
    tracked_step(model, "recompute", ids, targets)    # first-step one-off allocations
    runs = {}
    for rows in (200, 40, 8):
        if rows < 200:
            force_mlp_chunk_rows(monkeypatch, model, rows)
        assert block.mlp_chunk_rows(200, model.config.intermediate_size, model.dtype) == rows
        runs[rows] = tracked_step(model, "recompute", ids, targets)
        tracked, predicted = runs[rows][:2]
        print(f"chunk rows {rows}: tracked {tracked} predicted {predicted} "
              f"ratio {predicted / tracked:.3f}")
        assert abs(predicted - tracked) <= TOLERANCE * tracked, (rows, tracked, predicted)
    assert shape_for_model(model, 1, 200).dense_weights
    assert not shape_for_model(model, 1, 200).mlp_dense_weights
    peaks = [runs[rows][0] for rows in (200, 40, 8)]
    predicted = [runs[rows][1] for rows in (200, 40, 8)]
    assert peaks[0] > peaks[1] > peaks[2] and predicted[0] > predicted[1] > predicted[2]
    # the saving itself as predicted (within the same 10% of the one-chunk peak)
    assert abs((predicted[0] - predicted[2]) - (peaks[0] - peaks[2])) <= TOLERANCE * peaks[0]
    one_loss, one_grads = runs[200][2:4]
    scale = max(float(grad.abs().max()) for grad in one_grads)
    for rows in (40, 8):
        loss, grads = runs[rows][2:4]
        torch.testing.assert_close(loss, one_loss, rtol=1e-5, atol=0)
        for a, b in zip(grads, one_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)
    # a kept layer's chunks give the recompute's bits
    keep = tracked_step(model, "keep", ids, targets)
    assert torch.equal(keep[2], runs[8][2])
    assert all(torch.equal(a, b) for a, b in zip(keep[3], runs[8][3]))


def test_mlp_chunk_rows():
    """One chunk up to MLP_CHUNK_BYTES per [rows x intermediate] tensor; beyond,
    equal chunks of whole 64-row tiles under the limit, no more of them than needed."""
    I, dtype = 14336, torch.bfloat16
    limit = block.MLP_CHUNK_BYTES // (I * 2)
    limit -= limit % block.MLP_CHUNK_ALIGN
    for tokens in (1, 24, 2048, 8192, limit):
        assert block.mlp_chunk_rows(tokens, I, dtype) == tokens
    for tokens in (limit + 1, 100_000, 400_000, 641_024):
        rows = block.mlp_chunk_rows(tokens, I, dtype)
        assert rows % block.MLP_CHUNK_ALIGN == 0 and rows * I * 2 <= block.MLP_CHUNK_BYTES
        assert -(-tokens // rows) == -(-tokens // limit)


def llama3_8b() -> ModelConfig:
    return ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                       tie_word_embeddings=False)


def shape_8b(seq):
    return StepShape(1, seq, torch.bfloat16, 32, dense_weights=True)


def test_plan_keeps_as_many_layers_as_fit_then_recomputes_then_offloads():
    config, shape = llama3_8b(), shape_8b(32768)
    L = config.num_hidden_layers
    unlimited = plan_memory(config, shape)
    assert unlimited.strategies == ["keep"] * L
    by = unlimited.by_strategy
    assert by["offload"] < by["recompute"] < by["keep"]

    # between all-recompute and all-keep: the largest k kept layers that fit
    budget = (by["recompute"] + by["keep"]) // 2
    plan = plan_memory(config, shape, budget)
    k = plan.strategies.count("keep")
    assert 0 < k < L and plan.strategies.count("recompute") == L - k
    assert plan.predicted_bytes <= budget
    more = ["recompute"] * (L - k - 1) + ["keep"] * (k + 1)
    assert unlimited.static_bytes + activation_peak(config, shape, more) > budget

    # between all-offload and all-recompute: offloaded layers, nothing kept
    budget = (by["offload"] + by["recompute"]) // 2
    plan = plan_memory(config, shape, budget)
    assert "keep" not in plan.strategies and "offload" in plan.strategies
    assert plan.predicted_bytes <= budget

    # a forced strategy is still checked against the budget
    assert plan_memory(config, shape, strategy="recompute").strategies == ["recompute"] * L
    with pytest.raises(MemoryBudgetError):
        plan_memory(config, shape, by["recompute"] - 1, strategy="recompute")


def test_too_small_budget_names_the_smallest_that_works():
    config, shape = llama3_8b(), shape_8b(8192)
    smallest = plan_memory(config, shape).by_strategy["offload"]
    with pytest.raises(MemoryBudgetError, match="smallest budget that works is") as e:
        plan_memory(config, shape, smallest - 1)
    named = float(str(e.value).split("smallest budget that works is ")[1].split(" GiB")[0])
    assert smallest <= named * 2**30 <= smallest * 1.001      # rounded up, usable as the flag
    plan = plan_memory(config, shape, int(named * 2**30))       # the named budget works
    assert "keep" not in plan.strategies and plan.predicted_bytes <= named * 2**30
    with pytest.raises(ValueError, match="not one of"):
        plan_memory(config, shape, strategy="checkpoint")


def test_unknown_layer_strategy_is_refused(tmp_path):
    model = tiny_model(tmp_path, 2, 0.0)
    with pytest.raises(ValueError, match="not one of keep, recompute, offload"):
        model.set_layer_strategies(["keep", "swap"])
    with pytest.raises(ValueError, match="got 1 for 2 layers"):
        model.set_layer_strategies(["keep"])
    assert set(STRATEGIES) == {"keep", "recompute", "offload"}


def test_cli_unknown_strategy_lists_the_choices(capsys):
    import train_sft
    with pytest.raises(SystemExit) as e:
        train_sft.main(["--recompute", "checkpoint"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--recompute" in err and "'auto', 'keep', 'recompute', 'offload'" in err


def test_cli_too_small_budget_stops_before_training(tmp_path):
    from tests.run_cli import TINY, run_script
    out = tmp_path / "run"
    proc = run_script("train_sft.py", *TINY, "--max-steps", 1, "--output-dir", out,
                      "--memory-budget", "0.0001")
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if "smallest budget that works is" in l]
    assert len(lines) == 1 and lines[0].startswith("error: --memory-budget:"), proc.stderr
    assert "train loss" not in proc.stderr and not (out / "adapter").exists()
    # the budget it names is enough: the run trains, prints the plan and the peak line
    named = lines[0].split("smallest budget that works is ")[1].split(" GiB")[0]
    proc = run_script("train_sft.py", *TINY, "--max-steps", 1, "--output-dir", tmp_path / "ok",
                      "--memory-budget", named)
    assert proc.returncode == 0, proc.stderr
    assert "memory plan: layers" in proc.stderr and "(a prediction)" in proc.stderr
    assert "measured peak device memory: not measured on CPU" in proc.stderr
