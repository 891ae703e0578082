"""The memory planner against what a train_step really holds, the three layer
strategies against each other, the host pool of the offloaded inputs, and the
planner's choices and errors.

Peaks are tracked by a TorchDispatchMode that registers every storage an ATen op
creates (not the storages of its inputs: views, in-place ops) with a weak
reference to the storage itself (StorageWeakRef: a view keeps its storage alive,
a dropped Python wrapper does not end it), and sums the storages still alive
after every op. Before it records a new peak it collects garbage: the Triton
interpreter's launcher keeps each launch's arguments in reference cycles (its
recursive helpers close over the dict of argument storages) until the next
collection, which a compiled launch does not do, so what only a cycle holds is
not what the step holds. (The objects that exist when the tracking starts are
frozen out of those collections, gc.freeze, so that each stays cheap.) The kernels
run on the Triton backend (the suite's, under the interpreter): its torch
allocations are those of the GPU path (the torch backend has its own dense-weight
cache and [S, S] attention temporaries).
What the tracker cannot see (a kernel's registers, an op's internal scratch) the
planner does not count either. The offloader's host pool is not device memory and
is left out of the tally.

Margin: the replay must never predict less than the tracker measures, and may
predict more only by what it counts that the tracker cannot see, all of it the
batch: its input ids and targets (made before the step, outside the tracker),
segment ids and the two int32 document bounds (these batches have none; the
planner counts them for packed batches), 8 bytes a token each, and the 8-byte
token count train_step returns (torch.tensor of a host int: no ATen op the mode
sees) -- UNSEEN_BYTES_PER_TOKEN * T + 8 in all, 0.3-1.5% of the peaks here."""
from __future__ import annotations

import dataclasses
import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from anita_core.hf import load_model
from anita_core.lora import LoRAAdapters, LoRAConfig
from anita_core.memory.offload import HostOffload, HostPool
from anita_core.memory.planner import (STRATEGIES, MemoryBudgetError, StepShape, activation_peak,
                                       host_bytes_per_offloaded_layer, plan_memory,
                                       shape_for_model)
from anita_core.model import block_buffers
from anita_core.model.config import ModelConfig
from anita_core.model.ops import use_backend
from tests.model_factory import make_tiny_llama_dir

UNSEEN_BYTES_PER_TOKEN = 8 + 8 + 8 + 2 * 4     # ids, targets, segment ids, bounds


def assert_predicted_covers(name, tracked, predicted, tokens):
    """tracked <= predicted <= tracked + what the tracker cannot see (module docstring)."""
    unseen = UNSEEN_BYTES_PER_TOKEN * tokens + 8
    print(f"{name}: tracked {tracked} predicted {predicted} ratio {predicted / tracked:.3f}")
    assert tracked <= predicted <= tracked + unseen, (name, tracked, predicted, unseen)


class LiveDeviceBytes(TorchDispatchMode):
    """Peak bytes of the storages created inside the mode and still alive, not
    counting ``host`` tensors (a callable returning the offloader's host copies)."""

    def __init__(self, host=lambda: ()):
        super().__init__()
        self.live, self.peak, self.host = {}, 0, host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._drop_expired()        # first: a new storage may reuse an expired one's address
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live and key not in inputs and storage.nbytes():
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        now = self._now()
        if now > self.peak:         # only what the program still reaches (module docstring)
            gc.collect()
            now = self._now()
        self.peak = max(self.peak, now)
        return out

    def __enter__(self):
        gc.collect()
        gc.freeze()     # what exists already is never scanned again: collections stay cheap
        return super().__enter__()

    def __exit__(self, *exc):
        gc.unfreeze()
        return super().__exit__(*exc)

    def _drop_expired(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]

    def _now(self) -> int:
        self._drop_expired()
        host = {t.untyped_storage().data_ptr() for t in self.host()}
        return sum(n for key, (_, n) in self.live.items() if key not in host)


def tiny_model(tmp_path, num_layers, dropout, offload=True):
    """A tiny LoRA model on the CPU; with ``offload``, a HostOffload for its offloaded layers."""
    model = load_model(make_tiny_llama_dir(tmp_path, num_layers=num_layers), progress=False,
                       dropout_seed=5, activation_stash=HostOffload("cpu") if offload else None)
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
    tracker = LiveDeviceBytes(host=lambda: model.activation_stash.host_tensors())
    with tracker:
        loss, _ = model.train_step(ids, targets)
    shape = shape_for_model(model, *ids.shape)
    predicted = activation_peak(model.config, shape, model.strategies())
    return (tracker.peak, predicted, loss, [p.grad.clone() for p in params],
            model.dropout_generator.get_state())


def force_mlp_chunk_rows(monkeypatch, model, rows):
    """Make block_buffers.mlp_chunk_rows give ``rows`` (< MLP_CHUNK_ALIGN) for this model."""
    per_row = model.config.intermediate_size * model.dtype.itemsize
    assert rows < block_buffers.MLP_CHUNK_ALIGN
    monkeypatch.setattr(block_buffers, "MLP_CHUNK_BYTES", rows * per_row)


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
    assert block_buffers.mlp_chunk_rows(T, model.config.intermediate_size, model.dtype) == (chunk_rows or T)
    g = torch.Generator().manual_seed(num_layers)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (batch, seq), generator=g)
    targets = torch.randint(0, V, (batch, seq), generator=g)
    assert shape_for_model(model, batch, seq).dense_weights == (batch * seq > 192)
    runs = {}
    for name, strategies in [("recompute", "recompute"), ("keep", "keep"), ("offload", "offload"),
                             ("mixed", mixed)]:
        runs[name] = tracked_step(model, strategies, ids, targets)
        assert_predicted_covers(name, *runs[name][:2], T)
    base_loss, base_grads, base_state = runs["recompute"][2:]
    for name, (_, _, loss, grads, state) in runs.items():
        assert torch.equal(loss, base_loss), name
        for a, b in zip(grads, base_grads):
            assert torch.equal(a, b), name            # bitwise, fp32
        assert torch.equal(state, base_state), name   # dropout generator left where it was
    assert all(torch.count_nonzero(g) for g in base_grads)     # every adapter was reached
    # keeping activations costs memory, offloading saves it (more than 2 layers: with 2,
    # the top layer's input and the one prefetched below it are all there is)
    assert runs["keep"][0] > runs["recompute"][0]
    assert (runs["offload"][0] < runs["recompute"][0]) == (num_layers > 2)
    assert (runs["offload"][1] < runs["recompute"][1]) == (num_layers > 2)
    assert model.activation_stash.latest.done()


def test_mlp_chunks_match_one_chunk_and_lower_the_peak_as_predicted(tmp_path, monkeypatch):
    """Several MLP chunks against one: the same loss and LoRA gradients up to the
    order of fp32 sums (the forward's rows are computed alike, but a chunk's M can
    pick another tiling and dA/dB add per-chunk partial sums: rtol 1e-5 on fp32 sums
    of <= 200 terms, whose rounding is ~200 * 6e-8 relative to their magnitudes), and
    a tracked peak that falls with the chunk rows, each within 10% of the replay's.
    M = 200: the attention's projections take the dequantize path, the chunks' the
    fused one. Each peak is covered as in every other case (module docstring), and
    the saving itself is predicted within the same unseen bytes."""
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
        assert block_buffers.mlp_chunk_rows(200, model.config.intermediate_size, model.dtype) == rows
        runs[rows] = tracked_step(model, "recompute", ids, targets)
        assert_predicted_covers(f"chunk rows {rows}", *runs[rows][:2], 200)
    assert shape_for_model(model, 1, 200).dense_weights
    assert not shape_for_model(model, 1, 200).mlp_dense_weights
    peaks = [runs[rows][0] for rows in (200, 40, 8)]
    predicted = [runs[rows][1] for rows in (200, 40, 8)]
    assert peaks[0] > peaks[1] > peaks[2] and predicted[0] > predicted[1] > predicted[2]
    # the saving itself as predicted (the unseen bytes are the same in both)
    assert abs((predicted[0] - predicted[2]) - (peaks[0] - peaks[2])) <= UNSEEN_BYTES_PER_TOKEN * 200 + 8
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


def random_batch(config, batch, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = config.vocab_size
    return (torch.randint(0, V, (batch, seq), generator=g),
            torch.randint(0, V, (batch, seq), generator=g))


def offload_two_of_three(model, batch, seq):
    """The plan that offloads as many layers as a host budget of two layer inputs holds."""
    shape = shape_for_model(model, batch, seq)
    per_layer = host_bytes_per_offloaded_layer(model.config, shape)
    plan = plan_memory(model.config, shape, strategy="offload", host_budget_bytes=2 * per_layer)
    assert plan.strategies == ["offload", "offload", "recompute"]
    assert plan.host_bytes == 2 * per_layer
    return plan


def test_offloaded_inputs_take_one_host_allocation_of_the_planned_bytes(tmp_path):
    """The offloaded inputs of a step are views of ONE host allocation (offload.HostPool)
    of exactly the planner's host figure, made once and kept by the next steps; a larger
    micro-batch replaces it by one of exactly its size; a forward whose backward has not
    run yet keeps its inputs: a forward meanwhile gets a pool of its own. On a CPU the pool
    is not pinned (no pinned allocator without CUDA); what pinning adds is checked on a
    GPU (tests/test_gpu_training.py:
    test_gpu_offload_pins_exactly_the_planned_host_bytes)."""
    model = tiny_model(tmp_path, 3, 0.0)
    pool = model.activation_stash.pool
    with use_backend("torch"):          # the offloader is the same on every backend
        plan = offload_two_of_three(model, 2, 12)
        model.set_layer_strategies(plan.strategies)
        ids, targets = random_batch(model.config, 2, 12)
        for _ in range(2):
            hidden, state = model.forward_hidden(ids)
            held = state.stashed.held
            assert state.stashed.pool is pool and sorted(held) == [0, 1]
            assert all(t.untyped_storage().data_ptr() == pool.buffer.data_ptr() for t in held.values())
            assert pool.allocations == 1 and pool.nbytes == plan.host_bytes
            model.backward_hidden(torch.ones_like(hidden), state)
            assert state.stashed.done()
        loss, _ = model.train_step(ids, targets)
        assert pool.allocations == 1 and pool.nbytes == plan.host_bytes
        assert model.activation_stash.host_tensors() == [pool.buffer]
        assert not pool.buffer.is_pinned()

        bigger = offload_two_of_three(model, 2, 20)
        model.train_step(*random_batch(model.config, 2, 20))
        assert pool.allocations == 2 and pool.nbytes == bigger.host_bytes

        # three forwards before their backwards: the same gradients as three steps
        for p in model.adapters.parameters():
            p.grad = None
        model.train_step(ids, targets)
        one = [p.grad.clone() for p in model.adapters.parameters()]
        for p in model.adapters.parameters():
            p.grad = None
        forwards = [model.forward_hidden(ids) for _ in range(3)]
        pools = [state.stashed.pool for _, state in forwards]
        assert pools[0] is pool and len({id(p) for p in pools}) == 3
        assert pools[1].nbytes == pools[2].nbytes == plan.host_bytes
        for hidden, state in (forwards[1], forwards[2], forwards[0]):
            model.backward_hidden(_loss_gradient(model, hidden, targets), state)
        for p, g in zip(model.adapters.parameters(), one):
            assert torch.equal(p.grad, 3 * g)
        assert pool.allocations == 2 and not pool.busy()


def test_the_pinned_pool_registers_exactly_its_bytes_and_unregisters_after_the_copies(
        monkeypatch):
    """HostPool(pin=True) against a stand-in CUDA runtime (the real one needs a GPU): one
    cudaHostRegister of exactly the bytes asked for (no power-of-two rounding), views side
    by side in it; a larger request waits for the side stream's copies, unregisters the old
    pool and registers the new one; so does the pool's end; a failed registration is an
    error naming the bytes."""
    calls, answer = [], [0]

    class Runtime:
        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("register", ptr, size))
            return answer[0]

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    class SideStream:
        def synchronize(self):
            calls.append(("synchronize",))
    monkeypatch.setattr(torch.cuda, "cudart", Runtime)
    pool = HostPool(pin=True, stream=SideStream())
    pool.reserve(1000)
    views = pool.views(2, (3, 5), torch.float32)
    first = pool.buffer.data_ptr()
    assert calls == [("register", first, 1000)] and pool.nbytes == 1000
    assert [v.data_ptr() - first for v in views] == [0, 60] and views[1].shape == (3, 5)
    del views
    pool.views(3, (100,), torch.float32)                   # 1200 bytes: a new pool
    second = pool.buffer.data_ptr()
    assert calls[1:] == [("synchronize",), ("unregister", first), ("register", second, 1200)]
    assert pool.allocations == 2
    del pool
    gc.collect()
    assert calls[4:] == [("synchronize",), ("unregister", second)]
    answer[0] = 2
    with pytest.raises(RuntimeError, match="cudaHostRegister of 64 bytes .* failed"):
        HostPool(pin=True).views(1, (16,), torch.float32)


def _loss_gradient(model, hidden, targets):
    from anita_core.model.ops import linear_cross_entropy_forward_backward
    _, _, d_hidden, _ = linear_cross_entropy_forward_backward(
        hidden, model.base.output_embedding, targets.reshape(-1), 1.0)
    return d_hidden


def test_an_offloading_step_waits_on_the_device_no_more_than_a_recomputing_one(tmp_path):
    """The copies to the host pool and back never make the host wait (non_blocking; on a
    GPU on the side stream, from page-locked memory): with the batch's facts counted on
    the host, a step that offloads syncs exactly as often as one that recomputes (the
    torch backend's own reads included), and never in offload.py."""
    from anita_core.model.batch_facts import batch_facts
    from bench.host_syncs import HostSyncCounter
    model = tiny_model(tmp_path, 3, 0.0)
    ids, targets = random_batch(model.config, 1, 16)
    facts = batch_facts(ids, targets, None, model.config.vocab_size)
    syncs = {}
    with use_backend("torch"):
        for strategy in ("recompute", "offload"):
            model.set_layer_strategies(strategy)
            model.train_step(ids, targets, facts=facts)          # warm: pool, tables
            counter = HostSyncCounter()
            with counter:
                model.train_step(ids, targets, facts=facts)
            syncs[strategy] = counter.syncs
    assert len(syncs["offload"]) == len(syncs["recompute"]), syncs
    assert not [s for s in syncs["offload"] if "offload.py" in s.where], syncs["offload"]


def test_mlp_chunk_rows():
    """One chunk up to MLP_CHUNK_BYTES per [rows x intermediate] tensor; beyond,
    equal chunks of whole 64-row tiles under the limit, no more of them than needed."""
    I, dtype = 14336, torch.bfloat16
    limit = block_buffers.MLP_CHUNK_BYTES // (I * 2)
    limit -= limit % block_buffers.MLP_CHUNK_ALIGN
    for tokens in (1, 24, 2048, 8192, limit):
        assert block_buffers.mlp_chunk_rows(tokens, I, dtype) == tokens
    for tokens in (limit + 1, 100_000, 400_000, 641_024):
        rows = block_buffers.mlp_chunk_rows(tokens, I, dtype)
        assert rows % block_buffers.MLP_CHUNK_ALIGN == 0 and rows * I * 2 <= block_buffers.MLP_CHUNK_BYTES
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


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_saved_holds_what_block_buffers_declares(tmp_path, strategy):
    """Each layer's Saved holds exactly the fields block_buffers.SAVED_BY_POLICY declares
    for its policy (an offloaded input is on the host, not in Saved), and a kept
    layer's tensors have the bytes per token row the planner counts them at
    (replay.row_bytes, from the same declarations)."""
    from anita_core.memory.replay import row_bytes
    model = tiny_model(tmp_path, 2, 0.3)
    ids, _ = random_batch(model.config, 2, 24)
    model.set_layer_strategies(strategy)
    with use_backend("torch"):      # the same Saved whatever the kernels' backend
        _, state = model.forward_hidden(ids)
    declared = set(block_buffers.SAVED_BY_POLICY[strategy])
    for saved in state.saved:
        held = {f.name for f in dataclasses.fields(saved)
                if f.name != "policy" and getattr(saved, f.name) not in (None, [])}
        assert held == declared, (strategy, held ^ declared)
    if strategy != "keep":
        return
    T, rows = ids.numel(), row_bytes(model.config, shape_for_model(model, 2, 24))

    def per_row(t, rows=T):
        return t.numel() * t.element_size() // rows
    s = state.saved[0]
    q, k, v, out, lse, _ = s.attention
    for key, tensors in (("h", (s.h0, s.h1)), ("x", (s.x1, s.x2)), ("rstd", (s.rstd1, s.rstd2)),
                         ("q", (s.qr,)), ("kv", (k, v)), ("attn", (out, s.a)), ("lse", (lse,))):
        assert [per_row(t) for t in tensors] == [rows[key]] * len(tensors), key
    chunk = s.mlp_chunks[0]
    assert [per_row(t, t.shape[0]) for t in (chunk.g, chunk.u, chunk.m)] == [rows["inter"]] * 3
