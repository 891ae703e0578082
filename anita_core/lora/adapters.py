"""The trainable LoRA parameters of a model: one (A [r, in], B [out, r]) pair per
adapted projection of each adapted decoder layer.

The tensors are fp32 leaves with requires_grad, whatever dtype the model
computes in: the optimizer updates these masters and the model casts them to
the compute dtype when it uses them, so small updates are not lost to bf16
rounding.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from anita_core.model.config import ModelConfig, projection_shapes
from anita_core.lora.config import LoRAConfig
from anita_core.model.weights import PROJECTIONS, projection_module_path

# PEFT names a LoRA tensor "<prefix><module path>.lora_A.weight", where the
# prefix comes from PeftModel wrapping LoraModel wrapping LlamaForCausalLM.
PEFT_KEY_PREFIX = "base_model.model."

AdapterPair = Tuple[torch.Tensor, torch.Tensor]


def peft_key(layer: int, projection: str, matrix: str) -> str:
    """PEFT's state-dict key for matrix "A" or "B" of one projection, e.g.
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    if matrix not in ("A", "B"):
        raise ValueError(f"matrix must be 'A' or 'B', got {matrix!r}")
    return f"{PEFT_KEY_PREFIX}{projection_module_path(layer, projection)}.lora_{matrix}.weight"


def adapted_layers(lora_config: LoRAConfig, model_config: ModelConfig) -> Tuple[int, ...]:
    """The decoder layers ``lora_config`` adapts in a model shaped by ``model_config``."""
    n = model_config.num_hidden_layers
    if lora_config.layers_to_transform is None:
        return tuple(range(n))
    for index in lora_config.layers_to_transform:
        if index >= n:
            raise ValueError(f"LoRAConfig.layers_to_transform: layer {index} does not exist; "
                             f"the model has num_hidden_layers = {n}")
    return tuple(lora_config.layers_to_transform)


class LoRAAdapters:
    """A and B for every (layer, projection) the config adapts.

    ``weights`` maps (layer, projection) to (A, B); it must cover exactly the
    adapted pairs, with A [r, in] and B [out, r] as ``projection_shapes`` gives
    them. The tensors become fp32 leaves with requires_grad (fp32 inputs on one
    device are used as they are, without a copy).
    """

    def __init__(self, lora_config: LoRAConfig, model_config: ModelConfig,
                 weights: Mapping[Tuple[int, str], AdapterPair]):
        self.config = lora_config
        self.model_config = model_config
        self.layers = adapted_layers(lora_config, model_config)
        self.targets = tuple(lora_config.target_modules)
        self.enabled = True
        expected = [(layer, p) for layer in self.layers for p in self.targets]
        missing = [k for k in expected if k not in weights]
        if missing:
            raise ValueError(f"LoRAAdapters: no weights given for layer {missing[0][0]} "
                             f"{missing[0][1]}")
        unexpected = sorted(set(weights) - set(expected))
        if unexpected:
            raise ValueError(f"LoRAAdapters: weights given for layer {unexpected[0][0]} "
                             f"{unexpected[0][1]}, which the LoRAConfig does not adapt")
        shapes = projection_shapes(model_config)
        r = lora_config.r
        self._pairs: Dict[Tuple[int, str], AdapterPair] = {}
        device = None
        for key in expected:
            out_features, in_features = shapes[key[1]]
            pair = []
            for matrix, tensor, shape in (("A", weights[key][0], (r, in_features)),
                                          ("B", weights[key][1], (out_features, r))):
                name = peft_key(key[0], key[1], matrix)
                if not isinstance(tensor, torch.Tensor):
                    raise ValueError(f"LoRAAdapters: {name} must be a tensor, got "
                                     f"{type(tensor).__name__}")
                if tuple(tensor.shape) != shape:
                    raise ValueError(f"LoRAAdapters: {name} has shape {tuple(tensor.shape)}, "
                                     f"expected {shape}")
                if not tensor.is_floating_point():
                    raise ValueError(f"LoRAAdapters: {name} has dtype {tensor.dtype}, "
                                     "expected a floating-point tensor")
                device = tensor.device if device is None else device
                if tensor.device != device:
                    raise ValueError(f"LoRAAdapters: {name} is on {tensor.device}, the others on "
                                     f"{device}")
                pair.append(tensor.detach().to(torch.float32).contiguous().requires_grad_(True))
            self._pairs[key] = (pair[0], pair[1])

    # ---------------------------------------------------------------- creation
    @classmethod
    def init(cls, lora_config: LoRAConfig, model_config: ModelConfig,
             device="cpu") -> "LoRAAdapters":
        """Fresh adapters initialized as PEFT does (init_lora_weights=True).

        A gets torch.nn.Linear's default weight init, Kaiming-uniform with
        a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)); B is zero, so the adapted
        model starts out equal to the base model. A is drawn on the CPU from a
        generator seeded with ``lora_config.seed``, one (layer, projection)
        after another in ``parameters()`` order, so the values depend only on
        the seed and the shapes: not on the global RNG, nor on ``device``.
        """
        generator = torch.Generator(device="cpu").manual_seed(lora_config.seed)
        shapes = projection_shapes(model_config)
        weights = {}
        for layer in adapted_layers(lora_config, model_config):
            for projection in lora_config.target_modules:
                out_features, in_features = shapes[projection]
                a = torch.empty(lora_config.r, in_features, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
                b = torch.zeros(out_features, lora_config.r, dtype=torch.float32)
                weights[(layer, projection)] = (a.to(device), b.to(device))
        return cls(lora_config, model_config, weights)

    # ------------------------------------------------------------------ access
    @property
    def scale(self) -> float:
        return self.config.scale

    @property
    def device(self) -> torch.device:
        return next(iter(self._pairs.values()))[0].device

    def adapted(self) -> List[Tuple[int, str]]:
        """Every adapted (layer, projection), in ``parameters()`` order."""
        return list(self._pairs)

    def get(self, layer: int, projection: str) -> Optional[AdapterPair]:
        """(A, B) of ``projection`` in ``layer``; None when that projection has
        no adapter or the adapters are disabled (the model then runs the base
        projection alone)."""
        self._check_location(layer, projection)
        if not self.enabled:
            return None
        return self._pairs.get((layer, projection))

    def delta(self, layer: int, projection: str) -> torch.Tensor:
        """scale * B @ A, fp32 [out, in], detached: what merging adds to the base
        weight. Independent of ``enabled``."""
        self._check_location(layer, projection)
        pair = self._pairs.get((layer, projection))
        if pair is None:
            raise ValueError(f"LoRAAdapters.delta: layer {layer} {projection} has no adapter "
                             f"(adapted: layers {list(self.layers)}, targets {list(self.targets)})")
        a, b = pair
        with torch.no_grad():
            return (b @ a) * self.scale

    def parameters(self) -> List[torch.Tensor]:
        """A, B of each adapted (layer, projection): layers ascending, then
        projections in PROJECTIONS order. The order the optimizer state uses."""
        return [t for pair in self._pairs.values() for t in pair]

    def named_parameters(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """(PEFT state-dict key, tensor) in ``parameters()`` order."""
        for (layer, projection), (a, b) in self._pairs.items():
            yield peft_key(layer, projection, "A"), a
            yield peft_key(layer, projection, "B"), b

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients: drop them (default, like torch.optim), or zero them in place."""
        for t in self.parameters():
            if t.grad is None:
                continue
            if set_to_none:
                t.grad = None
            else:
                t.grad.zero_()

    @contextlib.contextmanager
    def disabled(self):
        """Within the block ``get`` returns None everywhere: the model is the
        base model (DPO's reference policy). The previous state comes back on
        exit, also after an exception."""
        previous = self.enabled
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = previous

    def _check_location(self, layer: int, projection: str) -> None:
        n = self.model_config.num_hidden_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise ValueError(f"layer must be an integer in [0, {n}), got {layer!r}")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {list(PROJECTIONS)}, got {projection!r}")

    def __repr__(self) -> str:
        return (f"LoRAAdapters(r={self.config.r}, scale={self.scale:g}, layers={list(self.layers)}, "
                f"targets={list(self.targets)}, parameters={self.num_parameters()}, "
                f"enabled={self.enabled})")
