"""The sharded NF4 base: each rank keeps 1/world of every layer's NF4 bytes and
statistics; a layer's tensors are all-gathered just before it runs (forward and
backward), the next layer's gather is started ahead of time, and the full
tensors are freed right after the layer."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from anita_core.train.ranks import DistContext, collective_failed
from csrc_triton import NF4Weight

# NF4Weight fields whose size grows with the weight: these are sharded; the
# fixed-size ones (code, nested_code, nested_offset) stay whole on every rank.
SHARDED_NF4_FIELDS = ("packed", "absmax", "nested_absmax")


def layer_nf4_weights(layer) -> List[NF4Weight]:
    """Every NF4Weight a LayerWeights holds, whatever its fields are called
    (a field may be an NF4Weight or a dict of them), in a fixed order."""
    found: List[NF4Weight] = []
    for f in dataclasses.fields(layer):
        value = getattr(layer, f.name)
        if isinstance(value, NF4Weight):
            found.append(value)
        elif isinstance(value, dict):
            found.extend(v for _, v in sorted(value.items()) if isinstance(v, NF4Weight))
    return found


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _views_of_others(weights: List[NF4Weight]) -> Dict[Tuple[int, str], Tuple[int, str, int]]:
    """(id of a weight, field) -> (id of the owner, field, element offset) for each sharded
    field that is a contiguous view into another listed weight's (a projection's view
    into its fused q/k/v or gate/up weight): gathered once, as part of the owner."""
    by_storage: Dict[Tuple[str, int], List[Tuple[NF4Weight, torch.Tensor]]] = {}
    for w in weights:
        for name in SHARDED_NF4_FIELDS:
            t = getattr(w, name)
            if t is not None and t.numel():
                by_storage.setdefault((name, t.untyped_storage().data_ptr()), []).append((w, t))
    views = {}
    for (name, _), members in by_storage.items():
        if len(members) < 2:
            continue
        owner, whole = max(members, key=lambda m: m[1].numel())
        for w, t in members:
            offset = t.storage_offset() - whole.storage_offset()
            if (w is not owner and t.is_contiguous() and whole.is_contiguous()
                    and t.dtype == whole.dtype and 0 <= offset
                    and offset + t.numel() <= whole.numel()):
                views[(id(w), name)] = (id(owner), name, offset)
    return views


@dataclass
class _LayerShard:
    # (weight, field name, dtype, shape, nbytes, offset of its slice in the shard)
    entries: List[Tuple[NF4Weight, str, torch.dtype, torch.Size, int, int]]
    shard: torch.Tensor                 # uint8 [shard_bytes], this rank's bytes
    # (weight, field, dtype, shape, owner, owner's field, element offset): views rebuilt
    views: List[Tuple[NF4Weight, str, torch.dtype, torch.Size, NF4Weight, str, int]] = \
        dataclasses.field(default_factory=list)


class ShardedBase:
    """Keeps 1/world of each layer's sharded NF4 tensors on this rank.

    Every sharded tensor is cut, as bytes padded to a multiple of world, into
    world equal slices; rank r keeps slice r of each, concatenated into one
    buffer per layer, so a layer is gathered by a single all_gather. A tensor that
    is a view into another one (a projection's slice of a fused q/k/v weight) is not
    sharded: after the gather it becomes a view of the gathered owner again, so each
    NF4 byte crosses the network and sits on the device once. While a layer is not
    in use its NF4Weights hold empty tensors (a kernel reaching one fails its shape
    check instead of computing garbage).
    """

    def __init__(self, ctx: DistContext, base, prefetch: bool = True):
        self.ctx, self.prefetch = ctx, prefetch
        self.layers = [self._shard_layer(layer) for layer in base.layers]
        self._gathered: Dict[int, torch.Tensor] = {}
        self._prefetching: Dict[int, Tuple[object, torch.Tensor]] = {}
        self.gathered_bytes = 0         # all-gather output bytes since creation

    def _shard_layer(self, layer) -> _LayerShard:
        world, rank = self.ctx.world_size, self.ctx.rank
        weights = layer_nf4_weights(layer)
        by_id = {id(w): w for w in weights}
        view_of = _views_of_others(weights)
        entries, pieces, views, offset = [], [], [], 0
        for w in weights:
            for name in SHARDED_NF4_FIELDS:
                t = getattr(w, name)
                if t is None:
                    continue
                if (id(w), name) in view_of:
                    owner, owner_name, element_offset = view_of[(id(w), name)]
                    views.append((w, name, t.dtype, t.shape, by_id[owner], owner_name,
                                  element_offset))
                    continue
                raw = _as_bytes(t)
                share = -(-raw.numel() // world)
                padded = torch.zeros(share * world, dtype=torch.uint8, device=raw.device)
                padded[:raw.numel()] = raw
                pieces.append(padded[rank * share:(rank + 1) * share].clone())
                entries.append((w, name, t.dtype, t.shape, raw.numel(), offset))
                offset += share
        shard = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8)
        result = _LayerShard(entries, shard, views)
        self._empty(result)
        return result

    @staticmethod
    def _empty(s: _LayerShard) -> None:
        for w, name, dtype, *_ in list(s.entries) + list(s.views):
            t = getattr(w, name)
            setattr(w, name, torch.empty(0, dtype=dtype, device=t.device))

    def shard_bytes(self) -> int:
        return sum(s.shard.numel() for s in self.layers)

    def _start_gather(self, i: int):
        import torch.distributed as dist
        shard = self.layers[i].shard
        out = torch.empty(shard.numel() * self.ctx.world_size, dtype=torch.uint8, device=shard.device)
        try:
            # all_gather_single is all_gather_into_tensor's newer name (torch >= 2.10)
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            handle = gather(out, shard, async_op=True)
        except Exception as e:
            raise collective_failed(self.ctx, f"all-gather of layer {i}", e) from e
        self.gathered_bytes += out.numel()
        return handle, out

    def _install(self, i: int, handle, out: torch.Tensor) -> None:
        try:
            handle.wait()
        except Exception as e:
            raise collective_failed(self.ctx, f"all-gather of layer {i}", e) from e
        s = self.layers[i]
        share = s.shard.numel()
        rows = out.view(self.ctx.world_size, share)
        for w, name, dtype, shape, nbytes, offset in s.entries:
            piece = -(-nbytes // self.ctx.world_size)
            raw = rows[:, offset:offset + piece].reshape(-1)[:nbytes]
            setattr(w, name, raw.clone().view(dtype).view(shape))
        for w, name, dtype, shape, owner, owner_name, element_offset in s.views:
            whole = getattr(owner, owner_name).reshape(-1)
            n = shape.numel()
            setattr(w, name, whole[element_offset:element_offset + n].view(shape))

    def gather(self, i: int, next_layer: Optional[int]) -> None:
        """Layer i whole on this rank; start gathering ``next_layer`` too."""
        for j in [j for j in self._prefetching if j != i]:     # a prefetch nobody used
            handle, _ = self._prefetching.pop(j)
            handle.wait()
        if i in self._prefetching:
            handle, out = self._prefetching.pop(i)
        else:
            handle, out = self._start_gather(i)
        if self.prefetch and next_layer is not None and 0 <= next_layer < len(self.layers):
            self._prefetching[next_layer] = self._start_gather(next_layer)
        self._install(i, handle, out)

    def free(self, i: int) -> None:
        self._empty(self.layers[i])
