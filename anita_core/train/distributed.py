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
"""
from __future__ import annotations

import dataclasses
import datetime
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from anita_core.cli import environment
from anita_core.model.llama import LayerHooks
from csrc_triton import NF4Weight

# NF4Weight fields whose size grows with the weight: these are sharded; the
# fixed-size ones (code, nested_code, nested_offset) stay whole on every rank.
SHARDED_NF4_FIELDS = ("packed", "absmax", "nested_absmax")
DEFAULT_BUCKET_BYTES = 25 * 2 ** 20     # DDP's default bucket size


class DistributedError(RuntimeError):
    """A process group cannot be set up, or a collective failed or timed out."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None        # None: a single process, no process group
    timeout_s: float = 600.0

    @property
    def active(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def _env_int(name: str, value: Optional[str]) -> int:
    if value is None:
        raise KeyError(name)
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def init_from_env(timeout_s: float = 600.0, backend: Optional[str] = None) -> DistContext:
    """The process group torchrun's environment describes (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT), with ``timeout_s`` on every
    collective; SINGLE when WORLD_SIZE is absent or 1. Backend: nccl when CUDA
    is available, else gloo; an unavailable backend is a DistributedError."""
    env = environment.torchrun()
    if int(env.world_size or 1) <= 1:
        return SINGLE
    import torch.distributed as dist
    rank, world = _env_int("RANK", env.rank), _env_int("WORLD_SIZE", env.world_size)
    local_rank = _env_int("LOCAL_RANK", env.local_rank)
    missing = [v for v, x in (("MASTER_ADDR", env.master_addr), ("MASTER_PORT", env.master_port))
               if x is None]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
                               f"torchrun (it sets them)")
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    available = {"nccl": dist.is_nccl_available(), "gloo": dist.is_gloo_available()}
    if not available.get(backend, False):
        raise DistributedError(f"the {backend} backend is not available in this PyTorch build "
                               f"({'CUDA' if backend == 'nccl' else 'CPU'} training across processes "
                               f"needs it)")
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local_rank} but this machine has "
                                   f"{torch.cuda.device_count()} GPU(s); lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as e:
        raise DistributedError(f"rank {rank}: cannot join the {backend} process group of {world} "
                               f"processes at {env.master_addr}:{env.master_port} "
                               f"({type(e).__name__}: {e})") from e
    return DistContext(rank, world, local_rank, backend, timeout_s)


def shutdown(ctx: DistContext) -> None:
    if ctx.active:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def comm_device(ctx: DistContext) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" \
        else torch.device("cpu")


def collective_failed(ctx: DistContext, what: str, error: Exception) -> DistributedError:
    return DistributedError(
        f"rank {ctx.rank}: {what} failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
        f"another rank died or stopped answering within --collective-timeout "
        f"{ctx.timeout_s:g} s")


def all_reduce_sums(ctx: DistContext, values: Sequence[float]) -> List[float]:
    """Element-wise sums over ranks (fp64, so counts stay exact)."""
    if not ctx.active:
        return [float(v) for v in values]
    import torch.distributed as dist
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device(ctx))
    try:
        dist.all_reduce(t)
    except Exception as e:
        raise collective_failed(ctx, "all-reduce of step counts", e) from e
    return t.tolist()


def broadcast_object(ctx: DistContext, value):
    """Rank 0's ``value`` on every rank (small plain data made by this program,
    never a user's file)."""
    if not ctx.active:
        return value
    import torch.distributed as dist
    box = [value]
    try:
        dist.broadcast_object_list(box, src=0, device=comm_device(ctx))
    except Exception as e:
        raise collective_failed(ctx, "broadcast from rank 0", e) from e
    return box[0]


def all_gather_objects(ctx: DistContext, value) -> List:
    """Every rank's ``value``, by rank (small plain data made by this program)."""
    if not ctx.active:
        return [value]
    import torch.distributed as dist
    out = [None] * ctx.world_size
    try:
        dist.all_gather_object(out, value)
    except Exception as e:
        raise collective_failed(ctx, "all-gather of step metrics", e) from e
    return out


def check_global_batch(global_batch: int, batch_size: int, world_size: int) -> int:
    """Gradient accumulation steps that make ``global_batch`` rows per optimizer
    step from ``batch_size`` per micro-batch on ``world_size`` ranks."""
    per_step = batch_size * world_size
    if global_batch % per_step:
        raise ValueError(f"--global-batch-size {global_batch} is not a multiple of --batch-size "
                         f"{batch_size} x world size {world_size} = {per_step}")
    return global_batch // per_step


def rank_slice(items: Sequence, world_size: int, rank: int) -> List:
    """Rank ``rank``'s equal, contiguous share of ``items`` (len divisible by world)."""
    share = len(items) // world_size
    return list(items[rank * share:(rank + 1) * share])


# ---------------------------------------------------------------- LoRA gradients
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


# ---------------------------------------------------------------- sharded NF4 base
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
