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

Every autotuned kernel of csrc_triton is built through ``autotune`` below, at import
(nf4_matmul) or on first use (the attention kernels, one per head-dim class), and the
policy is read from the environment when it is built, so both kinds follow it. Under
``pruned`` the kernel is not wrapped in triton's Autotuner at all but in a
``PrunedLauncher`` that launches the chosen config directly: triton 3.6's Autotuner
times even a list pruned to one config (3.9's does not). Under the Triton interpreter
nothing is autotuned and the launchers never call ``autotune``.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

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


class PrunedLauncher:
    """``kernel[grid](**args)`` like a triton Autotuner, launching ``pruned_choice``'s
    config directly (no Autotuner, so no timing run on any triton). ``grid`` may be a
    callable of the launch's meta-parameters (the arguments plus the config's), as for
    triton.autotune. ``chosen`` records each key's choice, for tests and reports."""

    anita_policy = "pruned"

    def __init__(self, fn, configs: Sequence, key: Sequence[str]):
        if not configs:
            raise ValueError("PrunedLauncher: no configs to choose from")
        self.fn, self.configs, self.keys = fn, list(configs), list(key)
        self.chosen: Dict[tuple, object] = {}

    def choose(self, args: Dict) -> object:
        rows = args.get("M")
        key = tuple(args.get(k) for k in self.keys)
        if key not in self.chosen:
            self.chosen[key] = pruned_choice(self.configs,
                                             int(rows) if isinstance(rows, int) else None)[0]
        return self.chosen[key]

    def __getitem__(self, grid) -> Callable:
        def launch(**args):
            config = self.choose(args)
            meta = {**args, **config.kwargs}
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            return self.fn[grid(meta) if callable(grid) else grid](**args, **config.kwargs,
                                                                    **options)
        return launch


def autotune(fn, configs: Sequence, key: Sequence[str], policy: Optional[str] = None):
    """``fn`` autotuned over ``configs`` by ``key`` under ``policy`` (default: ANITA_AUTOTUNE
    now): triton.autotune for ``full``, a PrunedLauncher for ``pruned``."""
    policy = policy or policy_from_env()
    if policy not in POLICIES:
        raise ValueError(f"autotune policy {policy!r}: expected one of {', '.join(POLICIES)}")
    if policy == "pruned":
        return PrunedLauncher(fn, configs, key)
    import triton
    return triton.autotune(configs=list(configs), key=list(key))(fn)
