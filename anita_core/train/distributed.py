"""Training on several processes with torch.distributed (launched by torchrun).

Two modes, both keeping the LoRA parameters and the optimizer state replicated
on every rank (they are small: every rank steps the same AdamW on the same
all-reduced gradients, so the adapters stay identical without a broadcast):

* data parallel: every rank holds the whole NF4 base; ``GradBuckets`` starts
  the all-reduce of a layer's LoRA gradients as soon as that layer's backward
  ends (bucketed, asynchronous), so it overlaps the backward of earlier layers.
* sharded base: ``ShardedBase`` keeps 1/world of every layer's NF4 bytes and
  statistics on each rank; a layer's tensors are all-gathered just before it
  runs (forward and backward), the next layer's gather is started ahead of time,
  and the full tensors are freed right after the layer.

Both plug into the model through its LayerHooks seam (``DistributedHooks``);
the block loops are not touched. One process without torchrun's environment
gets ``SINGLE``: no process group, nothing changes.

By concern: the process group and its collectives (ranks.py), the gradient
all-reduce overlap (grad_buckets.py), the sharded base's gathers
(sharded_base.py); this module installs them on a model, and its names are
the ones the trainer, the recipes and the tests import.
"""
from __future__ import annotations

from typing import Optional

from anita_core.model.llama import LayerHooks
from anita_core.train.grad_buckets import (DEFAULT_BUCKET_BYTES, GradBuckets,  # noqa: F401
                                           adapter_params_by_layer)
from anita_core.train.ranks import (SINGLE, DistContext, DistributedError,  # noqa: F401
                                    all_gather_objects, all_reduce_sums, broadcast_object,
                                    check_global_batch, collective_failed, comm_device,
                                    init_from_env, rank_slice, shutdown)
from anita_core.train.sharded_base import (SHARDED_NF4_FIELDS, ShardedBase,  # noqa: F401
                                           layer_nf4_weights)


class DistributedHooks(LayerHooks):
    """The model's per-layer hooks for either mode: gather a sharded layer before
    it runs and free it after; start gradient all-reduces as layers finish."""

    def __init__(self, grads: GradBuckets, sharded: Optional[ShardedBase] = None):
        self.grads, self.sharded = grads, sharded

    def before_layer(self, i: int, phase: str) -> None:
        if self.sharded is not None:
            self.sharded.gather(i, i + 1 if phase == "forward" else i - 1)

    def after_layer(self, i: int, phase: str) -> None:
        if self.sharded is not None:
            self.sharded.free(i)
        if phase == "backward":
            self.grads.layer_done(i)


def setup_model(ctx: DistContext, model, adapters, *, sharded_base: bool,
                bucket_bytes: int = DEFAULT_BUCKET_BYTES, overlap: bool = True) -> Optional[GradBuckets]:
    """Install the hooks of the chosen mode on ``model``; returns the gradient
    reducer the trainer finishes each step with (None on a single process)."""
    if not ctx.active:
        return None
    grads = GradBuckets(ctx, adapter_params_by_layer(adapters), bucket_bytes, overlap)
    sharded = ShardedBase(ctx, model.base) if sharded_base else None
    model.layer_hooks = DistributedHooks(grads, sharded)
    return grads
