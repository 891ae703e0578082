"""Offloaded block inputs: the host pool they live in between a block's forward and its
backward, and the copies there and back. HostOffload is the model's ActivationStash
(anita_core/model/stash.py) for the layers whose policy is "offload"; whoever builds
the model hands it in (QLoRALlama(activation_stash=...), or host_offload(model), which
memory.budget.apply_memory_plan calls for a plan that offloads)."""
from __future__ import annotations

import math
import weakref
from typing import List, Optional, Sequence, Tuple

import torch


class HostPool:
    """The host memory of the offloaded block inputs: ONE allocation, cut into one view
    per offloaded layer, kept across steps and replaced only by a larger one.

    torch's pinned allocator (CachingHostAllocator) rounds every request up to a power
    of two: pinned one by one, a 6.35 GiB layer input would take 8 GiB. The pool is a
    plain host tensor of exactly the bytes asked for, page-locked with cudaHostRegister,
    which rounds nothing (the kernel pins whole pages: < 4 KiB more). So what a step
    pins is the planner's host figure (memory.planner.host_bytes_per_offloaded_layer x the
    offloaded layers). ``reserve`` sets the size of the first allocation (the plan's
    figure for its largest micro-batch), so that smaller micro-batches reuse it.

    Without CUDA (``pin=False``) the pool is plain host memory, so a CPU run takes
    the same path. ``allocations`` counts the host allocations made."""

    def __init__(self, pin: bool, stream=None):
        self.pin, self.stream = pin, stream
        self.buffer: Optional[torch.Tensor] = None
        self.allocations = 0
        self.reserved = 0
        self.user = None                # weakref of the offloader its views were lent to
        self._unregister = None

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    def reserve(self, nbytes: int) -> None:
        self.reserved = max(0, int(nbytes))

    def busy(self) -> bool:
        """Whether a forward whose backward has not run yet still holds the views."""
        user = None if self.user is None else self.user()
        return user is not None and not user.done()

    def views(self, n: int, shape: Tuple[int, ...], dtype: torch.dtype) -> List[torch.Tensor]:
        """n tensors of ``shape`` and ``dtype``, side by side in the pool."""
        numel = math.prod(shape)
        need = n * numel * torch.empty((), dtype=dtype).element_size()
        if need > self.nbytes:
            self.release()
            self._allocate(max(need, self.reserved))
        flat = self.buffer[:need].view(dtype)
        return [flat[j * numel:(j + 1) * numel].view(shape) for j in range(n)]

    def _allocate(self, nbytes: int) -> None:
        buffer = torch.empty(nbytes, dtype=torch.uint8, device="cpu")
        if self.pin and nbytes:
            # (as torch.cuda._pin_memory_utils does; flag 1: cudaHostRegisterPortable)
            error = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 1)
            if int(error) != 0:
                raise RuntimeError(f"offloading: cudaHostRegister of {nbytes} bytes of host "
                                   f"memory failed (cudaError {int(error)})")
            self._unregister = weakref.finalize(self, _unregister_host, buffer, self.stream)
            self._unregister.atexit = False
        self.buffer = buffer
        self.allocations += 1

    def release(self) -> None:
        """Give the memory back (after the copies on the side stream have finished)."""
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        self.buffer = None


def _unregister_host(buffer: torch.Tensor, stream) -> None:
    (stream or torch.cuda).synchronize()        # no copy may still read or write it
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


class BlockInputOffloader:
    """Block inputs to host memory (a HostPool) in the forward and back in the backward,
    on a side CUDA stream so that the copies overlap the blocks' compute.

    The forward's device-to-host copy of layer i's input starts once the compute
    stream has produced it (the side stream waits on the compute stream) and the
    device tensor is kept alive for that stream (record_stream); the backward
    starts the host-to-device copy of the next offloaded layer down while the
    current layer's backward runs (``prefetch``), and the compute stream waits for
    it only when it needs it (``fetch``). So at most two offloaded inputs are on
    the device at once during the backward: the one in use and the one arriving.
    Every copy runs on the side stream, so one step's copies back out of a pool
    view come before the next step's copy into it.

    On a CPU there is one memory and no stream: the same pool and copies, done at
    once (what the tests exercise)."""

    def __init__(self, device: torch.device, stream=None, pool: Optional[HostPool] = None,
                 layers: Sequence[int] = ()):
        """``layers``: the layers whose inputs it will hold (their views are cut from the
        pool at the first stash); ``pool``: the model's (a new one if None)."""
        self.cuda = device.type == "cuda"
        self.stream = stream
        self.device = device
        self.pool = pool if pool is not None else HostPool(self.cuda, stream)
        self.pool.user = weakref.ref(self)
        self.layers = list(layers)
        self.slots: Optional[dict] = None
        self.arriving: dict = {}
        self.held: dict = {}

    def host_bytes(self) -> int:
        return self.pool.nbytes

    def host_tensors(self) -> List[torch.Tensor]:
        return [] if self.pool.buffer is None else [self.pool.buffer]

    def stash(self, i: int, h: torch.Tensor) -> None:
        if self.slots is None:              # every offloaded layer's view, at the first
            views = self.pool.views(len(self.layers), tuple(h.shape), h.dtype)
            self.slots = dict(zip(self.layers, views))
        if i not in self.slots:
            raise ValueError(f"offloading: layer {i} is not one of the layers this offloader "
                             f"holds ({self.layers}), or it is stashed twice")
        host = self.slots.pop(i)
        if not self.cuda:
            self.held[i] = host.copy_(h, non_blocking=True)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(h, non_blocking=True)
        h.record_stream(self.stream)
        self.held[i] = host

    def prefetch(self, i: int) -> None:
        """Start bringing layer i's input back (no-op if it is on its way)."""
        if i in self.arriving:
            return
        host = self.held.pop(i)
        if not self.cuda:
            self.arriving[i] = (host.to(self.device, copy=True, non_blocking=True), None)
            return
        with torch.cuda.stream(self.stream):
            device_copy = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.arriving[i] = (device_copy, done)

    def fetch(self, i: int) -> torch.Tensor:
        self.prefetch(i)
        device_copy, done = self.arriving.pop(i)
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            device_copy.record_stream(current)
        return device_copy

    def done(self) -> bool:
        """Every stashed input has been fetched back: the pool's views are free."""
        return not (self.slots or self.held or self.arriving)


class HostOffload:
    """The model's ActivationStash in host memory: one side stream that every copy runs
    on, and one HostPool kept across steps (the one the plan sizes, ``pool``); each
    forward that offloads gets a BlockInputOffloader on it, or on a pool of its own
    while an earlier forward whose backward has not run still holds it. ``latest`` is
    the last forward's offloader (for tests and diagnostics)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.stream = None              # made by the first forward that offloads
        self.pool = HostPool(self.device.type == "cuda")
        self.latest: Optional[BlockInputOffloader] = None

    def open(self, layers: Sequence[int]) -> BlockInputOffloader:
        cuda = self.device.type == "cuda"
        if self.stream is None and cuda:
            self.stream = torch.cuda.Stream(self.device)
            self.pool.stream = self.stream
        pool = self.pool
        if pool.busy():
            pool = HostPool(cuda, self.stream)
        self.latest = BlockInputOffloader(self.device, self.stream, pool, layers)
        return self.latest

    def host_tensors(self) -> List[torch.Tensor]:
        """The host memory the latest forward's inputs went to (none before one)."""
        return [] if self.latest is None else self.latest.host_tensors()


def host_offload(model) -> HostOffload:
    """The model's HostOffload, handed in (model.activation_stash) if it has no stash yet.
    A stash of another kind is an error: the plan's host figure is this pool's."""
    stash = model.activation_stash
    if stash is None:
        stash = model.activation_stash = HostOffload(model.device)
    if not isinstance(stash, HostOffload):
        raise TypeError(f"the model's activation_stash is a {type(stash).__name__}, not the "
                        "memory plan's HostOffload (anita_core.memory.offload)")
    return stash
