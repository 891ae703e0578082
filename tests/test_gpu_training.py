"""Whole training steps on a GPU: anita against transformers + PEFT at LLaMA-3-8B layer
shapes in bf16 (the dequantize path at seq 2048, the fused path at seq 160), the
offload strategy against recompute, and the memory planner's prediction against
torch.cuda.max_memory_allocated. Each check is a function of the device and dtype;
the `gpu` tests run it at 8B layer shapes (2 layers, hidden 4096, MLP 14336, 32 / 8
heads of 128, vocabulary 128256) and test_*_runs_on_the_cpu at the bundled tiny shapes,
so the checking code itself runs in every CI run (on the torch backend there: the
kernels have their own tests, and the interpreter would cost a minute).

Tolerance of the step against transformers + PEFT: both frameworks compute in bf16 with
fp32 accumulation and round in different places, so neither equals the other to a
derived bound; both are compared with the same model in fp32 (on the CPU: float64) as
the reference, and anita's error there must be at most twice PEFT's own error, plus the
bound of the fp32 sums over the step's T tokens that both accumulate the loss and every
LoRA gradient in (gamma_T <= T u_fp32, relative to ||ref||: a floor for when PEFT's own
error is near zero by chance), for the loss and for every LoRA gradient. Twice: the two implementations round different intermediates (anita keeps the LoRA
rank-r products in bf16 on a GPU, PEFT upcasts them to fp32), which is not a worse
result; an error beyond twice the peer's is. A wrong mask, position, scale or transpose
moves results by orders of magnitude more than either rounding.
"""
from __future__ import annotations

import pytest
import torch

from anita_core.lora import LoRAAdapters, LoRAConfig
from anita_core.model import QLoRALlama
from anita_core.model.ops import use_backend
from anita_core.memory.offload import HostOffload
from anita_core.memory.planner import activation_peak, allocator_peak, shape_for_model
from anita_core.model.weights import ATTENTION_PROJECTIONS, PROJECTIONS, BaseWeights, LayerWeights
from csrc_triton import nf4_dequantize, nf4_quantize
from tests.test_model_vs_hf import peft_lora_modules

GPU = "cuda"


def llama3_8b_layers(layers: int = 2):
    from bench.shapes import LLAMA3_8B
    return LLAMA3_8B.model_config(layers=layers)


def tiny_layers():
    from bench.shapes import SMOKE
    return SMOKE.model_config(layers=2)


def random_pair(config, device, dtype, seed=0, rank=16):
    """(anita QLoRALlama in ``dtype``, fp32 weights of the same model): random projections
    quantized to NF4 by anita, the decoded NF4 values as the dense weights for
    transformers, random norms / embedding / lm_head, LoRA with non-zero B."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h, v = config.hidden_size, config.vocab_size

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)
    dense = {"embed": randn(v, h), "lm_head": randn(v, h, scale=h ** -0.5), "norm": 1 + 0.1 * randn(h),
             "layers": []}
    layers = []
    from anita_core.model.config import projection_shapes
    for _ in range(config.num_hidden_layers):
        quantized = {name: nf4_quantize(randn(*shape, scale=shape[1] ** -0.5).to(dtype), 64,
                                        double_quant=True)
                     for name, shape in projection_shapes(config).items()}
        norms = (1 + 0.1 * randn(h), 1 + 0.1 * randn(h))
        dense["layers"].append({"norms": norms, **{n: nf4_dequantize(q, torch.float32)
                                                   for n, q in quantized.items()}})
        layers.append(LayerWeights(norms[0].to(dtype), norms[1].to(dtype), quantized))
    base = BaseWeights(dense["embed"].to(dtype), layers, dense["norm"].to(dtype),
                       dense["lm_head"].to(dtype))
    adapters = LoRAAdapters.init(LoRAConfig(r=rank, alpha=2.0 * rank, dropout=0.0, seed=seed,
                                            target_modules=PROJECTIONS), config, device=device)
    with torch.no_grad():
        for layer in range(config.num_hidden_layers):
            for name in PROJECTIONS:
                _, b = adapters.get(layer, name)
                b.copy_(randn(*b.shape, scale=0.05))
    # a HostOffload for the tests that offload (the trainer's plan hands one in)
    model = QLoRALlama(config, base, adapters, activation_stash=HostOffload(device)).train()
    return model, dense


def hf_peft_model(config, dense, adapters, device, dtype):
    """transformers LlamaForCausalLM (SDPA) holding ``dense`` in ``dtype`` with PEFT LoRA
    (fp32 adapters) holding anita's A and B."""
    import peft
    import transformers
    with torch.device(device):
        hf = transformers.LlamaForCausalLM._from_config(
            transformers.LlamaConfig(**config.to_hf_dict()), dtype=torch.float32,
            attn_implementation="sdpa")
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(dense["embed"])
        hf.lm_head.weight.copy_(dense["lm_head"])
        hf.model.norm.weight.copy_(dense["norm"])
        for layer, weights in zip(hf.model.layers, dense["layers"]):
            layer.input_layernorm.weight.copy_(weights["norms"][0])
            layer.post_attention_layernorm.weight.copy_(weights["norms"][1])
            for name in PROJECTIONS:
                parent = layer.self_attn if name in ATTENTION_PROJECTIONS else layer.mlp
                getattr(parent, name).weight.copy_(weights[name])
    hf.config.use_cache = False
    model = peft.get_peft_model(hf, peft.LoraConfig(
        r=adapters.config.r, lora_alpha=adapters.config.alpha, lora_dropout=0.0,
        target_modules=list(PROJECTIONS), bias="none", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for layer in range(config.num_hidden_layers):
            for name in PROJECTIONS:
                a, b = adapters.get(layer, name)
                hf_a, hf_b = peft_lora_modules(model, layer, name)
                hf_a.copy_(a)
                hf_b.copy_(b)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(dtype)
    return model.train()


def hf_loss_and_grads(model, ids, config):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {}
    for layer in range(config.num_hidden_layers):
        for name in PROJECTIONS:
            a, b = peft_lora_modules(model, layer, name)
            grads[(layer, name)] = (a.grad.double(), b.grad.double())
    return loss.detach().double(), grads


def anita_loss_and_grads(model, ids):
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    n = int((targets != -100).sum())
    loss_sum, _ = model.train_step(ids, targets, grad_scale=1.0 / n)
    grads = {key: (pair[0].grad.double(), pair[1].grad.double())
             for key in model.adapters.adapted() for pair in [model.adapters.get(*key)]}
    return (loss_sum / n).detach().double(), grads


def check_step_against_hf(config, seq, *, device, dtype, reference_dtype, seed=0):
    model, dense = random_pair(config, device, dtype, seed)
    ids = torch.randint(0, config.vocab_size, (1, seq),
                        generator=torch.Generator().manual_seed(seed)).to(device)
    reference = hf_peft_model(config, dense, model.adapters, device, reference_dtype)
    ref_loss, ref_grads = hf_loss_and_grads(reference, ids, config)
    del reference
    peer = hf_peft_model(config, dense, model.adapters, device, dtype)
    peer_loss, peer_grads = hf_loss_and_grads(peer, ids, config)
    del peer
    loss, grads = anita_loss_and_grads(model, ids)
    gamma_t = seq * torch.finfo(torch.float32).eps / 2

    def within(name, ours, theirs, ref):
        ours_err, peer_err = float((ours - ref).norm()), float((theirs - ref).norm())
        bound = 2 * peer_err + gamma_t * float(ref.norm())
        assert ours_err <= bound, (f"{name}: anita's error {ours_err:.3g} > 2 x transformers+PEFT's "
                                   f"{peer_err:.3g} + gamma_T |ref| ({bound:.3g})")
    within("loss", loss, peer_loss, ref_loss)
    for key, (ref_a, ref_b) in ref_grads.items():
        within(f"{key} dA", grads[key][0], peer_grads[key][0], ref_a)
        within(f"{key} dB", grads[key][1], peer_grads[key][1], ref_b)


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [2048, 160], ids=["dequant-path", "fused-path"])
def test_gpu_bf16_training_step_matches_transformers_peft_at_8b_layer_shapes(seq):
    torch.backends.cuda.matmul.allow_tf32 = False      # the fp32 reference in true fp32
    check_step_against_hf(llama3_8b_layers(), seq, device=GPU, dtype=torch.bfloat16,
                          reference_dtype=torch.float32)


def test_step_against_hf_check_runs_on_the_cpu():
    # the torch backend: the checking code is rehearsed here, the kernels have their own tests
    with use_backend("torch"):
        check_step_against_hf(tiny_layers(), 16, device="cpu", dtype=torch.float32,
                              reference_dtype=torch.float64)


def check_offload_equals_recompute(config, seq, device, dtype):
    """Offloaded block inputs travel to pinned host memory and back unchanged: the same
    loss and the same gradients, bit for bit, as recomputing from device-held inputs."""
    results = []
    for strategy in ("recompute", "offload"):
        model, _ = random_pair(config, device, dtype, seed=3)
        model.set_layer_strategies([strategy] * config.num_hidden_layers)
        ids = torch.randint(0, config.vocab_size, (1, seq),
                            generator=torch.Generator().manual_seed(3)).to(device)
        results.append((anita_loss_and_grads(model, ids), model))
    (loss_r, grads_r), _ = results[0]
    (loss_o, grads_o), offloading = results[1]
    assert torch.equal(loss_r, loss_o)
    for key in grads_r:
        assert torch.equal(grads_r[key][0], grads_o[key][0]) and \
            torch.equal(grads_r[key][1], grads_o[key][1]), key
    return offloading


@pytest.mark.gpu
def test_gpu_offload_path_equals_recompute_and_pins_host_memory():
    model = check_offload_equals_recompute(llama3_8b_layers(), 2048, GPU, torch.bfloat16)
    host = model.activation_stash.host_tensors()
    assert host and all(t.is_pinned() and t.device.type == "cpu" for t in host)


def test_offload_check_runs_on_the_cpu():
    with use_backend("torch"):
        check_offload_equals_recompute(tiny_layers(), 16, "cpu", torch.float32)


@pytest.mark.gpu
def test_gpu_offload_pins_exactly_the_planned_host_bytes():
    """On a GPU the pool is page-locked (cudaHostRegister) at exactly the planner's host
    figure: one registration, nothing from torch's pinned allocator (which would round
    each request up to a power of two) during a step, and the offloaded step gives the
    recomputing step's loss bit for bit (8B layer shapes, 3 layers, 1024 tokens)."""
    from tests.test_memory_plan import offload_two_of_three, random_batch
    model, dense = random_pair(llama3_8b_layers(3), "cuda", torch.bfloat16, seed=7)
    del dense
    ids, targets = (t.cuda() for t in random_batch(model.config, 1, 1024))
    model.set_layer_strategies("recompute")
    reference = model.train_step(ids, targets)[0]
    plan = offload_two_of_three(model, 1, 1024)
    model.set_layer_strategies(plan.strategies)
    model.train_step(ids, targets)                  # the pool is made here
    torch.cuda.synchronize()
    before = torch.cuda.host_memory_stats()
    loss, _ = model.train_step(ids, targets)
    torch.cuda.synchronize()
    after = torch.cuda.host_memory_stats()
    pool = model.activation_stash.pool
    assert pool.allocations == 1 and pool.nbytes == plan.host_bytes
    assert pool.buffer.is_pinned()
    for key in ("allocated_bytes.current", "num_host_alloc"):
        if key in before:
            assert after[key] == before[key], (key, before[key], after[key])
    assert torch.equal(loss, reference)


def measured_activation_bytes(model, strategy, ids, targets, optimizer):
    """torch.cuda.max_memory_allocated over one train_step + optimizer step, less what was
    allocated before it (weights, LoRA, grads, AdamW state, RoPE tables, cuBLAS' workspaces,
    the batch): the step's own bytes. A first step makes the AdamW state and the tables."""
    model.set_layer_strategies([strategy] * model.config.num_hidden_layers)

    def step():
        model.train_step(ids, targets, grad_scale=1.0 / ids.numel())
        optimizer.step()
    step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - resident


def check_activation_prediction(config, seq, device, measure):
    """The planner's activation peak against the measured one, per strategy: never under
    what the allocator may count for the replayed tensors (allocator_peak: each block
    rounded to 512 bytes, up to 1 MiB more above 1 MiB), never over activation_peak by
    more than 10% (the planner may count a little more than a step holds, e.g. the batch
    made before the step; on the CPU tracker that is 40 bytes a token, tests/
    test_memory_plan.py). With 3 layers an offloading step keeps one layer input fewer
    on the device than a recomputing one (2 arrive during the backward, 3 wait there),
    so the offload case checks more than recompute does: the planner says T x hidden x 2
    bytes less, and the step uses less."""
    model, dense = random_pair(config, device, torch.bfloat16 if device == GPU else torch.float32,
                               seed=5)
    del dense
    optimizer = torch.optim.AdamW(model.adapters.parameters(), lr=1e-4, fused=device == GPU)
    ids = torch.randint(0, config.vocab_size, (1, seq), device=device)
    targets = torch.roll(ids, -1, dims=1)
    shape = shape_for_model(model, 1, seq)
    L = config.num_hidden_layers
    predicted, measured = {}, {}
    for strategy in ("keep", "recompute", "offload"):
        predicted[strategy] = activation_peak(config, shape, [strategy] * L)
        bound = allocator_peak(config, shape, [strategy] * L)
        measured[strategy] = measure(model, strategy, ids, targets, optimizer)
        print(f"{strategy}: measured {measured[strategy]} predicted {predicted[strategy]} "
              f"ratio {predicted[strategy] / measured[strategy]:.3f} allocator bound {bound}")
        assert measured[strategy] <= bound, (strategy, measured[strategy], bound)
        assert predicted[strategy] <= 1.10 * measured[strategy], (strategy, predicted[strategy])
    hidden_bytes = seq * config.hidden_size * shape.dtype.itemsize
    assert predicted["recompute"] - predicted["offload"] == hidden_bytes
    assert measured["offload"] < measured["recompute"] < measured["keep"]
    return predicted, measured


@pytest.mark.gpu
def test_gpu_planner_activation_peak_against_max_memory_allocated():
    """At 8B layer shapes, 3 layers, seq 4096 (activations 1.3-2.1 GiB, the static bytes
    2.4 GiB that a total would hide them in): the measured activation bytes of each
    strategy within the planner's bounds (check_activation_prediction)."""
    check_activation_prediction(llama3_8b_layers(3), 4096, GPU, measured_activation_bytes)


def test_planner_check_inputs_build_on_the_cpu():
    """The GPU planner test's model, predictions and assertions, at tiny shapes on the
    CPU, with the 'measurement' replaced by the replay's own allocator bound."""
    def replayed(model, strategy, ids, targets, optimizer):
        shape = shape_for_model(model, *ids.shape)
        return allocator_peak(model.config, shape, [strategy] * model.config.num_hidden_layers)
    from bench.shapes import SMOKE
    config = SMOKE.model_config(layers=3)
    with use_backend("torch"):
        check_activation_prediction(config, 24, "cpu", replayed)
