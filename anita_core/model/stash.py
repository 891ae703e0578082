"""The model's seam for offloaded block inputs: where the input of a layer whose policy
is Activations.OFFLOAD waits between the layer's forward and its backward.

The model does not know where that is (pinned host memory, copies on a side stream:
anita_core.memory.offload.HostOffload); whoever builds it hands in an ActivationStash
(QLoRALlama(activation_stash=...)). The layer loop calls it in this order:

    forward:   inputs = stash.open(offloaded layers)          once per forward
               inputs.stash(i, h0)                            before layer i's block runs
    backward:  inputs.prefetch(top offloaded layer)           during the final norm's backward
               h0 = inputs.fetch(i); inputs.prefetch(next offloaded layer below i)
                                                              before layer i's backward

A forward gets its own StashedInputs, so several forwards may wait for their backwards
at once (DPO's chosen and rejected passes). fetch(i) returns the tensor stash(i) was
given, value for value: the gradients do not depend on the policy.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch


class StashedInputs(Protocol):
    """One forward's offloaded block inputs."""

    def stash(self, layer: int, h0: torch.Tensor) -> None:
        """Take layer ``layer``'s input off the device (the caller drops its reference)."""

    def prefetch(self, layer: int) -> None:
        """Start bringing it back (no-op if it is on its way), to overlap other work."""

    def fetch(self, layer: int) -> torch.Tensor:
        """The input, back on the device and ready for the current stream."""


class ActivationStash(Protocol):
    """What the model is handed: a StashedInputs per forward that offloads any layer."""

    def open(self, layers: Sequence[int]) -> StashedInputs:
        """The StashedInputs of one forward whose offloaded layers are ``layers``."""
