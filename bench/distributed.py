"""Distributed training: memory per GPU (computed) and the LoRA all-reduce's
bytes and overlap with the backward (measured on the CPU with gloo).

    python -m bench.distributed memory            # per-GPU bytes, LLaMA-3-8B / -70B, both modes
    python -m bench.distributed overlap           # 2 gloo ranks on this CPU (~1 min)

memory: arithmetic only (labelled COMPUTED), from the models' published shapes:
NF4 bytes of every projection as anita stores them (blocksize 64, double
quantization: 4 bits + a uint8 absmax per 64 values + an fp32 nested absmax per
256 blocks), the bf16 embeddings / lm_head / norms (replicated in both modes),
and the LoRA state (fp32 A and B, their gradients and AdamW's two moments:
16 bytes per parameter, replicated in both modes). Sharded base: 1/world of
the NF4 bytes, plus two layers gathered whole (the running one and the
prefetched next). Activations depend on batch x sequence and are the same in
both modes; the block inputs kept for the backward (layers x tokens x hidden x
2 bytes in bf16) are given for one 8192-token micro-batch (the sft preset's).

overlap: 2 ranks (torch.multiprocessing, gloo, ANITA_BACKEND=torch, 1 thread
each) train a random LLaMA-shaped model one micro-batch per step, (a) with the
all-reduce of each bucket started as its layers' backward ends, (b) with every
bucket's all-reduce started after the backward (no overlap). Reported per step:
all-reduced bytes, buckets, step time, and the time spent waiting on the
all-reduce after the backward (the exposed communication); hidden = 1 -
exposed(a) / exposed(b). A CPU measurement on 2 shared cores, not a GPU number.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9

# published config.json values (meta-llama/Meta-Llama-3-8B and -70B)
LLAMA3 = {
    "LLaMA-3-8B": dict(vocab=128256, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8),
    "LLaMA-3-70B": dict(vocab=128256, hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8),
}


def projection_sizes(m: dict):
    """(out, in) of q, k, v, o, gate, up, down."""
    h, i = m["hidden"], m["intermediate"]
    kv = m["kv_heads"] * h // m["heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def nf4_bytes(n: int, blocksize: int = 64) -> int:
    blocks = -(-n // blocksize)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4 * 16 + 4 * 256 + 4


def memory_rows(world_sizes=(8, 16), lora_r: int = 16, tokens: int = 8192):
    rows = []
    for name, m in LLAMA3.items():
        layer = sum(nf4_bytes(o * i) for o, i in projection_sizes(m))
        nf4 = layer * m["layers"]
        dense = 2 * (2 * m["vocab"] * m["hidden"] + (2 * m["layers"] + 1) * m["hidden"])
        lora_params = m["layers"] * sum(lora_r * (o + i) for o, i in projection_sizes(m))
        lora = 16 * lora_params
        acts = m["layers"] * tokens * m["hidden"] * 2
        for world in world_sizes:
            for mode, base in (("data parallel", nf4), ("sharded base", nf4 / world + 2 * layer)):
                total = base + dense + lora + acts
                rows.append(dict(model=name, world=world, mode=mode, nf4=base, dense=dense, lora=lora,
                                 acts=acts, total=total, layer=layer, lora_params=lora_params))
    return rows


def print_memory(args) -> None:
    print(f"COMPUTED (arithmetic, not measured): bytes per GPU; LoRA r {args.lora_r} on all 7 "
          f"projections; block inputs of one {args.tokens}-token micro-batch")
    print(f"{'model':12} {'GPUs':>4} {'mode':14} {'NF4 base':>9} {'embed+norms':>11} "
          f"{'LoRA+Adam':>9} {'block inputs':>12} {'total':>8}")
    for r in memory_rows(tuple(args.world), args.lora_r, args.tokens):
        print(f"{r['model']:12} {r['world']:>4} {r['mode']:14} {r['nf4'] / GB:>7.2f}GB "
              f"{r['dense'] / GB:>9.2f}GB {r['lora'] / GB:>7.2f}GB {r['acts'] / GB:>10.2f}GB "
              f"{r['total'] / GB:>6.2f}GB")
    for name in LLAMA3:
        r = next(r for r in memory_rows((8,), args.lora_r, args.tokens) if r["model"] == name)
        print(f"  {name}: one layer in NF4 = {r['layer'] / 1e6:.1f} MB; LoRA parameters "
              f"{r['lora_params'] / 1e6:.1f} M x 16 bytes")
    print("  not counted: one layer's working set during its forward/backward (the same in "
          "both modes), CUDA context and allocator slack")


# ------------------------------------------------------------------ overlap
def _overlap_worker(rank: int, world: int, port: int, ckpt: str, args, results) -> None:
    os.environ.update(ANITA_BACKEND="torch", RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    torch.set_num_threads(1)
    from anita_core.hf import load_model
    from anita_core.lora import LoRAAdapters, LoRAConfig
    from anita_core.train.distributed import init_from_env, setup_model
    from bench.common import bench_device
    model = load_model(ckpt, progress=False, device=bench_device(cpu_only=True))   # gloo: CPU
    ctx = init_from_env(timeout_s=120)
    adapters = LoRAAdapters.init(LoRAConfig(r=args.lora_r, alpha=16, seed=0), model.config)
    model.adapters = adapters
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator)
    targets = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator)
    out = {}
    for overlap in (True, False, True, False):
        grads = setup_model(ctx, model, adapters, sharded_base=False,
                            bucket_bytes=args.bucket_kb * 1024, overlap=overlap)
        times = []
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                grads.wait_s, grads.launches = 0.0, 0
            for p in adapters.parameters():
                p.grad = None
            torch.distributed.barrier()
            started = time.perf_counter()
            grads.sync = True
            model.train_step(ids, targets, grad_scale=1.0 / ids.numel())
            grads.finish()
            times.append(time.perf_counter() - started)
        key = "overlap" if overlap else "after"
        prev = out.get(key, {"step_s": [], "wait_s": []})
        prev["step_s"] += times[args.warmup:]
        prev["wait_s"].append(grads.wait_s / args.steps)
        out[key] = prev
        out["bytes"], out[f"buckets_{key}"] = grads.bytes_per_step, grads.launches / args.steps
    # the same bytes all-reduced alone, synchronously: what there is to hide
    flat = torch.zeros(grads.bytes_per_step // 4)
    alone = []
    for _ in range(args.steps):
        torch.distributed.barrier()
        started = time.perf_counter()
        torch.distributed.all_reduce(flat)
        alone.append(time.perf_counter() - started)
    out["alone_s"] = alone
    if rank == 0:
        results.update(out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run_overlap(args) -> None:
    import statistics
    import torch.multiprocessing as mp
    from bench.load_memory import build_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp), vocab=1024, hidden=args.hidden, intermediate=args.intermediate,
                         layers=args.layers, heads=8, kv_heads=2, shard_mb=1000, seed=0)
        manager = mp.Manager()
        results = manager.dict()
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_overlap_worker, args=(2, port, tmp, args, results), nprocs=2, join=True)
        r = dict(results)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    exposed_on, exposed_off = med(r["overlap"]["wait_s"]), med(r["after"]["wait_s"])
    print(f"CPU measurement (2 gloo ranks on a 2-core CPU, torch backend), not a GPU number; "
          f"model: {args.layers} layers, hidden {args.hidden}, LoRA r {args.lora_r} on 7 projections, "
          f"micro-batch {args.batch} x {args.seq} tokens, {args.steps} steps x 2 repeats")
    print(f"all-reduced per step: {r['bytes']:,} bytes of fp32 LoRA gradients in "
          f"{r['buckets_overlap']:g} all-reduce(s) per step (buckets of >= {args.bucket_kb} KiB); the same bytes in "
          f"one synchronous all-reduce: {med(r['alone_s']) * 1e3:.1f} ms")
    print(f"step (forward + backward + all-reduce), median: overlapped "
          f"{med(r['overlap']['step_s']) * 1e3:.1f} ms, all-reduce after backward "
          f"{med(r['after']['step_s']) * 1e3:.1f} ms")
    print(f"exposed all-reduce wait after the backward: overlapped {exposed_on * 1e3:.2f} ms, "
          f"after backward {exposed_off * 1e3:.2f} ms -> hidden "
          f"{(1 - exposed_on / exposed_off) * 100 if exposed_off > 0 else float('nan'):.0f}%")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory", help="computed bytes per GPU",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("--world", type=int, nargs="+", default=[8, 16], help="GPUs in all")
    m.add_argument("--lora-r", type=int, default=16)
    m.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch")
    o = sub.add_parser("overlap", help="measured all-reduce overlap on CPU gloo",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    o.add_argument("--layers", type=int, default=6)
    o.add_argument("--hidden", type=int, default=256)
    o.add_argument("--intermediate", type=int, default=688)
    o.add_argument("--lora-r", type=int, default=64)
    o.add_argument("--batch", type=int, default=2)
    o.add_argument("--seq", type=int, default=128)
    o.add_argument("--bucket-kb", type=int, default=512)
    o.add_argument("--steps", type=int, default=5)
    o.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    if args.what == "memory":
        print_memory(args)
    else:
        run_overlap(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
