"""Training on 2 processes (gloo, CPU) gives the update of 1 process on the same
global batch, in both modes (data parallel and sharded base), for SFT and DPO;
a rank that stops answering ends its peer's collective within the timeout.

The 2 ranks are torch.multiprocessing children running the torch kernel
backend (ANITA_BACKEND=torch: plain PyTorch, fast on a CPU); rank 0 also runs
the single-process reference in the same child, so both sides use one backend.
Nothing from anita is imported at this module's top: a spawned child imports
this module before its backend is chosen.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch

STEPS = 3
BATCH = 2            # rows (SFT) or pairs (DPO) per micro-batch
ACCUM = 2            # per rank; the single process runs ACCUM x 2 micro-batches per step
HANG_TIMEOUT_S = 3.0
# Adapters after STEPS AdamW steps on 2 ranks vs 1 process. The only difference
# is the order in which fp32 gradients are summed (per rank, then over ranks),
# i.e. fp32 rounding (~1e-7 relative) of gradients that AdamW divides by their
# own root mean square; 1e-5 absolute on weights of size ~1e-1 leaves room for
# that and fails on any real difference (one micro-batch missing or counted
# twice moves the weights by ~learning rate = 5e-3).
ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case(ctx, objective_name: str, sharded: bool, accum: int, out_dir: Path):
    """Train STEPS steps of one objective on the bundled tiny model; the adapters."""
    from anita_core.assets import sample_path
    from anita_core.data import (DPODataConfig, SFTDataConfig, build_dpo_data, build_sft_data,
                                 dpo_batches, load_tokenizer, sft_batches)
    from anita_core.hf import load_model
    from anita_core.lora import LoRAAdapters, LoRAConfig
    from anita_core.cli.common import BUNDLED_MODEL
    from anita_core.train.distributed import layer_nf4_weights, setup_model
    from anita_core.train.objectives import DPOObjective, SFTObjective
    from anita_core.train.trainer import TrainConfig, Trainer
    tokenizer = load_tokenizer(BUNDLED_MODEL)
    model = load_model(BUNDLED_MODEL, progress=False, dropout_seed=7)
    model.adapters = LoRAAdapters.init(LoRAConfig(r=4, alpha=8, dropout=0.0, seed=3), model.config)
    if objective_name == "sft":
        data = build_sft_data(SFTDataConfig(sample_path("instruction"), max_seq_length=48,
                                            max_samples=40, seed=0), tokenizer)
        batches = sft_batches(data.train, batch_size=BATCH, seq_len=48, pad_id=tokenizer.pad_id,
                              shuffle_seed=100)
        objective = SFTObjective(model)
    else:
        data = build_dpo_data(DPODataConfig(sample_path("dpo"), max_length=48, max_prompt_length=24,
                                            max_samples=30, seed=0), tokenizer)
        batches = dpo_batches(data.train, batch_size=BATCH, pad_id=tokenizer.pad_id, shuffle_seed=100)
        objective = DPOObjective(model, beta=0.1)
    assert len(batches) >= STEPS * ACCUM * 2, len(batches)
    grads = setup_model(ctx, model, model.adapters, sharded_base=sharded, bucket_bytes=4096)
    config = TrainConfig(output_dir=str(out_dir / f"{objective_name}-{sharded}-{ctx.world_size}"),
                         learning_rate=5e-3, gradient_accumulation_steps=accum, max_steps=STEPS,
                         progress=False, lr_scheduler="constant")
    # 3 eval batches: split 2 + 1 over the ranks in the data-parallel mode
    trainer = Trainer(model, model.adapters, objective, lambda epoch: batches, config,
                      eval_batches=batches[-3:], log=lambda m: None, dist=ctx, grad_buckets=grads,
                      split_eval=not sharded)
    for _ in range(STEPS):
        trainer._train_one_step()
    if ctx.active:
        # each layer's LoRA gradients (~18 KB, over the 4 KB bucket) were all-reduced from the
        # hook at the end of that layer's backward: layer 1's while layer 0's backward ran
        n_layers = len(model.base.layers)
        assert grads.launches_in_backward == grads.launches == n_layers * STEPS, grads.launches
    if sharded:
        # between uses this rank holds only its share (1/world) of every layer's NF4 tensors
        sharded_base = model.layer_hooks.sharded
        whole = sum(e[4] for layer in sharded_base.layers for e in layer.entries)
        assert whole // ctx.world_size <= sharded_base.shard_bytes() <= whole // ctx.world_size + 64
        assert all(w.packed.numel() == 0 and w.absmax.numel() == 0
                   for layer in model.base.layers for w in layer_nf4_weights(layer))
    result = {name: t.detach().clone() for name, t in model.adapters.named_parameters()}
    result.update({k: torch.tensor([v], dtype=torch.float64) for k, v in trainer._evaluate().items()})
    return result


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(ANITA_BACKEND="torch", RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from anita_core.train.distributed import (SINGLE, DistributedError, all_reduce_sums,
                                              init_from_env)
    out = Path(out_dir)
    ctx = init_from_env(timeout_s=60)
    assert (ctx.rank, ctx.world_size, ctx.backend) == (rank, world, "gloo")
    for objective in ("sft", "dpo"):
        for sharded in (False, True):
            adapters = _case(ctx, objective, sharded, ACCUM, out)
            save_file(adapters, str(out / f"{objective}-{'sharded' if sharded else 'dp'}-rank{rank}.safetensors"))
    if rank == 0:
        for objective in ("sft", "dpo"):
            save_file(_case(SINGLE, objective, False, ACCUM * world, out),
                      str(out / f"{objective}-single.safetensors"))
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()

    # a rank that stops answering: the other's collective fails within the timeout
    os.environ["MASTER_PORT"] = str(port + 1)
    ctx = init_from_env(timeout_s=HANG_TIMEOUT_S)
    if rank == 1:
        time.sleep(3 * HANG_TIMEOUT_S)
        return
    started = time.perf_counter()
    try:
        all_reduce_sums(ctx, [1.0])
    except DistributedError as e:
        (out / "hang.txt").write_text(f"{time.perf_counter() - started}\n{e}")


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    import torch.multiprocessing as mp
    out = tmp_path_factory.mktemp("dist")
    previous = os.environ.get("ANITA_BACKEND")
    os.environ["ANITA_BACKEND"] = "torch"      # the children's backend (inherited)
    try:
        port = free_port()
        mp.spawn(_worker, args=(2, port, str(out)), nprocs=2, join=True)
    finally:
        os.environ["ANITA_BACKEND"] = previous or "triton"
    return out


@pytest.mark.parametrize("objective", ["sft", "dpo"])
@pytest.mark.parametrize("mode", ["dp", "sharded"])
def test_two_ranks_match_one_process_on_the_same_global_batch(two_rank_results, objective, mode):
    from safetensors.torch import load_file
    single = load_file(str(two_rank_results / f"{objective}-single.safetensors"))
    ranks = [load_file(str(two_rank_results / f"{objective}-{mode}-rank{r}.safetensors"))
             for r in range(2)]
    init_b_zero = [k for k in single if "lora_B" in k]
    assert init_b_zero and all(single[k].abs().max() > 1e-3 for k in init_b_zero)   # it trained
    worst = 0.0
    evals = [k for k in single if k.startswith("eval_")]
    assert "eval_loss" in evals
    for name, expected in single.items():
        for r, got in enumerate(ranks):
            assert torch.isfinite(got[name]).all()
            diff = (got[name] - expected).abs().max().item()
            worst = max(worst, diff) if name not in evals else worst
            # eval metrics (a mean over 3 batches, of order 1-10): fp32 rounding, relative
            tolerance = ATOL if name not in evals else 1e-5 * max(1.0, expected.abs().item())
            assert diff <= tolerance, f"{objective}/{mode} rank {r} {name}: max |diff| {diff:.3g}"
        assert torch.equal(ranks[0][name], ranks[1][name])      # replicated adapters stay equal
    print(f"{objective}/{mode}: max |2 ranks - 1 process| over the adapters = {worst:.3g}")


def test_a_rank_that_stops_answering_ends_the_collective_within_the_timeout(two_rank_results):
    report = (two_rank_results / "hang.txt").read_text().splitlines()
    waited = float(report[0])
    assert waited < HANG_TIMEOUT_S + 5, waited
    assert "--collective-timeout 3 s" in report[1] and "rank 0" in report[1]


def test_sharding_finds_every_nf4_field_and_gathers_the_bytes_back_exactly():
    """Any NF4Weight a LayerWeights-like dataclass holds (a field of its own, as a
    fused q/k/v weight would be, or inside a dict) is cut into world shards whose
    gathered bytes rebuild every tensor exactly (odd sizes, uint8 and fp32 fields);
    the all-gather is stood in for by concatenating the two ranks' shards."""
    from dataclasses import dataclass, field
    from anita_core.train.distributed import DistContext, ShardedBase, layer_nf4_weights
    from csrc_triton import NF4Weight

    @dataclass
    class FusedLayer:
        norm: torch.Tensor
        qkv: NF4Weight
        projections: dict = field(default_factory=dict)

    g = torch.Generator().manual_seed(0)

    def weight(rows, cols):
        n = rows * cols
        blocks = -(-n // 64)
        return NF4Weight(packed=torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=g),
                         absmax=torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=g),
                         shape=(rows, cols), blocksize=64, dtype=torch.float32,
                         nested_absmax=torch.rand(-(-blocks // 256), generator=g),
                         nested_code=torch.rand(256, generator=g), nested_offset=torch.tensor(0.25))

    def layers():
        g.manual_seed(0)
        return [FusedLayer(torch.ones(3), weight(7, 13), {"o_proj": weight(5, 9), "down": weight(3, 3)})]

    class Base:
        def __init__(self):
            self.layers = layers()

    expected = layers()[0]
    found = layer_nf4_weights(expected)
    assert len(found) == 3 and found[0] is expected.qkv
    bases = [Base() for _ in range(2)]
    shards = [ShardedBase(DistContext(r, 2, 0, "gloo"), b) for r, b in enumerate(bases)]
    for w in layer_nf4_weights(bases[0].layers[0]):
        assert w.packed.numel() == 0 and w.nested_code.numel() == 256   # fixed-size ones stay
    gathered = torch.cat([s.layers[0].shard for s in shards])

    class Done:
        def wait(self):
            pass
    shards[0]._install(0, Done(), gathered)
    for got, want in zip(layer_nf4_weights(bases[0].layers[0]), found):
        for name in ("packed", "absmax", "nested_absmax", "nested_code", "nested_offset"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    shards[0].free(0)
    assert all(w.packed.numel() == 0 for w in layer_nf4_weights(bases[0].layers[0]))


def test_sharded_base_gathers_each_nf4_byte_of_a_fused_layer_once():
    """A decoder layer with fused q/k/v and gate/up (LayerWeights fuses at construction;
    the per-projection weights are views into the concatenations): the shards of all
    ranks, i.e. what one all-gather of the layer moves, hold the layer's own NF4 bytes
    once, counted here from the projection shapes alone (packed nibbles N K / 2, uint8
    absmax N K / 64, fp32 nested absmax 4 per 256 blocks), plus at most world - 1 bytes
    of padding per sharded tensor. After the gather every projection decodes as before
    and is a view of its fused weight, not a second copy."""
    from anita_core.model.weights import FUSED_GROUPS, PROJECTIONS, LayerWeights
    from anita_core.train.distributed import DistContext, ShardedBase, layer_nf4_weights
    from csrc_triton import nf4_dequantize, nf4_quantize

    hidden, inter, q_rows, kv_rows, world = 64, 192, 64, 32, 2
    shapes = {"q_proj": (q_rows, hidden), "k_proj": (kv_rows, hidden), "v_proj": (kv_rows, hidden),
              "o_proj": (hidden, q_rows), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
              "down_proj": (hidden, inter)}

    def own_nf4_bytes(n, k, blocksize=64):
        blocks = n * k // blocksize
        return n * k // 2 + blocks + 4 * -(-blocks // 256)
    expected = sum(own_nf4_bytes(*shapes[p]) for p in PROJECTIONS)

    def layer():
        g = torch.Generator().manual_seed(11)
        projections = {p: nf4_quantize(torch.randn(shapes[p], generator=g), 64, double_quant=True)
                       for p in PROJECTIONS}
        return LayerWeights(torch.ones(hidden), torch.ones(hidden), projections)

    class Base:
        def __init__(self):
            self.layers = [layer()]

    decoded = {p: nf4_dequantize(w, torch.float32) for p, w in layer().projections.items()}
    bases = [Base() for _ in range(world)]
    assert set(bases[0].layers[0].fused) == set(FUSED_GROUPS)
    shards = [ShardedBase(DistContext(r, world, 0, "gloo"), b) for r, b in enumerate(bases)]
    padding = (world - 1) * len(shards[0].layers[0].entries)
    gathered = torch.cat([s.layers[0].shard for s in shards])   # what the all-gather moves
    assert expected <= gathered.numel() <= expected + padding, (gathered.numel(), expected)
    assert all(w.packed.numel() == 0 for w in layer_nf4_weights(bases[0].layers[0]))

    class Done:
        def wait(self):
            pass
    shards[0]._install(0, Done(), gathered)
    got = bases[0].layers[0]
    for p in PROJECTIONS:
        assert torch.equal(nf4_dequantize(got.projections[p], torch.float32), decoded[p]), p
    for group, members in FUSED_GROUPS.items():
        storage = got.fused[group].packed.untyped_storage().data_ptr()
        for m in members:
            assert got.projections[m].packed.untyped_storage().data_ptr() == storage, m
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for w in layer_nf4_weights(got) for t in (w.packed, w.absmax, w.nested_absmax)}
    assert sum(held.values()) == expected
    shards[0].free(0)
    assert all(w.packed.numel() == 0 and w.absmax.numel() == 0 for w in layer_nf4_weights(got))
