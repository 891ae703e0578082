"""Data parallel's LoRA gradients: each layer's all-reduce starts as soon as that
layer's backward ends (bucketed, asynchronous), so it overlaps the backward of
earlier layers."""
from __future__ import annotations

import time
from typing import Dict, List, Tuple

import torch

from anita_core.train.ranks import DistContext, collective_failed

DEFAULT_BUCKET_BYTES = 25 * 2 ** 20     # DDP's default bucket size


class GradBuckets:
    """Sums every rank's LoRA gradients with asynchronous all-reduces.

    ``layer_params[i]`` are layer i's trainable tensors. On the last micro-batch
    of a step (``sync`` set), the end of layer i's backward adds its gradients to
    the current bucket; a bucket holding ``bucket_bytes`` or more is flattened
    and its all-reduce started at once, so it runs while earlier layers compute.
    ``finish()`` starts what is left, waits, and writes the sums back into .grad.
    The collectives are issued in the same order on every rank (reverse layer
    order), which is what lets them match.
    """

    def __init__(self, ctx: DistContext, layer_params: Dict[int, List[torch.Tensor]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, overlap: bool = True):
        self.ctx, self.bucket_bytes, self.overlap = ctx, bucket_bytes, overlap
        self.layer_params = {i: list(ps) for i, ps in layer_params.items() if ps}
        self.sync = False
        self._pending: List[torch.Tensor] = []
        self._in_flight: List[Tuple[object, torch.Tensor, List[torch.Tensor]]] = []
        self._done_layers: set = set()
        self.bytes_per_step = sum(p.numel() * p.element_size()
                                  for ps in self.layer_params.values() for p in ps)
        self.wait_s = 0.0               # time finish() spent blocked on all-reduces
        self.launches = 0               # all-reduces started
        self.launches_in_backward = 0   # of which while the backward was still running

    def layer_done(self, i: int) -> None:
        if self.sync and self.overlap:
            before = self.launches
            self._add_layer(i)
            self.launches_in_backward += self.launches - before

    def _add_layer(self, i: int) -> None:
        if i not in self.layer_params or i in self._done_layers:
            return
        self._done_layers.add(i)
        self._pending.extend(self.layer_params[i])
        if sum(p.numel() * p.element_size() for p in self._pending) >= self.bucket_bytes:
            self._launch()

    def _launch(self) -> None:
        import torch.distributed as dist
        params, self._pending = self._pending, []
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        try:
            handle = dist.all_reduce(flat, async_op=True)
        except Exception as e:
            raise collective_failed(self.ctx, "LoRA gradient all-reduce", e) from e
        self._in_flight.append((handle, flat, params))
        self.launches += 1

    def finish(self) -> None:
        """Every layer's summed gradient in .grad (the same on every rank)."""
        for i in sorted(self.layer_params, reverse=True):
            self._add_layer(i)
        self._launch()
        started = time.perf_counter()
        try:
            for handle, flat, params in self._in_flight:
                handle.wait()
                offset = 0
                for p in params:
                    n = p.numel()
                    p.grad = flat[offset:offset + n].view_as(p)
                    offset += n
        except Exception as e:
            raise collective_failed(self.ctx, "LoRA gradient all-reduce", e) from e
        finally:
            self.wait_s += time.perf_counter() - started
            self._in_flight, self._done_layers, self.sync = [], set(), False


def adapter_params_by_layer(adapters) -> Dict[int, List[torch.Tensor]]:
    """Layer -> its A and B tensors (``parameters()`` holds A, B per adapted pair)."""
    params = adapters.parameters()
    out: Dict[int, List[torch.Tensor]] = {}
    for k, (layer, _) in enumerate(adapters.adapted()):
        out.setdefault(layer, []).extend(params[2 * k:2 * k + 2])
    return out
