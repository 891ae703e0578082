"""The two models bench/train.py trains, built the same way from either a shape
(random weights, no download) or a local HF checkpoint.

anita: QLoRALlama with NF4 projections. Random weights are built directly as
  NF4 storage, layer by layer on the device: random packed nibbles (uniform
  over the 16 codes) and per-block scales 1.93 / sqrt(in_features) * U(1, 1.1)
  (uniform codes have rms 0.517, so each weight row has rms ~1/sqrt(in): unit-
  scale projection outputs), double-quantized with anita's own kernel. No
  full-precision copy of a projection ever exists, so building the 8B shape
  takes seconds and ~6 GB. Step time does not depend on the weights' values.
hf: transformers LlamaForCausalLM (SDPA attention, gradient checkpointing,
  use_reentrant=False) with bitsandbytes Linear4bit NF4 projections (double
  quantization like anita's) and PEFT LoRA on the same projections. Random
  weights: transformers' own initialization in the compute dtype, then every
  projection is swapped for a Linear4bit quantized from it, one at a time.

hf + Liger: the same, with Liger-Kernel's RMSNorm, RoPE, SwiGLU and fused linear
  cross-entropy applied to the model (liger_kernel.transformers.apply_liger_kernel_to_llama
  with model=, before PEFT wraps it), as a Liger user trains.

Both keep LoRA weights in fp32, take AdamW (fused on CUDA) over them, and use
the same rank, alpha and dropout. With random weights both hold the same base model:
the hf build takes anita's random NF4 weights (same seed), handed to bitsandbytes bit
for bit (NF4Weight.to_bnb), and anita's embedding, norms and lm_head, so the two compute
the same function and their losses before any update agree up to rounding
(bench/train_checks.py). A step clears the gradients before its backward, not after its
update, so the last step's LoRA gradients can be read once after timing
(``lora_named_parameters``); ``reset()`` puts the LoRA back to its init (B = 0) and
starts a fresh optimizer.

DPO (``Trainable.dpo``): one step of the policy on chosen and rejected rows against
reference log-probs computed once beforehand (untimed), beta 0.1, sigmoid loss. anita
runs its own DPOObjective with a precomputed reference store (as train_dpo.py does);
hf runs the concatenated chosen + rejected forward TRL's DPOTrainer runs (per-token
log-softmax in fp32, summed per sequence) with the reference from the adapters disabled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from anita_core.model.config import ModelConfig, projection_shapes
from anita_core.lora import LoRAAdapters, LoRAConfig
from anita_core.model import QLoRALlama
from anita_core.hf import load_model
from anita_core.model.weights import ATTENTION_PROJECTIONS, PROJECTIONS, BaseWeights, LayerWeights
from bench import peers
from bench.cases import Unavailable
from csrc_triton import NF4Weight
from csrc_triton.nf4_encode import launch_nested_quantize

IGNORE_INDEX = -100
# rms of the NF4 code over uniformly random nibbles: sqrt(mean(code^2)) = 0.517
_UNIFORM_CODE_RMS = 0.517


@dataclass
class Trainable:
    """A built model: ``step(input_ids)`` runs one full training step (forward,
    backward, optimizer) and returns the loss as a float-able tensor;
    ``dpo(chosen, rejected)`` precomputes the reference (untimed) and returns the
    zero-argument DPO step; ``predicted_peak(rows, seq)`` is the memory planner's
    predicted peak bytes of a step on [rows, seq] (anita only);
    ``lora_named_parameters()`` the LoRA tensors (names with lora_A / lora_B), whose
    .grad hold the last step's gradients; ``reset()`` LoRA init and a fresh optimizer."""
    framework: str
    config: ModelConfig
    step: Callable[[torch.Tensor], torch.Tensor]
    lora_parameters: int
    release: Callable[[], None]
    dpo: Optional[Callable[[torch.Tensor, torch.Tensor], Callable[[], torch.Tensor]]] = None
    predicted_peak: Optional[Callable[[int, int], int]] = None
    lora_named_parameters: Optional[Callable[[], List[Tuple[str, torch.Tensor]]]] = None
    reset: Optional[Callable[[], None]] = None


def random_nf4_weight(shape, blocksize: int, double_quant: bool, dtype: torch.dtype,
                      device, generator: torch.Generator) -> NF4Weight:
    """An NF4 weight with random codes and scales (see the module docstring)."""
    out_features, in_features = shape
    numel = out_features * in_features
    n_blocks = -(-numel // blocksize)
    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, device=device,
                           generator=generator)
    scale = 1.0 / (_UNIFORM_CODE_RMS * math.sqrt(in_features))
    absmax = scale * (1.0 + 0.1 * torch.rand(n_blocks, device=device, generator=generator))
    nested = {}
    if double_quant:
        absmax, nested_absmax, nested_code, offset = launch_nested_quantize(absmax.contiguous())
        nested = dict(nested_absmax=nested_absmax, nested_code=nested_code, nested_offset=offset)
    return NF4Weight(packed=packed, absmax=absmax, shape=torch.Size(shape), blocksize=blocksize,
                     dtype=dtype, **nested).validate("random_nf4_weight")


def random_base_weights(config: ModelConfig, dtype: torch.dtype, device, blocksize: int,
                        double_quant: bool, seed: int) -> BaseWeights:
    generator = torch.Generator(device=device).manual_seed(seed)
    h, v = config.hidden_size, config.vocab_size
    shapes = projection_shapes(config)

    def dense(rows, cols, scale):
        return (torch.randn(rows, cols, device=device, generator=generator) * scale).to(dtype)

    layers = []
    for _ in range(config.num_hidden_layers):
        projections = {name: random_nf4_weight(shapes[name], blocksize, double_quant, dtype,
                                               device, generator) for name in PROJECTIONS}
        # a family's extras (model/families.py): q/k/v biases, per-head q/k norm weights
        biases = ({name: dense(shapes[name][0], 1, 0.02).view(-1) for name in ("q_proj", "k_proj", "v_proj")}
                  if config.qkv_bias else {})
        norms = ({n: torch.ones(config.head_dim, device=device, dtype=dtype) for n in ("q_norm", "k_norm")}
                 if config.qk_norm else {})
        layers.append(LayerWeights(input_layernorm=torch.ones(h, device=device, dtype=dtype),
                                   post_attention_layernorm=torch.ones(h, device=device, dtype=dtype),
                                   projections=projections, biases=biases, **norms))
    return BaseWeights(embed_tokens=dense(v, h, 1.0), layers=layers,
                       norm=torch.ones(h, device=device, dtype=dtype),
                       lm_head=dense(v, h, h ** -0.5))


def _shifted_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """targets[t] = input_ids[t + 1]; the last position has no target."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]
    return targets


def _adamw(params: List[torch.Tensor], device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, fused=torch.device(device).type == "cuda")


def build_anita(config: ModelConfig, lora: LoRAConfig, *, dtype, device, checkpoint=None,
                blocksize: int = 64, double_quant: bool = True, seed: int = 0) -> Trainable:
    if checkpoint is not None:
        model = load_model(checkpoint, compute_dtype=dtype, device=device,
                                           blocksize=blocksize, double_quant=double_quant)
        config = model.config
    else:
        base = random_base_weights(config, dtype, device, blocksize, double_quant, seed)
        model = QLoRALlama(config, base, None)
    adapters = LoRAAdapters.init(lora, config, device=device)
    model.adapters = adapters
    model.train()
    optimizer = _adamw(adapters.parameters(), device)

    def step(input_ids: torch.Tensor) -> torch.Tensor:
        targets = _shifted_targets(input_ids)
        # every position but the last has a target; known without a device sync
        n_targets = max(1, input_ids.shape[0] * (input_ids.shape[1] - 1))
        optimizer.zero_grad(set_to_none=True)
        loss_sum, _ = model.train_step(input_ids, targets, grad_scale=1.0 / n_targets)
        optimizer.step()
        return loss_sum / n_targets

    def dpo(chosen: torch.Tensor, rejected: torch.Tensor):
        from anita_core.train.objectives import DPOObjective
        from anita_core.train.reference_logprobs import compute_reference_logps
        batch = _dpo_batch(chosen, rejected)
        objective = DPOObjective(model, beta=DPO_BETA)
        objective.reference_store = compute_reference_logps(objective, [batch], chosen.shape[0],
                                                            progress=False)

        def dpo_step() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            sums = objective.micro_step(batch, grad_scale=1.0 / chosen.shape[0])
            optimizer.step()
            return torch.tensor(sums["loss"] / chosen.shape[0])
        return dpo_step

    def predicted_peak(rows: int, seq: int) -> int:
        from anita_core.memory.planner import activation_peak, shape_for_model, static_bytes
        shape = shape_for_model(model, rows, seq)
        return static_bytes(model.config, shape) + activation_peak(model.config, shape,
                                                                   model.strategies())

    def reset():
        nonlocal optimizer
        fresh = LoRAAdapters.init(lora, config, device=device)
        with torch.no_grad():
            for mine, init in zip(adapters.parameters(), fresh.parameters()):
                mine.copy_(init)
        adapters.zero_grad(set_to_none=True)
        optimizer = _adamw(adapters.parameters(), device)

    def release():
        nonlocal model, optimizer
        model = optimizer = None

    return Trainable("anita", config, step, adapters.num_parameters(), release, dpo,
                     predicted_peak, lambda: list(adapters.named_parameters()), reset)


DPO_BETA = 0.1


def _dpo_batch(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """What indexed_dpo_batches makes of [pairs, seq] chosen and rejected rows (unpadded)."""
    from anita_core.train.reference_logprobs import INDEX_KEY
    return {"chosen": {"input_ids": chosen, "targets": _shifted_targets(chosen)},
            "rejected": {"input_ids": rejected, "targets": _shifted_targets(rejected)},
            INDEX_KEY: torch.arange(chosen.shape[0])}


def _sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum over real targets of log softmax(logits)[target], per row (fp32), as TRL."""
    valid = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1).gather(
        -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * valid).sum(dim=1)


def _hf_modules():
    try:
        import bitsandbytes as bnb
        import peft
        import transformers
    except Exception as err:  # any of the three missing or broken
        raise Unavailable(f"transformers + PEFT + bitsandbytes not importable "
                          f"({type(err).__name__}: {err}){peers.not_installed_note('bitsandbytes')}"
                          ) from None
    return bnb, peft, transformers


def _take_base_weights(model, base: BaseWeights, bnb, dtype) -> None:
    """Put anita's base weights into the transformers model: embedding, norms and lm_head
    copied, every projection swapped for a bitsandbytes Linear4bit holding the same NF4
    codes, scales and double-quantization constants (NF4Weight.to_bnb: bit for bit, no
    quantization), so both frameworks dequantize the same values."""
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(base.embed_tokens)
        model.lm_head.weight.copy_(base.lm_head)
        model.model.norm.weight.copy_(base.norm)
        for layer, weights in zip(model.model.layers, base.layers):
            layer.input_layernorm.weight.copy_(weights.input_layernorm)
            layer.post_attention_layernorm.weight.copy_(weights.post_attention_layernorm)
            for n in ("q_norm", "k_norm"):
                if getattr(weights, n) is not None:
                    getattr(layer.self_attn, n).weight.copy_(getattr(weights, n))
            for name in PROJECTIONS:
                parent = layer.self_attn if name in ATTENTION_PROJECTIONS else layer.mlp
                linear, nf4 = getattr(parent, name), weights.projections[name]
                packed, state = nf4.to_bnb()
                bias = weights.biases.get(name)
                quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features,
                                              bias=bias is not None,
                                              compute_dtype=dtype, quant_type="nf4",
                                              compress_statistics=nf4.double_quant, device="meta")
                quantized.weight = bnb.nn.Params4bit(
                    packed, requires_grad=False, quant_state=state, blocksize=nf4.blocksize,
                    compress_statistics=nf4.double_quant, quant_type="nf4", bnb_quantized=True,
                    module=quantized)
                if bias is not None:
                    quantized.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
                setattr(parent, name, quantized)
                del linear


def _apply_liger(model, device) -> None:
    if torch.device(device).type != "cuda":
        raise Unavailable("Liger-Kernel runs only on a CUDA GPU (its Triton kernels fail under "
                          "the interpreter on a CPU)")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except Exception as err:  # noqa: BLE001
        raise Unavailable(f"liger-kernel not importable ({type(err).__name__}: {err})"
                          f"{peers.not_installed_note('liger-kernel')}") from None
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True, model=model)


def build_hf(config: ModelConfig, lora: LoRAConfig, *, dtype, device, checkpoint=None,
             blocksize: int = 64, double_quant: bool = True, seed: int = 0,
             liger: bool = False) -> Trainable:
    if liger and torch.device(device).type != "cuda":
        _apply_liger(None, device)               # the reason, before anything is built
    bnb, peft, transformers = _hf_modules()
    torch.manual_seed(seed)
    if checkpoint is not None:
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            checkpoint, quantization_config=quantization, dtype=dtype,
            attn_implementation="sdpa", device_map={"": torch.device(device)})
        config = ModelConfig.from_dict(model.config.to_dict(), source=str(checkpoint))
    else:
        hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
        with torch.device(device):   # the family's own class (LlamaForCausalLM, Qwen3ForCausalLM, ...)
            model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype,
                                                                  attn_implementation="sdpa")
        # anita's random model (same seed), so both frameworks train the same function
        _take_base_weights(model, random_base_weights(config, dtype, device, blocksize,
                                                      double_quant, seed), bnb, dtype)
    model.config.use_cache = False
    if liger:
        _apply_liger(model, device)
    # Recent transformers renamed it; older 5.x (the GPU machine's) has only the old name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                  target_modules=list(lora.target_modules), bias="none",
                                  task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, peft_config)
    model.train()   # from_pretrained returns eval mode (see NOTES.md: bnb CPU repacking trap)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _adamw(params, device)

    def step(input_ids: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    def dpo(chosen: torch.Tensor, rejected: torch.Tensor):
        stacked = torch.cat([chosen, rejected])
        targets = _shifted_targets(stacked)
        with torch.no_grad(), model.disable_adapter():
            reference = _sequence_logps(model(input_ids=stacked).logits, targets)
        ref_chosen, ref_rejected = reference.chunk(2)

        def dpo_step() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            policy_chosen, policy_rejected = _sequence_logps(
                model(input_ids=stacked).logits, targets).chunk(2)
            margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
            loss = -torch.nn.functional.logsigmoid(DPO_BETA * margin).mean()
            loss.backward()
            optimizer.step()
            return loss.detach()
        return dpo_step

    def named():
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def reset():
        """PEFT's init_lora_weights=True: A Kaiming-uniform (a = sqrt 5), B zero."""
        nonlocal optimizer
        with torch.no_grad():
            for n, p in named():
                if "lora_B" in n:
                    p.zero_()
                elif "lora_A" in n:
                    torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                p.grad = None
        optimizer = _adamw(params, device)

    def release():
        nonlocal model, optimizer
        model = optimizer = None

    name = "hf_peft_bnb_liger" if liger else "hf_peft_bnb"
    return Trainable(name, config, step, sum(p.numel() for p in params), release, dpo,
                     None, named, reset)


def build_hf_liger(*args, **kwargs) -> Trainable:
    return build_hf(*args, liger=True, **kwargs)


BUILDERS = {"anita": build_anita, "hf_peft_bnb": build_hf, "hf_peft_bnb_liger": build_hf_liger}
