"""The model's seam for offloaded block inputs (anita_core/model/stash.py): the layer loop
calls whatever ActivationStash it is handed in the documented order, gets back what it
stashed (the gradients are those of recomputing, bit for bit), refuses an offload
policy with no stash to hold the inputs, and memory.offload.host_offload hands in the
memory plan's HostOffload only where no other stash is. The torch backend: the
kernels are not under test."""
from __future__ import annotations

import pytest
import torch

from anita_core.memory.offload import HostOffload, host_offload
from anita_core.model import LayerHooks
from anita_core.model.ops import use_backend
from tests.test_memory_plan import random_batch, tiny_model


class RecordingStash:
    """An ActivationStash that keeps the inputs in a dict (copies, on the device) and
    writes every call into ``log``, next to the layer hooks' calls."""

    def __init__(self, log):
        self.log = log

    def open(self, layers):
        self.log.append(("open", tuple(layers)))
        return RecordedInputs(self.log)


class RecordedInputs:
    def __init__(self, log):
        self.log, self.held = log, {}

    def stash(self, layer, h0):
        self.log.append(("stash", layer))
        self.held[layer] = h0.clone()

    def prefetch(self, layer):
        self.log.append(("prefetch", layer))

    def fetch(self, layer):
        self.log.append(("fetch", layer))
        return self.held.pop(layer)


class RecordingHooks(LayerHooks):
    def __init__(self, log):
        self.log = log

    def before_layer(self, i, phase):
        self.log.append(("before", i, phase))


def test_the_layer_loop_calls_the_stash_in_order_and_gets_recompute_gradients(tmp_path):
    """Layers 0, 2, 3 offloaded, 1 recomputed: one open per forward; each input stashed
    as its layer starts; in the backward the top one prefetched before the final norm's
    backward, then before each offloaded layer's backward its input fetched and the next
    offloaded one below prefetched. LoRA gradients and loss equal all-recompute's bitwise."""
    log = []
    model = tiny_model(tmp_path, 4, 0.3, offload=False)
    model.activation_stash = RecordingStash(log)
    model.layer_hooks = RecordingHooks(log)
    ids, targets = random_batch(model.config, 2, 9, seed=1)
    runs = {}
    with use_backend("torch"):
        for name, policies in (("recompute", "recompute"),
                               ("offload", ["offload", "recompute", "offload", "offload"])):
            model.set_layer_strategies(policies)
            for p in model.adapters.parameters():
                p.grad = None
            model.dropout_generator.manual_seed(2)
            del log[:]
            loss, _ = model.train_step(ids, targets)
            runs[name] = (loss, [p.grad.clone() for p in model.adapters.parameters()], list(log))
    forward = [("before", 0, "forward"), ("stash", 0), ("before", 1, "forward"),
               ("before", 2, "forward"), ("stash", 2), ("before", 3, "forward"), ("stash", 3)]
    backward = [("prefetch", 3),
                ("fetch", 3), ("prefetch", 2), ("before", 3, "backward"),
                ("fetch", 2), ("prefetch", 0), ("before", 2, "backward"),
                ("before", 1, "backward"),
                ("fetch", 0), ("before", 0, "backward")]
    assert runs["offload"][2] == [("open", (0, 2, 3))] + forward + backward
    assert not [call for call in runs["recompute"][2] if call[0] not in ("before",)]
    assert torch.equal(runs["offload"][0], runs["recompute"][0])
    for a, b in zip(runs["offload"][1], runs["recompute"][1]):
        assert torch.equal(a, b)
    assert all(torch.count_nonzero(g) for g in runs["offload"][1])


def test_an_offload_policy_without_a_stash_is_refused_but_evaluation_needs_none(tmp_path):
    model = tiny_model(tmp_path, 2, 0.0, offload=False)
    model.set_layer_strategies(["recompute", "offload"])
    ids, targets = random_batch(model.config, 1, 6)
    with use_backend("torch"):
        with pytest.raises(ValueError, match=r"layers \[1\] have the offload policy but the "
                                             r"model has no activation_stash"):
            model.train_step(ids, targets)
        loss, n = model.loss(ids, targets)      # nothing is kept for a backward
    assert torch.isfinite(loss) and int(n) == 6


def test_host_offload_hands_in_one_host_offload_and_refuses_a_foreign_stash(tmp_path):
    model = tiny_model(tmp_path, 2, 0.0, offload=False)
    offload = host_offload(model)
    assert isinstance(offload, HostOffload) and model.activation_stash is offload
    assert host_offload(model) is offload and offload.device == model.device
    model.activation_stash = RecordingStash([])
    with pytest.raises(TypeError, match="activation_stash is a RecordingStash, not the memory "
                                        "plan's HostOffload"):
        host_offload(model)
