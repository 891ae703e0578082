"""The flash attention kernels compile for Hopper (sm_90) without a GPU, in bf16 at head
dim 128 (LLaMA-3-8B: 32 query heads, 8 kv heads, 8192 packed tokens), and at 64 and
256, with the GPU
tile configs the launchers use (csrc_triton.attention.gpu_blocks), and the compiled
code is what a fast kernel needs: shared memory within sm_90's 232,448 bytes per
block, no spills (STACK 0 in cuobjdump's resource usage, no STL/LDL in the SASS), and
wgmma (HGMMA) for the bf16 dots.

The compile runs in a subprocess (this file run as a script): TRITON_INTERPRET=0 must
be set before triton is imported, and the test process runs the interpreter.
``attention_specs`` is plain data (kernel, arguments as their launcher passes them,
launch options) so that it can join a shared sm_90 compile helper's spec sources as is.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_MEMORY_LIMIT = 232_448        # sm_90, per block, with the opt-in attribute
SEQ, Q_HEADS, KV_HEADS = 8192, 32, 8  # LLaMA-3-8B attention over one packed 8K row


def attention_specs(head_dims=(128,)):
    """[{name, kernel 'module:function', args {name: torch dtype (a tensor) | int | float |
    bool}, num_warps, num_stages, expect_hgmma}] for the three attention kernels (and the
    delta preprocessing), bf16, at each head dim, as the launchers launch them on a GPU."""
    import torch
    import triton

    from csrc_triton import attention as A

    specs = []
    dtype = torch.bfloat16
    for head_dim in head_dims:
        block_d = max(16, triton.next_power_of_2(head_dim))
        scale = head_dim ** -0.5
        shared = dict(seq=SEQ, n_q_heads=Q_HEADS, n_kv_heads=KV_HEADS, group=Q_HEADS // KV_HEADS,
                      head_dim=head_dim, qk_scale_log2=scale * A._LOG2E, HAS_BOUNDS=True,
                      DOT_FP32=False, BLOCK_D=block_d)
        kernels = {
            "forward": ("_attention_forward_kernel",
                        dict(q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, out_ptr=dtype,
                             lse_ptr=torch.float32, first_key_ptr=torch.int32)),
            "dkdv": ("_attention_dkdv_kernel",
                     dict(q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, d_out_ptr=dtype,
                          lse_ptr=torch.float32, delta_ptr=torch.float32, dk_ptr=dtype,
                          dv_ptr=dtype, first_key_ptr=torch.int32, key_end_ptr=torch.int32,
                          scale=scale)),
            "dq": ("_attention_dq_kernel",
                   dict(q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, d_out_ptr=dtype,
                        lse_ptr=torch.float32, delta_ptr=torch.float32, dq_ptr=dtype,
                        first_key_ptr=torch.int32, scale=scale)),
        }
        for kind, (function, pointers) in kernels.items():
            blocks = A.gpu_blocks(kind, block_d)
            specs.append(dict(
                name=f"attention_{kind}/bf16-d{head_dim}-{blocks.block_m}x{blocks.block_n}"
                     f"w{blocks.num_warps}s{blocks.num_stages}",
                kernel=f"csrc_triton.attention:{function}",
                args=dict(pointers, **shared, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
                          BLOCK_H=blocks.block_h),
                num_warps=blocks.num_warps, num_stages=blocks.num_stages,
                # wgmma needs >= 64 rows: the query tile (all dots of forward and dq), or
                # in dkdv also the key tile (its dK and dV dots)
                expect_hgmma=blocks.block_m >= 64 or (kind == "dkdv" and blocks.block_n >= 64)))
        specs.append(dict(
            name=f"attention_delta/bf16-d{head_dim}", kernel="csrc_triton.attention:_attention_delta_kernel",
            args=dict(out_ptr=dtype, d_out_ptr=dtype, delta_ptr=torch.float32,
                      n_rows=SEQ * Q_HEADS, seq=SEQ, n_q_heads=Q_HEADS, head_dim=head_dim,
                      BLOCK_ROWS=A._DELTA_ROWS, BLOCK_D=block_d),
            num_warps=4, num_stages=3, expect_hgmma=False))
    return specs


# ---------------------------------------------------------------- the compile (subprocess)

def _tool(name: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_spec(spec: dict) -> dict:
    """Compile one spec for GPUTarget('cuda', 90, 32) with the signature, constexprs and
    divisibility attributes triton's own argument binder gives a real launch."""
    import importlib

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    module, function = spec["kernel"].split(":")
    fn = getattr(importlib.import_module(module), function)
    missing = sorted(set(fn.arg_names) - set(spec["args"]))
    if missing:
        raise ValueError(f"{spec['name']}: arguments missing {missing}")
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    values = {k: MockTensor(v) if isinstance(v, torch.dtype) else v for k, v in spec["args"].items()}
    bound, specialization, _ = create_function_from_signature(fn.signature, fn.params, backend)(**values)
    options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    _, signature, constexprs, attrs = fn._pack_args(backend, dict(options), bound, specialization,
                                                    options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                            options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    return dict(name=spec["name"], expect_hgmma=spec["expect_hgmma"],
                shared=int(kernel.metadata.shared),
                registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                stack=int(re.search(r"STACK:(\d+)", usage).group(1)),
                spills=sum(op.startswith(("STL", "LDL")) for op in opcodes),
                hgmma=sum(op.startswith("HGMMA") for op in opcodes),
                hmma=sum(op.startswith("HMMA") for op in opcodes))


def _child(out_path: str) -> None:
    os.environ["TRITON_INTERPRET"] = "0"          # before triton is imported (NOTES.md)
    os.environ.pop("ANITA_TRITON_MODE", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # 3.9's default, without its warning
    reports = []
    for spec in attention_specs(head_dims=(64, 128, 256)):
        try:
            reports.append(compile_spec(spec))
        except Exception as err:  # noqa: BLE001 - a failed compile is a result
            reports.append(dict(name=spec["name"], error=f"{type(err).__name__}: {err}"[:500]))
        print(json.dumps(reports[-1]), flush=True)
    tmp = Path(out_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(reports, indent=1))
    tmp.replace(out_path)


# ---------------------------------------------------------------- the test

def test_attention_kernels_compile_for_sm90_without_spills_and_with_hgmma(tmp_path):
    out = tmp_path / "attention_sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "ANITA_TRITON_MODE"}
    env.update(TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    print(done.stdout)
    assert out.exists(), f"the compile wrote no report (exit {done.returncode}):\n{done.stderr[-4000:]}"
    reports = json.loads(out.read_text())
    failed = [r for r in reports if "error" in r]
    assert not failed, f"failed to compile for sm_90: {failed}"
    assert {r["name"].split("/")[0] for r in reports} == {
        "attention_forward", "attention_dkdv", "attention_dq", "attention_delta"}
    for r in reports:       # head dims 64, 128 (LLaMA-3) and 256, every kernel
        assert r["shared"] <= SHARED_MEMORY_LIMIT, f"{r['name']}: {r['shared']} B of shared memory"
        assert r["stack"] == 0 and r["spills"] == 0, f"{r['name']} spills: {r}"
        if r["expect_hgmma"]:
            assert r["hgmma"] > 0, f"{r['name']}: no HGMMA in the SASS ({r['hmma']} HMMA)"


if __name__ == "__main__":
    _child(sys.argv[1])
