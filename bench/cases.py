"""The vocabulary of bench/kernels.py: an op at one shape is a Problem; one
provider's way of computing it is a Case; a mode (forward / backward / both)
turns a Case into the zero-argument callable that gets timed.

Every provider's Case is checked against the torch eager provider once per op
(outputs and input gradients, on the smallest shape of the sweep) before any
of its timings are recorded, so a timing is never of a computation that gives
a different answer.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bench.shapes import Dims

MODES = ("forward", "backward", "both")


@dataclass
class SweepSettings:
    """What bench/kernels.py sweeps, and how its inputs are drawn."""
    dims: Dims
    tokens: Sequence[int]
    ctx: object                                   # bench.common.RunContext
    double_quant: bool = True
    lora_r: int = 32
    lora_alpha: float = 16.0
    projections: Optional[Sequence[str]] = None   # projection-group names; None = all
    seed: int = 0

    def generator(self, key: str) -> torch.Generator:
        """A generator seeded by (seed, key): the same inputs for every provider."""
        seed = (self.seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63)
        return torch.Generator(device=self.ctx.device).manual_seed(seed)

    def randn(self, shape, generator: torch.Generator, dtype: Optional[torch.dtype] = None,
              scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        """scale * N(0, 1) in ``dtype`` (default: the run's), a leaf with requires_grad=grad."""
        t = torch.randn(shape, generator=generator, device=self.ctx.device, dtype=torch.float32)
        return (t * scale).to(dtype or self.ctx.dtype).requires_grad_(grad)


class Unavailable(Exception):
    """A provider (or a mode of it) that cannot run here; the message says why
    and becomes the row's 'skipped: ...' status."""


@dataclass
class Work:
    """Algorithmic minimum of one mode: bytes that must cross DRAM (every input
    read once, every output written once) and arithmetic operations. The same
    numbers are used for every provider, so GB/s and TFLOP/s compare providers
    on equal terms (they are not each provider's actual traffic)."""
    bytes: int
    flops: int

    def __add__(self, other: "Work") -> "Work":
        return Work(self.bytes + other.bytes, self.flops + other.flops)


@dataclass
class Problem:
    op: str
    shape: str                          # human readable, e.g. "T=2048 H=4096"
    tokens: Optional[int]               # the swept token count (None for weight-only ops)
    group: str                          # plot panel within the op, e.g. a projection
    make_inputs: Callable[[], dict]     # fresh inputs, same values on every call
    forward_work: Work
    backward_work: Optional[Work]       # None: the op has no backward

    def work(self, mode: str) -> Optional[Work]:
        if mode == "forward":
            return self.forward_work
        if self.backward_work is None:
            return None
        return self.backward_work if mode == "backward" else self.forward_work + self.backward_work


@dataclass
class Case:
    """One provider on one problem.

    forward()    runs the op, returns a tuple of outputs
    wrt          leaf inputs to differentiate (empty: this provider has no backward)
    canonical    maps forward()'s outputs to tensors in the eager provider's
                 layout and meaning (differentiably), for the correctness check
    """
    forward: Callable[[], tuple]
    wrt: Sequence[torch.Tensor] = ()
    canonical: Callable[[tuple], Sequence[torch.Tensor]] = field(default=lambda outputs: outputs)


Builder = Callable[[dict, "object"], Case]  # (inputs, RunContext) -> Case


@dataclass
class OpSpec:
    name: str
    problems: Callable[..., List[Problem]]   # (dims, tokens, ctx) -> problems
    providers: Dict[str, Builder]
    bound: str                               # "memory" or "compute": which ceiling to plot
    notes: Tuple[str, ...] = ()


def _differentiable(outputs) -> List[torch.Tensor]:
    return [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]


def mode_callable(case: Case, mode: str, seed: int) -> Callable[[], object]:
    """The zero-argument callable timed for ``mode``.

    forward:  case.forward()
    backward: torch.autograd.grad over a graph built once (retain_graph), with
              fixed random output gradients: the backward alone
    both:     forward then that backward, every call
    """
    if mode == "forward":
        return case.forward
    if not case.wrt:
        raise Unavailable("no backward in this provider")
    outputs = _differentiable(case.forward())
    if not outputs:
        raise Unavailable("outputs do not require grad")
    generator = torch.Generator(device=outputs[0].device).manual_seed(seed)
    grads = [torch.randn(o.shape, generator=generator, device=o.device, dtype=torch.float32)
             .to(o.dtype) for o in outputs]
    wrt = list(case.wrt)
    if mode == "backward":
        return lambda: torch.autograd.grad(outputs, wrt, grads, retain_graph=True,
                                           allow_unused=True)
    return lambda: torch.autograd.grad(_differentiable(case.forward()), wrt, grads,
                                       allow_unused=True)


def check_values(case: Case, seed: int) -> List[torch.Tensor]:
    """Canonical outputs, then the input gradients of a fixed random linear
    function of them (sum_i <canonical_i, R_i>, R_i seeded by ``seed``): the
    same numbers from any correct provider, whatever its output layout."""
    outputs = case.forward()
    canonical = [c for c in case.canonical(outputs)]
    values = [c.detach().float() for c in canonical]
    if case.wrt:
        generator = torch.Generator(device=canonical[0].device).manual_seed(seed)
        probe = sum((c.float() * torch.randn(c.shape, generator=generator, device=c.device)).sum()
                    for c in canonical if c.requires_grad)
        if isinstance(probe, torch.Tensor):
            grads = torch.autograd.grad(probe, list(case.wrt), allow_unused=True)
            values += [torch.zeros(()) if g is None else g.detach().float() for g in grads]
    return values


def relative_error(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """max over tensors of ||a - e||_F / ||e||_F (absolute when e is all zero)."""
    if len(actual) != len(expected):
        raise ValueError(f"provider gives {len(actual)} checked values, the reference "
                         f"{len(expected)}")
    worst = 0.0
    for a, e in zip(actual, expected):
        if tuple(a.shape) != tuple(e.shape):
            raise ValueError(f"shape {tuple(a.shape)} differs from the reference's {tuple(e.shape)}")
        a, e = a.double().cpu(), e.double().cpu()
        if not torch.isfinite(a).all():
            return float("inf")
        scale = e.norm().item()
        diff = (a - e).norm().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def check_tolerance(dtype: torch.dtype) -> float:
    # Relative Frobenius error allowed between two correct providers:
    # half-precision outputs and gradients each round at ~2^-8 relative, and
    # differing accumulation orders add a few roundings; fp32 agrees to ~1e-6,
    # so 1e-3 still fails any genuinely different computation.
    return 1e-3 if dtype == torch.float32 else 3e-2
