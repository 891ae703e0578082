"""The flash attention kernels' specs for tests/sm90_compile.py: every tile candidate of
csrc_triton.attention_configs, at LLaMA-3-8B shapes (bf16, one packed 8K-token row,
32 query / 8 kv heads; q/k/v as slices of the fused q/k/v output, dq/dk/dv written
into one such buffer), and the pruning verdict the configs table must agree with.

Default run: each kernel's reference configuration (the one it shipped with before
autotuning) at head dims 64 and 128, its INDEX_64 variant and its HAS_GAP variant
(bounds with a per-query gap: a DPO pair packed with its prompt once); ``--sweep``:
every candidate at 64, 128 and 256, each also with HAS_GAP (autotuning picks among
the same candidates for both).
"""
from __future__ import annotations

import importlib
from dataclasses import replace
from typing import List, Optional

from tests.sm90_compile import (HEAD_DIM, KV_HEADS, Q_HEADS, SHARED_MEMORY_LIMIT, KernelSpec,
                                triton_next_pow2)

SEQ = 8192


def spec_name(kind: str, head_dim: int, c) -> str:
    return (f"attention_{kind}/bf16-d{head_dim}-{c.block_m}x{c.block_n}"
            f"w{c.num_warps}s{c.num_stages}")


def verdict(report: dict) -> Optional[str]:
    """Why a compiled candidate is pruned (None: it passes): failed to compile, shared
    memory over sm_90's limit, or registers spilled (stack bytes or STL/LDL)."""
    if not report["ok"]:
        return "does not compile"
    if report["shared"] > SHARED_MEMORY_LIMIT:
        return f"{report['shared']} B of shared memory"
    if report["stack"] or report["spill_instructions"]:
        return f"spills ({report['stack']} B stack, {report['spill_instructions']} STL/LDL)"
    return None


def _pointers(kind: str, dtype, torch) -> dict:
    gap = dict(gap_start_ptr=torch.int32, gap_end_ptr=torch.int32)
    return dict(gap, **{
        "forward": dict(q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, out_ptr=dtype,
                        lse_ptr=torch.float32, first_key_ptr=torch.int32),
        "dkdv": dict(q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, d_out_ptr=dtype,
                     lse_ptr=torch.float32, delta_ptr=torch.float32, dk_ptr=dtype, dv_ptr=dtype,
                     first_key_ptr=torch.int32, key_end_ptr=torch.int32),
        "dq": dict(q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, d_out_ptr=dtype, lse_ptr=torch.float32,
                   delta_ptr=torch.float32, dq_ptr=dtype, first_key_ptr=torch.int32),
    }[kind])


def attention_specs() -> List[KernelSpec]:
    import torch
    attention = importlib.import_module("csrc_triton.attention")
    configs = importlib.import_module("csrc_triton.attention_configs")
    dtype = torch.bfloat16
    specs = []
    for head_dim in configs.HEAD_DIMS:
        block_d = max(16, triton_next_pow2(head_dim))
        scale = head_dim ** -0.5
        fused = (Q_HEADS + 2 * KV_HEADS) * head_dim     # the fused q/k/v row
        strides = dict(stride_q=fused, stride_kv=fused, stride_o=Q_HEADS * head_dim)
        shared = dict(seq=SEQ, n_q_heads=Q_HEADS, n_kv_heads=KV_HEADS, group=Q_HEADS // KV_HEADS,
                      head_dim=head_dim, qk_scale_log2=scale * attention._LOG2E,
                      seq_bucket=SEQ, HAS_BOUNDS=True, HAS_GAP=False, DOT_FP32=False,
                      BLOCK_D=block_d,
                      INDEX_64=False, **strides)
        for kind in configs.KINDS:
            extra = {"forward": {}, "dkdv": dict(scale=scale, stride_dkv=fused),
                     "dq": dict(scale=scale, stride_dq=fused)}[kind]
            reference = configs.reference_config(kind, block_d)
            for c in configs.CANDIDATES[(kind, head_dim)]:
                pruned = (kind, head_dim, c) in configs.PRUNED
                default = c == reference and head_dim <= HEAD_DIM
                spec = KernelSpec(
                    spec_name(kind, head_dim, c), f"csrc_triton.attention_kernels:"
                    f"_attention_{kind}_kernel",
                    dict(_pointers(kind, dtype, torch), **shared, **extra, BLOCK_M=c.block_m,
                         BLOCK_N=c.block_n, BLOCK_H=c.block_h),
                    num_warps=c.num_warps, num_stages=c.num_stages, hot=not pruned,
                    sweep=not default, pruned=pruned,
                    # wgmma needs >= 64 rows: the query tile (every dot of forward and dQ),
                    # or in dK/dV also the key tile (its dK and dV dots)
                    expect_hgmma=not pruned and (c.block_m >= 64
                                                 or (kind == "dkdv" and c.block_n >= 64)))
                specs.append(spec)
                # the 64-bit index variant (a launch past 2^31 - 1 elements) of every
                # candidate: autotuning may pick any of them there too
                specs.append(replace(spec, name=spec.name + "-idx64",
                                     args=dict(spec.args, INDEX_64=True), expect_hgmma=False))
                # the gap variant (same tiles): its own spec, held to the same verdict
                specs.append(replace(spec, name=spec.name + "-gap",
                                     args=dict(spec.args, HAS_GAP=True)))
        delta = KernelSpec(
            f"attention_delta/bf16-d{head_dim}",
            "csrc_triton.attention_kernels:_attention_delta_kernel",
            dict(out_ptr=dtype, d_out_ptr=dtype, delta_ptr=torch.float32, n_rows=SEQ * Q_HEADS,
                 seq=SEQ, n_q_heads=Q_HEADS, head_dim=head_dim, stride_o=Q_HEADS * head_dim,
                 BLOCK_ROWS=attention._DELTA_ROWS, BLOCK_D=block_d, INDEX_64=False),
            hot=True, sweep=head_dim > HEAD_DIM)
        specs.append(delta)
    return specs
