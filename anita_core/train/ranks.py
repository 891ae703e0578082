"""The process group and its small collectives: torchrun's environment (read by
anita_core.cli.environment) turned into a DistContext (SINGLE without one), the
sums, broadcasts and gathers of Python values the trainer and the run start need,
and the global-batch arithmetic. Every failure is a DistributedError, one line."""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from anita_core.cli import environment


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
