"""The flash attention kernels' tile configurations on a GPU: candidates per kernel and
padded head dim, pruned by the sm_90 compile check, autotuned among the survivors.

A candidate is (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M is the query tile
(rows) of every kernel and BLOCK_N its key tile, dK/dV included (there the key block
is the program's own, the query tiles are walked). Dot dims >= 64 become wgmma
(HGMMA) on sm_90; smaller ones mma.sync (HMMA).

Pruning is static and reproducible: ``python -m tests.sm90_compile --sweep --only
attention`` compiles every candidate for sm_90 at LLaMA-3-8B shapes (bf16, 32 query /
8 kv heads) and reads its shared memory, registers and spills. PRUNED lists the
candidates that failed, with what failed; the sweep test
(tests/test_hopper_compile.py, ``-m sweep``) holds this table to the compiler's
verdict both ways (every shipped config passes, every pruned one fails), so an
edit of the kernels that changes a verdict fails CI until the table follows.
What is left (``gpu_configs``) is what triton.autotune times on the first launch
of each (sequence bucket, heads, head dim, bounds, dtype).
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Tuple


class AttentionBlocks(NamedTuple):
    """Tile sizes and launch options of the kernels. A query tile holds BLOCK_M tokens of
    each of BLOCK_H query heads that share one kv head (BLOCK_H * BLOCK_M rows); dkdv
    walks such query tiles against its BLOCK_N keys."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    block_h: int = 1


KINDS = ("forward", "dkdv", "dq")
HEAD_DIMS = (64, 128, 256)       # padded head dims (BLOCK_D) the GPU configs are written for

B = AttentionBlocks
# the backward kernels' candidates (dK/dV and dQ share them; each is pruned on its own)
_BACKWARD = {
    64: (B(64, 64, 4, 2), B(64, 64, 8, 2), B(128, 64, 8, 2), B(64, 128, 8, 2), B(32, 64, 4, 2),
         B(64, 32, 4, 3), B(128, 128, 8, 2), B(64, 64, 4, 3)),
    128: (B(64, 64, 8, 2), B(64, 64, 4, 2), B(128, 64, 8, 2), B(64, 128, 8, 2), B(32, 64, 4, 2),
          B(64, 32, 4, 2), B(64, 64, 8, 3), B(128, 32, 8, 2)),
    256: (B(32, 64, 8, 1), B(64, 64, 8, 1), B(32, 32, 4, 2), B(64, 32, 8, 1), B(32, 64, 4, 1),
          B(16, 64, 4, 1)),
}
# candidates per (kind, BLOCK_D); the first of each list is the configuration this
# kernel shipped with before autotuning (the default compile check's reference)
CANDIDATES: Dict[Tuple[str, int], Tuple[AttentionBlocks, ...]] = {
    ("forward", 64): (B(128, 64, 4, 3), B(128, 128, 8, 3), B(128, 64, 8, 3), B(64, 64, 4, 3),
                      B(128, 32, 4, 4), B(64, 128, 4, 2), B(128, 128, 4, 2), B(64, 32, 4, 4)),
    ("forward", 128): (B(128, 64, 8, 3), B(128, 64, 4, 3), B(128, 128, 8, 2), B(64, 64, 4, 3),
                       B(128, 32, 8, 4), B(64, 128, 8, 2), B(128, 64, 8, 2), B(64, 64, 4, 4)),
    ("forward", 256): (B(64, 64, 8, 2), B(64, 32, 4, 2), B(128, 64, 8, 2), B(64, 64, 4, 2),
                       B(128, 32, 8, 2), B(64, 128, 8, 1), B(64, 32, 8, 3)),
    **{(kind, d): configs for kind in ("dkdv", "dq") for d, configs in _BACKWARD.items()},
}

# candidates the sm_90 compile check rejected: (kind, BLOCK_D, config) -> what failed
# (tests.sm90_attention.verdict at LLaMA-3-8B shapes, bf16, 2026-12-01; shared memory
# stayed within sm_90's 227 KiB for every candidate: registers decided)
PRUNED: Dict[Tuple[str, int, AttentionBlocks], str] = {
    ("forward", 64, B(128, 128, 4, 2)): "spills (232 B stack, 136 STL/LDL)",
    ("dkdv", 64, B(64, 128, 8, 2)): "spills (16 B stack, 8 STL/LDL)",
    ("dkdv", 64, B(128, 128, 8, 2)): "spills (48 B stack, 29 STL/LDL)",
    ("forward", 128, B(128, 64, 4, 3)): "spills (240 B stack, 155 STL/LDL)",
    ("forward", 128, B(128, 128, 8, 2)): "spills (24 B stack, 10 STL/LDL)",
    ("dkdv", 128, B(64, 64, 4, 2)): "spills (72 B stack, 48 STL/LDL)",
    ("dkdv", 128, B(64, 128, 8, 2)): "spills (360 B stack, 252 STL/LDL)",
    ("dkdv", 128, B(32, 64, 4, 2)): "spills (40 B stack, 21 STL/LDL)",
    ("dq", 128, B(32, 64, 4, 2)): "spills (8 B stack, 2 STL/LDL)",
    ("forward", 256, B(64, 32, 4, 2)): "spills (80 B stack, 41 STL/LDL)",
    ("forward", 256, B(128, 64, 8, 2)): "spills (8 B stack, 2 STL/LDL)",
    ("forward", 256, B(64, 64, 4, 2)): "spills (344 B stack, 202 STL/LDL)",
    ("forward", 256, B(64, 128, 8, 1)): "spills (120 B stack, 60 STL/LDL)",
    ("dkdv", 256, B(64, 64, 8, 1)): "spills (584 B stack, 416 STL/LDL)",
    ("dkdv", 256, B(32, 32, 4, 2)): "spills (168 B stack, 129 STL/LDL)",
    ("dkdv", 256, B(64, 32, 8, 1)): "spills (240 B stack, 192 STL/LDL)",
    ("dkdv", 256, B(32, 64, 4, 1)): "spills (1040 B stack, 947 STL/LDL)",
    ("dkdv", 256, B(16, 64, 4, 1)): "spills (1032 B stack, 941 STL/LDL)",
    ("dq", 256, B(64, 64, 8, 1)): "spills (200 B stack, 144 STL/LDL)",
    ("dq", 256, B(64, 32, 8, 1)): "spills (48 B stack, 25 STL/LDL)",
    ("dq", 256, B(32, 64, 4, 1)): "spills (8 B stack, 3 STL/LDL)",
}


def head_dim_class(block_d: int) -> int:
    """The HEAD_DIMS entry whose configs serve a padded head dim (16 and 32 use 64's)."""
    return next(d for d in HEAD_DIMS if block_d <= d)


def gpu_configs(kind: str, block_d: int) -> List[AttentionBlocks]:
    """The candidates of (kind, head dim) that passed the sm_90 compile check."""
    if kind not in KINDS:
        raise ValueError(f"gpu_configs: unknown kernel kind {kind!r}")
    d = head_dim_class(block_d)
    return [c for c in CANDIDATES[(kind, d)] if (kind, d, c) not in PRUNED]


def reference_config(kind: str, block_d: int) -> AttentionBlocks:
    """The configuration the kernel shipped with before autotuning (CANDIDATES' first)."""
    return CANDIDATES[(kind, head_dim_class(block_d))][0]
