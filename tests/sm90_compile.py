"""Compile csrc_triton's kernels ahead of time for Hopper (sm_90) on a machine without a GPU,
and read what the GPU would run: shared memory, registers, spills, tensor-core instructions.

    python -m tests.sm90_compile                 # the default specs, a table on stdout
    python -m tests.sm90_compile --sweep         # every autotune config as well
    python -m tests.sm90_compile --json out.json --only nf4_matmul_fwd

Must run in its own process: TRITON_INTERPRET=0 has to be set before triton is
imported (this module does it in main(); a test process running the interpreter
calls it through a subprocess, see tests/test_hopper_compile.py).

How: each KernelSpec names a kernel and the arguments its launcher passes at
LLaMA-3-8B shapes (a torch dtype stands for a tensor of that dtype). triton's
own argument binder turns them into the signature, constexprs and divisibility
attributes a real launch would produce (MockTensor pointers count as 16-byte
aligned, as torch's allocations are), triton.compile builds for
GPUTarget("cuda", 90, 32), and the wheel's cuobjdump reads the cubin:
  --dump-resource-usage  REG (registers/thread), STACK (bytes of local stack:
                         spills or local arrays; the LOCAL column stays 0 even
                         when ptxas reports spills)
  -sass                  instruction mix: HGMMA (wgmma, Hopper tensor cores),
                         HMMA (mma.sync, the pre-Hopper path), STL/LDL (local
                         memory: spills), and the main loop (the backward branch
                         whose body holds the most MMAs), whose non-MMA
                         instruction count per MMA is the decode overhead.

The specs come from the op records (csrc_triton/records.py): each record names the
function returning its family's KernelSpecs (compile_specs); a new op family joins
by naming one in its record (names are '<kernel>/<variant>'). ``--list`` prints the
spec names by family without compiling.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional

# PTX instructions that round differently from the interpreter's NumPy (correctly
# rounded) arithmetic: approximate transcendental functions, sqrt and division.
APPROXIMATE_PTX = ("sqrt.approx", "rsqrt.approx", "div.full", "div.approx", "ex2.approx",
                   "lg2.approx", "rcp.approx", "sin.approx", "cos.approx", "tanh.approx")

# sm_90's per-block shared memory limit with the opt-in attribute (227 KiB).
SHARED_MEMORY_LIMIT = 232_448

# LLaMA-3-8B shapes the specs use.
HIDDEN, INTERMEDIATE, VOCAB = 4096, 14336, 128256
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
TOKENS = 4096                     # tokens per micro-batch (M of the projections)
SMALL_M = 16                      # a generation / evaluation batch (the fused NF4 path)


@dataclass(frozen=True)
class KernelSpec:
    """One specialization of one kernel, compiled as its launcher would launch it."""
    name: str                     # '<kernel>/<variant>', unique
    kernel: str                   # 'module:attribute' of the @triton.jit function
    args: Dict[str, object]       # every kernel argument: torch dtype (a tensor), int, float, bool
    num_warps: int = 4
    num_stages: int = 3
    fp_fusion: Optional[bool] = None   # launch option enable_fp_fusion (None: triton's default)
    hot: bool = False             # a hot kernel's chosen config: must not spill
    expect_hgmma: bool = False    # fp16/bf16 tl.dot with BLOCK_M >= 64: must emit HGMMA
    sweep: bool = False           # only with --sweep (autotune configs beyond the chosen ones)
    pruned: bool = False          # a candidate its configs table excludes (expected to fail)
    family: str = ""              # the OpRecord whose compile_specs gave it (set by all_specs)


@dataclass
class CompileReport:
    name: str
    ok: bool
    error: str = ""
    seconds: float = 0.0
    shared: int = 0               # bytes of shared memory per block
    registers: int = 0            # per thread
    stack: int = 0                # bytes of local stack per thread
    spill_instructions: int = 0   # STL + LDL in the SASS
    wide_loads: int = 0           # LDG.E.128 (16 bytes per thread) in the SASS
    wide_stores: int = 0          # STG.E.128
    hgmma: int = 0
    hmma: int = 0
    ffma: int = 0
    sass_instructions: int = 0
    loop_instructions: int = 0    # in the main loop (0: no MMA loop found)
    loop_mma: int = 0
    # every loop (backward branch) whose body holds MMAs: [instructions, MMAs] in address
    # order (attention: the masked loop and the unmasked one, which is the main loop)
    mma_loops: List[List[int]] = field(default_factory=list)
    ptx_fma_f32: int = 0          # fma.rn.f32 in the PTX (contracted fp32 multiply-adds)
    ptx_approx: Dict[str, int] = field(default_factory=dict)  # approximate math ops in the PTX
    spec: dict = field(default_factory=dict)
    triton: str = ""              # the version that compiled it (tests/stacks.py)

    @property
    def non_mma_per_mma(self) -> Optional[float]:
        if not self.loop_mma:
            return None
        return (self.loop_instructions - self.loop_mma) / self.loop_mma


# ---------------------------------------------------------------------------------------
# compiling one spec
# ---------------------------------------------------------------------------------------

def _kernel_function(path: str):
    module_name, attribute = path.split(":")
    return getattr(importlib.import_module(module_name), attribute)


def _bind(fn, spec: KernelSpec, backend):
    """signature, constexprs, attrs exactly as JITFunction.run derives them for a launch."""
    import torch
    from triton.runtime.jit import MockTensor, create_function_from_signature

    missing = [p for p in fn.arg_names if p not in spec.args]
    extra = [a for a in spec.args if a not in fn.arg_names]
    if missing or extra:
        raise ValueError(f"{spec.name}: arguments missing {missing}, unknown {extra}")
    values = {k: MockTensor(v) if isinstance(v, torch.dtype) else v for k, v in spec.args.items()}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, _ = binder(**values)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    if spec.fp_fusion is not None:
        options["enable_fp_fusion"] = spec.fp_fusion
    _, signature, constexprs, attrs = fn._pack_args(backend, dict(options), bound,
                                                    specialization, options)
    return signature, constexprs, attrs, options


def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_BRANCH_TARGET = re.compile(r"\bBRA(?:\.\w+)*\s+(?:\w+,\s*)?0x([0-9a-f]+)")


def _main_loop(sass: str):
    """((instructions, MMAs) in the body of the backward branch whose loop holds the
    most MMAs (the innermost, i.e. shortest, such loop on a tie), and [instructions,
    MMAs] of every loop with MMAs)."""
    instructions = []          # (address, opcode, branch target or None)
    for line in sass.splitlines():
        m = _SASS_LINE.search(line)
        if m:
            target = _BRANCH_TARGET.search(line) if m.group(2).startswith("BRA") else None
            instructions.append((int(m.group(1), 16), m.group(2),
                                 int(target.group(1), 16) if target else None))
    best, loops = (0, 0), []
    for address, _, target in instructions:
        if target is None or target >= address:
            continue
        body = [op for a, op, _ in instructions if target <= a <= address and op != "NOP"]
        mma = sum(op.startswith(("HGMMA", "HMMA")) for op in body)
        if mma:
            loops.append([len(body), mma])
        if mma > best[1] or (mma == best[1] and mma and len(body) < best[0]):
            best = (len(body), mma)
    return best, loops


def compile_spec(spec: KernelSpec) -> CompileReport:
    """Compile one spec for sm_90 and measure it; never raises (errors go in the report)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    report = CompileReport(name=spec.name, ok=False, spec=_describe(spec),
                           triton=triton.__version__)
    start = time.perf_counter()
    try:
        fn = _kernel_function(spec.kernel)
        target = GPUTarget("cuda", 90, 32)
        signature, constexprs, attrs, options = _bind(fn, spec, make_backend(target))
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                options=options)
        report.shared = int(kernel.metadata.shared)
        ptx = kernel.asm["ptx"]
        report.ptx_fma_f32 = len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\b", ptx))
        for op in APPROXIMATE_PTX:
            count = len(re.findall(r"\b" + re.escape(op) + r"\b", ptx))
            if count:
                report.ptx_approx[op] = count
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                                   capture_output=True, text=True, check=True).stdout
            sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)],
                                  capture_output=True, text=True, check=True).stdout
        report.registers = int(re.search(r"REG:(\d+)", usage).group(1))
        report.stack = int(re.search(r"STACK:(\d+)", usage).group(1))
        opcodes = [m.group(2) for m in map(_SASS_LINE.search, sass.splitlines()) if m]
        report.sass_instructions = len(opcodes)
        report.hgmma = sum(op.startswith("HGMMA") for op in opcodes)
        report.hmma = sum(op.startswith("HMMA") for op in opcodes)
        report.ffma = sum(op.startswith("FFMA") for op in opcodes)
        report.spill_instructions = sum(op.startswith(("STL", "LDL")) for op in opcodes)
        report.wide_loads = sum(op.startswith("LDG") and op.endswith(".128") for op in opcodes)
        report.wide_stores = sum(op.startswith("STG") and op.endswith(".128") for op in opcodes)
        (report.loop_instructions, report.loop_mma), report.mma_loops = _main_loop(sass)
        report.ok = True
    except Exception as err:  # noqa: BLE001 - a failed compile is a result
        last_line = (str(err).strip().splitlines() or [""])[-1]
        report.error = f"{type(err).__name__}: {last_line[:300]}"
    report.seconds = time.perf_counter() - start
    return report


def _describe(spec: KernelSpec) -> dict:
    out = asdict(spec)
    out["args"] = {k: str(v).replace("torch.", "") for k, v in spec.args.items()}
    return out


# ---------------------------------------------------------------------------------------
# the spec table (csrc_triton's kernels as their launchers call them)
# ---------------------------------------------------------------------------------------

def _dtypes():
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


_NF4_N, _NF4_K, _NF4_BLOCKSIZE = INTERMEDIATE, HIDDEN, 64    # gate_proj: the largest weight


def nf4_quantize_specs() -> List[KernelSpec]:
    """nf4 quantize and nested quantize (the absmax of double quantization)."""
    import torch
    codebook = importlib.import_module("csrc_triton.nf4_codebook")
    nf4_decode = importlib.import_module("csrc_triton.nf4_decode")
    bs = _NF4_BLOCKSIZE
    numel, n_blocks = _NF4_N * _NF4_K, _NF4_N * _NF4_K // bs
    per_program = nf4_decode._blocks_per_program(n_blocks, bs)
    specs = [KernelSpec(
        f"nf4_quantize/{tag}", "csrc_triton.nf4_encode:_nf4_quantize_kernel",
        dict(w_ptr=dtype, code_ptr=torch.float32, packed_ptr=torch.uint8,
             absmax_ptr=torch.float32, numel=numel, n_blocks=n_blocks,
             BLOCKSIZE=bs, BLOCKS_PER_PROGRAM=per_program), fp_fusion=False)
        for tag, dtype in _dtypes().items()]
    n_groups = -(-n_blocks // codebook.NESTED_BLOCKSIZE)
    specs.append(KernelSpec(
        "nested_quantize/fp32", "csrc_triton.nf4_encode:_nested_quantize_kernel",
        dict(absmax_ptr=torch.float32, offset_ptr=torch.float32, map_ptr=torch.float32,
             absmax_q_ptr=torch.uint8, nested_absmax_ptr=torch.float32, n_blocks=n_blocks,
             n_groups=n_groups, GROUP=codebook.NESTED_BLOCKSIZE,
             GROUPS_PER_PROGRAM=nf4_decode._blocks_per_program(n_groups,
                                                               codebook.NESTED_BLOCKSIZE)),
        fp_fusion=False))
    return specs


def nf4_dequantize_specs() -> List[KernelSpec]:
    """nf4 dequantize (single / double, each dtype), q/k/v segmented, and the FMA control."""
    import torch
    codebook = importlib.import_module("csrc_triton.nf4_codebook")
    nf4_decode = importlib.import_module("csrc_triton.nf4_decode")
    bs = _NF4_BLOCKSIZE
    numel, n_blocks = _NF4_N * _NF4_K, _NF4_N * _NF4_K // bs
    per_program = nf4_decode._blocks_per_program(n_blocks, bs)
    specs = []
    for tag, dtype in _dtypes().items():
        for double_quant in (True, False):
            absmax = torch.uint8 if double_quant else torch.float32
            specs.append(KernelSpec(
                f"nf4_dequantize/{tag}-{'double' if double_quant else 'single'}",
                "csrc_triton.nf4_decode:_nf4_dequantize_kernel",
                dict(packed_ptr=torch.uint8, absmax_ptr=absmax, code_ptr=torch.float32,
                     nested_absmax_ptr=torch.float32, nested_code_ptr=torch.float32,
                     nested_offset_ptr=torch.float32, out_ptr=dtype, numel=numel,
                     n_bytes=(numel + 1) // 2, n_blocks=n_blocks, BLOCKSIZE=bs, BLOCKS_PER_PROGRAM=per_program,
                     DOUBLE_QUANT=double_quant, NESTED=codebook.NESTED_BLOCKSIZE, SEGMENTED=False,
                     **_NO_SEGMENTS),
                fp_fusion=False, hot=True))
    # q/k/v concatenated (nf4_concat): the nested absmax decoded per segment
    segmented = next(s for s in specs if s.name == "nf4_dequantize/bf16-double")
    specs.append(replace(segmented, name="nf4_dequantize/bf16-double-segmented",
                         args={**segmented.args, "SEGMENTED": True, **QKV_SEGMENTS}))
    # the control for the no-FMA check: the same decode with contraction allowed
    decode = next(s for s in specs if s.name == "nf4_dequantize/fp32-double")
    specs.append(replace(decode, name="fma_control/nf4_dequantize-fp32-double",
                         fp_fusion=True, hot=False))
    return specs


def nf4_matmul_specs() -> List[KernelSpec]:
    """The fused NF4 matmul kernels (forward, backward-input) for every GPU config."""
    import torch
    codebook = importlib.import_module("csrc_triton.nf4_codebook")
    matmul = importlib.import_module("csrc_triton.nf4_matmul")
    specs = []
    n, k, bs = _NF4_N, _NF4_K, _NF4_BLOCKSIZE
    chosen = matmul.CHOSEN_GPU_CONFIGS
    # M only matters through its divisibility by 16 (a specialization), so one
    # value stands for every M the fused path sees (it sees M <= the dispatch
    # threshold, unless overridden).
    m = TOKENS
    for cfg in matmul.GPU_CONFIGS:
        # fp32 activations never reach the fused kernel on a GPU (nf4_dense.choose_path):
        # it is not compiled for them (its IEEE fp32 dot takes minutes to compile and spills)
        for tag in ("bf16", "fp16"):
            dtype = _dtypes()[tag]
            sweep = cfg not in chosen
            common = dict(packed_ptr=torch.uint8, absmax_ptr=torch.uint8, code_ptr=torch.float32,
                          nested_absmax_ptr=torch.float32, nested_code_ptr=torch.float32,
                          nested_offset_ptr=torch.float32, R=16, lora_scale=2.0,
                          BLOCKSIZE=bs, DOUBLE_QUANT=True, NESTED=codebook.NESTED_BLOCKSIZE,
                          SEGMENTED=False, **_NO_SEGMENTS,
                          ROW_ALIGNED=True, HAS_LORA=True, BLOCK_R=16,
                          OPERANDS_IN_FP32=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                          BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
            mma = cfg.block_m >= 64
            variant = f"{tag}-{cfg.block_m}x{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}"
            fwd = KernelSpec(
                f"nf4_matmul_fwd/{variant}",
                "csrc_triton.nf4_matmul_kernels:_nf4_matmul_fwd_kernel",
                dict(x_ptr=dtype, y_ptr=dtype, xa_ptr=matmul.lora_operand_dtype(dtype),
                     lora_b_ptr=matmul.lora_operand_dtype(dtype), bias_ptr=dtype, HAS_BIAS=False,
                     M=m, N=n, K=k, **common),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, hot=not sweep,
                expect_hgmma=mma, sweep=sweep, fp_fusion=False)
            # the frozen projection bias (Qwen2's q/k/v) in the forward's epilogue
            specs += [fwd, replace(fwd, name=f"{fwd.name}-bias", args={**fwd.args, "HAS_BIAS": True})]
            bwd = KernelSpec(
                f"nf4_matmul_bwd/{variant}",
                "csrc_triton.nf4_matmul_kernels:_nf4_matmul_bwd_input_kernel",
                dict(dy_ptr=dtype, dx_ptr=dtype, g_ptr=matmul.lora_operand_dtype(dtype),
                     lora_a_ptr=matmul.lora_operand_dtype(dtype), keep_ptr=torch.uint8,
                     gate_ptr=dtype, up_ptr=dtype, M=m, N=n, K=k, keep_scale=1.25,
                     stride_gate=2 * k, stride_up=2 * k,
                     HAS_DROPOUT=True, HAS_SWIGLU=False, **common),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, hot=not sweep,
                expect_hgmma=mma, sweep=sweep, fp_fusion=False)
            specs.append(bwd)
            if sweep:
                continue
            # the fused q/k/v forward (segmented nested absmax, LoRA over 3 ranks) and
            # the down projection's backward with the SwiGLU epilogue (no dropout)
            qkv = replace(fwd, name=f"nf4_matmul_fwd/{variant}-qkv-segmented",
                          args={**fwd.args, "SEGMENTED": True, **QKV_SEGMENTS,
                                "N": HIDDEN + 2 * KV_HEADS * HEAD_DIM, "K": HIDDEN,
                                "R": 48, "BLOCK_R": 64})
            # Qwen2's fused q/k/v: the same with the bias [b_q; b_k; b_v]
            specs += [qkv, replace(qkv, name=f"{qkv.name}-bias", args={**qkv.args, "HAS_BIAS": True})]
            specs.append(replace(bwd, name=f"nf4_matmul_bwd/{variant}-down-swiglu",
                                 args={**bwd.args, "N": HIDDEN, "K": INTERMEDIATE,
                                       "stride_gate": 2 * INTERMEDIATE,
                                       "stride_up": 2 * INTERMEDIATE,
                                       "HAS_DROPOUT": False, "HAS_SWIGLU": True}))
    return specs


def low_rank_specs() -> List[KernelSpec]:
    """The rank-r LoRA products (lora_linear's low_rank_matmul)."""
    low_rank = importlib.import_module("csrc_triton.low_rank")
    specs = []
    for tag in ("bf16", "fp16"):
        dtype = _dtypes()[tag]
        specs.append(KernelSpec(
            f"low_rank_matmul/{tag}", "csrc_triton.low_rank:_low_rank_matmul_kernel",
            dict(a_ptr=dtype, b_ptr=dtype, c_ptr=dtype, M=TOKENS, N=32, K=HIDDEN,
                 stride_am=HIDDEN, stride_ak=1, stride_bk=1, stride_bn=HIDDEN, scale=1.0,
                 OPERANDS_IN_FP32=False, INDEX_64=False, **low_rank._GPU_BLOCKS),
            fp_fusion=False))
    return specs


# nested-absmax segment arguments (csrc_triton.nf4_decode.segment_args): none, and LLaMA-3-8B's
# q/k/v (q: 4096 x 4096, k and v: 1024 x 4096, blocks of 64, nested groups of 256)
_NO_SEGMENTS = dict(seg_block_1=0, seg_block_2=0, seg_group_1=0, seg_group_2=0)
QKV_SEGMENTS = dict(seg_block_1=HIDDEN * HIDDEN // 64,
                    seg_block_2=(HIDDEN + KV_HEADS * HEAD_DIM) * HIDDEN // 64,
                    seg_group_1=HIDDEN * HIDDEN // 64 // 256,
                    seg_group_2=(HIDDEN + KV_HEADS * HEAD_DIM) * HIDDEN // 64 // 256)


def rms_norm_specs() -> List[KernelSpec]:
    """rms_norm forward and backward at LLaMA-3-8B shapes, as the launcher tiles them."""
    import torch
    rms = importlib.import_module("csrc_triton.rms_norm")
    rows, cols = TOKENS, HIDDEN
    block_rows, block_cols, warps = rms._tiling(rows, cols)
    specs = []
    for tag, dtype in _dtypes().items():
        specs.append(KernelSpec(
            f"rms_norm_fwd/{tag}", "csrc_triton.rms_norm:_rms_norm_forward_kernel",
            dict(x_ptr=dtype, w_ptr=dtype, y_ptr=dtype, rstd_ptr=torch.float32, n_rows=rows,
                 n_cols=cols, stride_x=cols, stride_y=cols, eps=1e-5, BLOCK_ROWS=block_rows,
                 BLOCK_COLS=block_cols, INDEX_64=False),
            num_warps=warps, hot=True))
        specs.append(KernelSpec(
            f"rms_norm_bwd/{tag}", "csrc_triton.rms_norm:_rms_norm_backward_kernel",
            dict(dy_ptr=dtype, x_ptr=dtype, w_ptr=dtype, rstd_ptr=torch.float32, dx_ptr=dtype,
                 dw_partial_ptr=torch.float32, n_rows=rows, n_cols=cols, stride_dy=cols,
                 stride_x=cols, stride_dx=cols, rows_per_program=8,
                 BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, WEIGHT_GRAD=False,
                 INDEX_64=False),
            num_warps=warps, hot=True))
        # Qwen3's per-head q/k norm: rows = tokens x heads of width head_dim, weight frozen
        qk_rows, (qk_block_rows, qk_block_cols, qk_warps) = (
            TOKENS * Q_HEADS, rms._tiling(TOKENS * Q_HEADS, HEAD_DIM))
        specs.append(KernelSpec(
            f"rms_norm_fwd/{tag}-qk-head{HEAD_DIM}", "csrc_triton.rms_norm:_rms_norm_forward_kernel",
            dict(x_ptr=dtype, w_ptr=dtype, y_ptr=dtype, rstd_ptr=torch.float32, n_rows=qk_rows,
                 n_cols=HEAD_DIM, stride_x=HEAD_DIM, stride_y=HEAD_DIM, eps=1e-6,
                 BLOCK_ROWS=qk_block_rows, BLOCK_COLS=qk_block_cols, INDEX_64=False),
            num_warps=qk_warps, hot=True))
        specs.append(KernelSpec(
            f"rms_norm_bwd/{tag}-qk-head{HEAD_DIM}", "csrc_triton.rms_norm:_rms_norm_backward_kernel",
            dict(dy_ptr=dtype, x_ptr=dtype, w_ptr=dtype, rstd_ptr=torch.float32, dx_ptr=dtype,
                 dw_partial_ptr=torch.float32, n_rows=qk_rows, n_cols=HEAD_DIM,
                 stride_dy=HEAD_DIM, stride_x=HEAD_DIM, stride_dx=HEAD_DIM,
                 rows_per_program=qk_block_rows, BLOCK_ROWS=qk_block_rows,
                 BLOCK_COLS=qk_block_cols, WEIGHT_GRAD=False, INDEX_64=False),
            num_warps=qk_warps, hot=True))
    return specs + wide_index_specs(specs)


def rope_specs() -> List[KernelSpec]:
    """The rope kernel on q and k as slices of the fused q/k/v output."""
    import torch
    rope = importlib.import_module("csrc_triton.rope")
    half = HEAD_DIM // 2
    block_half, block_q = triton_next_pow2(half), triton_next_pow2(Q_HEADS)
    block_tokens = max(1, min(rope._TILE_ELEMENTS // (block_q * block_half), triton_next_pow2(TOKENS)))
    rope_warps = min(16, max(1, block_tokens * block_q * block_half // 256))
    qkv = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM      # q and k: slices of the fused output
    specs = [KernelSpec(
        f"rope/{tag}", "csrc_triton.rope:_rope_kernel",
        dict(q_ptr=dtype, k_ptr=dtype, q_out_ptr=dtype, k_out_ptr=dtype,
             pos_ptr=torch.int64, cos_ptr=torch.float32, sin_ptr=torch.float32,
             n_tokens=TOKENS, n_q_heads=Q_HEADS, n_kv_heads=KV_HEADS, half=half,
             stride_q=qkv, stride_k=qkv, stride_q_out=qkv, stride_k_out=qkv,
             BLOCK_TOKENS=block_tokens, BLOCK_Q_HEADS=block_q,
             BLOCK_KV_HEADS=triton_next_pow2(KV_HEADS), BLOCK_HALF=block_half, INVERSE=False,
             INDEX_64=False),
        num_warps=rope_warps, hot=True) for tag, dtype in _dtypes().items()]
    return specs + wide_index_specs(specs)


def swiglu_specs() -> List[KernelSpec]:
    """swiglu forward and backward over the fused gate/up output."""
    swiglu = importlib.import_module("csrc_triton.swiglu")
    n_cols = INTERMEDIATE
    swiglu_cols = min(swiglu._BLOCK, triton_next_pow2(n_cols))
    swiglu_tiles = dict(BLOCK_ROWS=swiglu._BLOCK // swiglu_cols, BLOCK_COLS=swiglu_cols)
    specs = []
    for tag, dtype in _dtypes().items():
        specs.append(KernelSpec(
            f"swiglu_fwd/{tag}", "csrc_triton.swiglu:_swiglu_forward_kernel",
            dict(gate_ptr=dtype, up_ptr=dtype, h_ptr=dtype, n_rows=TOKENS, n_cols=n_cols,
                 stride_gate=2 * n_cols, stride_up=2 * n_cols, stride_h=n_cols, **swiglu_tiles,
                 INDEX_64=False),
            num_warps=swiglu._NUM_WARPS, hot=True))
        specs.append(KernelSpec(
            f"swiglu_bwd/{tag}", "csrc_triton.swiglu:_swiglu_backward_kernel",
            dict(dh_ptr=dtype, gate_ptr=dtype, up_ptr=dtype, dgate_ptr=dtype, dup_ptr=dtype,
                 n_rows=TOKENS, n_cols=n_cols, stride_dh=2 * n_cols, stride_gate=2 * n_cols,
                 stride_up=2 * n_cols, stride_dgate=2 * n_cols, stride_dup=2 * n_cols,
                 **swiglu_tiles, INDEX_64=False),
            num_warps=swiglu._NUM_WARPS, hot=True))
    return specs + wide_index_specs(specs)


def cross_entropy_specs() -> List[KernelSpec]:
    """The cross-entropy row kernels over LLaMA-3's vocabulary."""
    import torch
    ce = importlib.import_module("csrc_triton.cross_entropy")
    block_v = ce._pick_block_v("sm90", VOCAB, None)
    specs = []
    for tag, dtype in _dtypes().items():
        specs.append(KernelSpec(
            f"cross_entropy_lse/{tag}", "csrc_triton.cross_entropy:_lse_rows_kernel",
            dict(logits_ptr=dtype, labels_ptr=torch.int64, lse_ptr=torch.float32,
                 target_ptr=torch.float32, T=TOKENS, V=VOCAB, ignore_index=-100,
                 BLOCK_T=ce._pick_block_t(TOKENS, block_v), BLOCK_V=block_v),
            num_warps=ce._NUM_WARPS, hot=True))
        specs.append(KernelSpec(
            f"cross_entropy_grad/{tag}", "csrc_triton.cross_entropy:_softmax_grad_rows_kernel",
            dict(logits_ptr=dtype, out_ptr=dtype, labels_ptr=torch.int64,
                 lse_ptr=torch.float32, row_scale_ptr=torch.float32, T=TOKENS, V=VOCAB,
                 ignore_index=-100, BLOCK_T=ce._pick_block_t(TOKENS, block_v), BLOCK_V=block_v),
            num_warps=ce._NUM_WARPS, hot=True))
    return specs


def wide_index_specs(specs: List[KernelSpec]) -> List[KernelSpec]:
    """The INDEX_64 variant (64-bit row offsets: what a launch past 2^31 - 1 elements
    compiles) of every bf16 spec that has the switch: it must compile and not spill."""
    return [replace(s, name=s.name + "-idx64", args={**s.args, "INDEX_64": True})
            for s in specs if s.args.get("INDEX_64") is False and s.name.endswith("/bf16")]


def triton_next_pow2(n: int) -> int:
    import triton
    return triton.next_power_of_2(n)


def spec_sources():
    """(family, function returning its KernelSpecs) of every op record that names one."""
    from csrc_triton.records import all_records, resolve
    return [(r.name, resolve(r.compile_specs)) for r in all_records() if r.compile_specs]


def all_specs(sweep: bool = False) -> List[KernelSpec]:
    specs = [replace(s, family=family) for family, source in spec_sources() for s in source()
             if sweep or not s.sweep]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate spec names: {duplicates}")
    return specs


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------

def format_table(reports: List[CompileReport]) -> str:
    header = (f"{'spec':58} {'ok':>3} {'shared':>7} {'reg':>4} {'stack':>5} {'spill':>5} "
              f"{'HGMMA':>5} {'HMMA':>5} {'ptxFMA':>6} {'loop':>5} {'nonMMA/MMA':>10} {'s':>5}")
    lines = [header]
    for r in reports:
        ratio = "" if r.non_mma_per_mma is None else f"{r.non_mma_per_mma:.1f}"
        lines.append(f"{r.name[:58]:58} {'y' if r.ok else 'NO':>3} {r.shared:>7} {r.registers:>4} "
                     f"{r.stack:>5} {r.spill_instructions:>5} {r.hgmma:>5} {r.hmma:>5} {r.ptx_fma_f32:>6} "
                     f"{r.loop_instructions:>5} {ratio:>10} {r.seconds:>5.1f}")
        if not r.ok:
            lines.append(f"    error: {r.error}")
        if r.ptx_approx:
            lines.append("    approximate: " + ", ".join(f"{k} x{v}" for k, v in r.ptx_approx.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sm90_compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also every autotune config")
    parser.add_argument("--only", default="",
                        help="comma-separated name prefixes (e.g. nf4_matmul_fwd,rope)")
    parser.add_argument("--json", default="", help="write the reports to this JSON file")
    parser.add_argument("--list", action="store_true",
                        help="print the specs' names by op family, compile nothing")
    args = parser.parse_args(argv)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "0":
        parser.error("triton was imported before TRITON_INTERPRET=0 could be set; "
                     "run this module in its own process")
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # 3.9's default, without the warning
    prefixes = tuple(p for p in args.only.split(",") if p)
    specs = [s for s in all_specs(args.sweep) if not prefixes or s.name.startswith(prefixes)]
    if not specs:
        parser.error(f"--only {args.only!r} matches no spec")
    if args.list:
        for spec in specs:
            print(f"{spec.family:16} {spec.name}")
        return 0
    reports = []
    for spec in specs:
        reports.append(compile_spec(spec))
        print(format_table(reports[-1:]).splitlines()[-1], flush=True)
    print(format_table(reports))
    if args.json:
        rows = [dict(asdict(r), non_mma_per_mma=r.non_mma_per_mma) for r in reports]
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(args.json)
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
