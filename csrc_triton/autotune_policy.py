"""How the autotuned kernels of csrc_triton choose their configs: ``ANITA_AUTOTUNE``.

  full    (default) Triton's autotuner as written: for every new key (nf4_matmul's is
          M, N, K and the dtypes) each config is compiled and timed, the fastest kept.
          nf4_matmul lists 6 configs, so a cold cache costs 6 compiles per kernel
          variant and a tuning run for every new M.
  pruned  one config per key, picked from the kernel's own list without timing: the
          first config whose BLOCK_M is the smallest that covers M rows (the largest
          BLOCK_M when M is above them all); a kernel whose key has no M gets its first
          config. At most one compile per config actually used and no tuning runs, so
          compile time is bounded when the cache is cold. bench/gpu_session.sh sets it:
          its figures are then those of the pruned choice (the fused path at M <= 16
          takes the 16-row tiles, up to 64 the 64-row ones, above that the 128-row ones),
          which full tuning can match or beat but not lose to beyond timing noise.

Read when csrc_triton is imported (``apply``, called at the end of its __init__) and
applied to every ``triton.autotune`` kernel of the package's modules, wherever a kernel
module defines it. Under the Triton interpreter nothing is autotuned and this does
nothing.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional

ENV = "ANITA_AUTOTUNE"
POLICIES = ("full", "pruned")


def policy_from_env() -> str:
    value = os.environ.get(ENV, "full").strip().lower() or "full"
    if value not in POLICIES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(POLICIES)}")
    return value


def pruned_choice(configs: List, rows: Optional[int]) -> List:
    """The one config ``pruned`` keeps for a launch covering ``rows`` rows (see above)."""
    sized = [c for c in configs if "BLOCK_M" in c.kwargs]
    if rows is None or not sized:
        return [configs[0]]
    covering = [c for c in sized if c.kwargs["BLOCK_M"] >= rows]
    if covering:
        smallest = min(c.kwargs["BLOCK_M"] for c in covering)
        return [next(c for c in covering if c.kwargs["BLOCK_M"] == smallest)]
    largest = max(c.kwargs["BLOCK_M"] for c in sized)
    return [next(c for c in sized if c.kwargs["BLOCK_M"] == largest)]


def _pruner(previous: Optional[Callable]) -> Callable:
    def prune(configs, named_args, **kwargs):
        if previous is not None:
            configs = previous(configs, named_args, **kwargs) or configs
        arguments: Dict = {**(named_args or {}), **kwargs}
        rows = arguments.get("M")
        return pruned_choice(list(configs), int(rows) if isinstance(rows, int) else None)
    prune.anita_policy = "pruned"
    return prune


def autotuned_kernels(package: str = "csrc_triton") -> List:
    """Every triton Autotuner held by a module of ``package`` (imported so far)."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:            # a triton without the class: nothing to find
        return []
    found, seen = [], set()
    for name, module in list(sys.modules.items()):
        if module is None or not (name == package or name.startswith(package + ".")):
            continue
        for value in vars(module).values():
            if isinstance(value, Autotuner) and id(value) not in seen:
                seen.add(id(value))
                found.append(value)
    return found


def apply(policy: Optional[str] = None, kernels: Optional[List] = None) -> int:
    """Apply ``policy`` (default: ANITA_AUTOTUNE) to ``kernels`` (default: every
    autotuned kernel of csrc_triton); returns how many were set to prune."""
    policy = policy or policy_from_env()
    if policy not in POLICIES:
        raise ValueError(f"autotune policy {policy!r}: expected one of {', '.join(POLICIES)}")
    changed = 0
    for tuner in autotuned_kernels() if kernels is None else kernels:
        current = getattr(tuner, "early_config_prune", None)
        if policy == "pruned" and getattr(current, "anita_policy", None) != "pruned":
            tuner.early_config_prune = _pruner(current)
            changed += 1
    return changed
