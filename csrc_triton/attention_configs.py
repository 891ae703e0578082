"""The flash attention kernels' tile configurations on a GPU: candidates per kernel and
padded head dim, pruned by the sm_90 compile check, autotuned among the survivors.

A candidate is (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M is the query tile
(rows) of every kernel and BLOCK_N its key tile, dK/dV included (there the key block
is the program's own, the query tiles are walked). Dot dims >= 64 become wgmma
(HGMMA) on sm_90; smaller ones mma.sync (HMMA).

Pruning is static, reproducible and made per triton: ``python -m tests.sm90_compile
--sweep --only attention`` compiles every candidate for sm_90 at LLaMA-3-8B shapes
(bf16, 32 query / 8 kv heads), at 32-bit and at 64-bit indexing, and reads its shared
memory, registers and spills. Each supported triton's compiler decides spills its own
way (of the 67 candidates, triton 3.6 prunes 5 that 3.9 keeps, and 3.9 prunes 2 that
3.6 keeps), so PRUNED_BY_TRITON holds one table per triton series, each listing the candidates
that failed under it at either index width or in the gap variant (HAS_GAP: bounds with a
per-query gap; autotuned among the same candidates), with what failed. The sweep test
(tests/test_hopper_compile.py, ``-m sweep``, run under each supported triton) holds
each table to its compiler's verdict both ways (every shipped config passes, every
pruned one fails), so an edit of the kernels that changes a verdict fails until the
table follows. The running triton uses its own table; a triton between or beyond the
checked ones uses the union of all of them (any config some checked compiler spilled).
What is left (``gpu_configs``) is what triton.autotune times on the first launch of
each (sequence bucket, heads, head dim, bounds, dtype).
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import triton


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

# candidates the sm_90 compile check rejected, per triton series: (kind, BLOCK_D, config)
# -> what failed (tests.sm90_attention.verdict at LLaMA-3-8B shapes, bf16, 32-bit index
# and, where that passed, 64-bit, then the gap variant; 2026-12-05; shared memory stayed within sm_90's 227 KiB
# for every candidate: registers decided)
PRUNED_BY_TRITON: Dict[str, Dict[Tuple[str, int, AttentionBlocks], str]] = {
    "3.9": {
        ("forward", 64, B(128, 128, 4, 2)): "spills (232 B stack, 136 STL/LDL)",
        ("forward", 128, B(128, 64, 4, 3)): "spills (240 B stack, 155 STL/LDL)",
        ("forward", 128, B(128, 128, 8, 2)): "spills (24 B stack, 10 STL/LDL)",
        ("forward", 256, B(64, 64, 8, 2)): "at 64-bit indexing: spills (8 B stack, 4 STL/LDL)",
        ("forward", 256, B(64, 32, 4, 2)): "spills (80 B stack, 41 STL/LDL)",
        ("forward", 256, B(128, 64, 8, 2)): "spills (8 B stack, 2 STL/LDL)",
        ("forward", 256, B(64, 64, 4, 2)): "spills (344 B stack, 202 STL/LDL)",
        ("forward", 256, B(64, 128, 8, 1)): "spills (120 B stack, 60 STL/LDL)",
        ("dkdv", 64, B(64, 128, 8, 2)): "spills (16 B stack, 8 STL/LDL)",
        ("dkdv", 64, B(128, 128, 8, 2)): "spills (48 B stack, 29 STL/LDL)",
        ("dkdv", 128, B(64, 64, 4, 2)): "spills (72 B stack, 48 STL/LDL)",
        ("dkdv", 128, B(64, 128, 8, 2)): "spills (360 B stack, 252 STL/LDL)",
        ("dkdv", 128, B(32, 64, 4, 2)): "spills (40 B stack, 21 STL/LDL)",
        ("dkdv", 128, B(64, 32, 4, 2)): "at 64-bit indexing: spills (8 B stack, 4 STL/LDL)",
        ("dkdv", 256, B(64, 64, 8, 1)): "spills (584 B stack, 416 STL/LDL)",
        ("dkdv", 256, B(32, 32, 4, 2)): "spills (168 B stack, 129 STL/LDL)",
        ("dkdv", 256, B(64, 32, 8, 1)): "spills (240 B stack, 192 STL/LDL)",
        ("dkdv", 256, B(32, 64, 4, 1)): "spills (1040 B stack, 947 STL/LDL)",
        ("dkdv", 256, B(16, 64, 4, 1)): "spills (1032 B stack, 941 STL/LDL)",
        ("dq", 128, B(32, 64, 4, 2)): "spills (8 B stack, 2 STL/LDL)",
        ("dq", 256, B(64, 64, 8, 1)): "spills (200 B stack, 144 STL/LDL)",
        ("dq", 256, B(64, 32, 8, 1)): "spills (48 B stack, 25 STL/LDL)",
        ("dq", 256, B(32, 64, 4, 1)): "spills (8 B stack, 3 STL/LDL)",
    },
    "3.6": {
        ("forward", 64, B(128, 128, 4, 2)): "spills (128 B stack, 86 STL/LDL)",
        ("forward", 128, B(128, 64, 4, 3)): "spills (296 B stack, 157 STL/LDL)",
        ("forward", 128, B(128, 128, 8, 2)): "spills (8 B stack, 4 STL/LDL)",
        ("forward", 128, B(64, 128, 8, 2)): "spills (8 B stack, 2 STL/LDL)",
        ("forward", 256, B(64, 64, 8, 2)): "spills (16 B stack, 6 STL/LDL)",
        ("forward", 256, B(64, 32, 4, 2)): "with a gap (HAS_GAP): spills (8 B stack, 2 STL/LDL)",
        ("forward", 256, B(128, 64, 8, 2)): "spills (64 B stack, 32 STL/LDL)",
        ("forward", 256, B(64, 64, 4, 2)): "spills (128 B stack, 63 STL/LDL)",
        ("forward", 256, B(64, 128, 8, 1)): "spills (392 B stack, 173 STL/LDL)",
        ("dkdv", 64, B(64, 128, 8, 2)): "spills (24 B stack, 12 STL/LDL)",
        ("dkdv", 64, B(128, 128, 8, 2)): "at 64-bit indexing: spills (16 B stack, 6 STL/LDL)",
        ("dkdv", 128, B(64, 64, 8, 2)): "at 64-bit indexing: spills (16 B stack, 6 STL/LDL)",
        ("dkdv", 128, B(64, 64, 4, 2)): "spills (8 B stack, 2 STL/LDL)",
        ("dkdv", 128, B(64, 128, 8, 2)): "spills (336 B stack, 162 STL/LDL)",
        ("dkdv", 128, B(32, 64, 4, 2)): "spills (24 B stack, 10 STL/LDL)",
        ("dkdv", 128, B(64, 32, 4, 2)): "at 64-bit indexing: spills (32 B stack, 15 STL/LDL)",
        ("dkdv", 128, B(64, 64, 8, 3)): "spills (40 B stack, 18 STL/LDL)",
        ("dkdv", 256, B(64, 64, 8, 1)): "spills (664 B stack, 284 STL/LDL)",
        ("dkdv", 256, B(32, 32, 4, 2)): "spills (152 B stack, 82 STL/LDL)",
        ("dkdv", 256, B(64, 32, 8, 1)): "spills (424 B stack, 168 STL/LDL)",
        ("dkdv", 256, B(32, 64, 4, 1)): "spills (1064 B stack, 914 STL/LDL)",
        ("dkdv", 256, B(16, 64, 4, 1)): "spills (1064 B stack, 914 STL/LDL)",
        ("dq", 64, B(128, 128, 8, 2)): "spills (8 B stack, 2 STL/LDL)",
        ("dq", 128, B(64, 128, 8, 2)): "spills (56 B stack, 32 STL/LDL)",
        ("dq", 256, B(64, 64, 8, 1)): "spills (472 B stack, 213 STL/LDL)",
        ("dq", 256, B(64, 32, 8, 1)): "spills (320 B stack, 131 STL/LDL)",
    },
}


def triton_series(version: str) -> str:
    """'3.9.0' -> '3.9' (the key of PRUNED_BY_TRITON)."""
    return ".".join(version.split("+")[0].split(".")[:2])


def pruned_for(version: Optional[str] = None) -> Dict[Tuple[str, int, AttentionBlocks], str]:
    """The pruned candidates under triton ``version`` (default: the running one): its
    series' table, or for a series nobody checked the union of every table."""
    series = triton_series(version or triton.__version__)
    if series in PRUNED_BY_TRITON:
        return PRUNED_BY_TRITON[series]
    union: Dict[Tuple[str, int, AttentionBlocks], str] = {}
    for checked, table in sorted(PRUNED_BY_TRITON.items()):
        for key, why in table.items():
            union.setdefault(key, f"{why} (triton {checked})")
    return union


# the running triton's
PRUNED = pruned_for()


def head_dim_class(block_d: int) -> int:
    """The HEAD_DIMS entry whose configs serve a padded head dim (16 and 32 use 64's)."""
    return next(d for d in HEAD_DIMS if block_d <= d)


def gpu_configs(kind: str, block_d: int) -> List[AttentionBlocks]:
    """The candidates of (kind, head dim) that passed the running triton's sm_90 check."""
    if kind not in KINDS:
        raise ValueError(f"gpu_configs: unknown kernel kind {kind!r}")
    d = head_dim_class(block_d)
    return [c for c in CANDIDATES[(kind, d)] if (kind, d, c) not in PRUNED]


def reference_config(kind: str, block_d: int) -> AttentionBlocks:
    """The default compile check's configuration: the first candidate the running triton
    keeps (the one the kernel shipped with before autotuning, where it passes)."""
    return gpu_configs(kind, block_d)[0]
