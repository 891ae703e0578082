"""LoRA hyper-parameters: which projections of which layers get an adapter, its
rank, and how its output is scaled.

The adapted projection computes  y = x W^T + scale * dropout(x) A^T B^T  with
A [r, in] and B [out, r], the convention of PEFT's LoRA layer, where
scale = alpha / r, or alpha / sqrt(r) with rank-stabilized LoRA (rsLoRA,
Kalajdzievski 2023), which keeps the update's magnitude independent of r.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from anita_core.model.weights import PROJECTIONS


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    # Any subset of anita_core.model.weights.PROJECTIONS; kept in PROJECTIONS order.
    target_modules: Sequence[str] = PROJECTIONS
    use_rslora: bool = False
    # Seeds the generator that draws A at initialization (and nothing else).
    seed: int = 0
    # Decoder layers that get adapters; None = every layer. Kept sorted.
    layers_to_transform: Optional[Sequence[int]] = None

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be a positive integer, got {self.r!r}")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise ValueError(f"LoRAConfig.alpha must be a positive finite number, got {self.alpha!r}")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoRAConfig.use_rslora must be True or False, got {self.use_rslora!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"LoRAConfig.seed must be an integer, got {self.seed!r}")
        self.target_modules = _canonical_targets(self.target_modules)
        if self.layers_to_transform is not None:
            self.layers_to_transform = _canonical_layers(self.layers_to_transform)

    @property
    def scale(self) -> float:
        """Factor applied to B A x: alpha / sqrt(r) with rsLoRA, else alpha / r."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def _canonical_targets(targets) -> Tuple[str, ...]:
    if isinstance(targets, str):
        # A bare string would otherwise be read character by character.
        targets = (targets,)
    targets = tuple(targets)
    if not targets:
        raise ValueError("LoRAConfig.target_modules is empty; name at least one of "
                         f"{list(PROJECTIONS)}")
    for name in targets:
        if name not in PROJECTIONS:
            raise ValueError(f"LoRAConfig.target_modules: {name!r} is not a projection anita "
                             f"can adapt; expected a subset of {list(PROJECTIONS)}")
    duplicates = sorted({n for n in targets if targets.count(n) > 1})
    if duplicates:
        raise ValueError(f"LoRAConfig.target_modules lists {duplicates[0]!r} more than once")
    return tuple(p for p in PROJECTIONS if p in targets)


def _canonical_layers(layers) -> Tuple[int, ...]:
    # PEFT also allows a single int for one layer.
    layers = (layers,) if isinstance(layers, int) and not isinstance(layers, bool) else tuple(layers)
    if not layers:
        raise ValueError("LoRAConfig.layers_to_transform is empty; use None for every layer")
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"LoRAConfig.layers_to_transform: {index!r} is not a "
                             "non-negative layer index")
    duplicates = sorted({i for i in layers if layers.count(i) > 1})
    if duplicates:
        raise ValueError(f"LoRAConfig.layers_to_transform lists layer {duplicates[0]} more than once")
    return tuple(sorted(layers))
