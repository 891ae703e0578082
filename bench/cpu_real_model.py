"""CPU timings of anita on a real pretrained model (SmolLM2-135M-Instruct), per backend.

    python bench/cpu_real_model.py --model DIR [--backend torch|triton] [--steps 3]
        [--seq 512] [--new-tokens 32] [--json OUT]

DIR is the folder ``python -m anita_core.assets.smollm2`` prints. Measured with
time.perf_counter on this machine's CPU (a CPU measurement, not a GPU number):
  load      load_model(DIR): read safetensors, quantize every projection to NF4
  sft step  one train_step (forward + hand-written backward) on [1, seq] tokens,
            LoRA r 16 (alpha 32, dropout 0.05) on all seven projections; the first
            step (which fills the torch backend's dequantization cache) is
            reported apart from the median of the following ones
  generate  greedy decoding of new-tokens tokens after a 24-token prompt with the
            KV cache: seconds per generated token (prefill included)
The issue's targets for the torch backend: step <= 10 s, generation <= 0.3 s/token,
load <= 10 s. The triton backend on a CPU is the Triton interpreter: use a
small --steps 1 --new-tokens 2 there (minutes per step).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGETS = {"load_s": 10.0, "sft_step_s": 10.0, "generate_s_per_token": 0.3}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="converted checkpoint folder")
    p.add_argument("--backend", choices=("torch", "triton"), default="torch")
    p.add_argument("--steps", type=int, default=3, help="SFT steps (the first is reported apart)")
    p.add_argument("--seq", type=int, default=512, help="tokens per SFT step")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice, one per core); on a "
                        "CPU shared with other jobs, 1 avoids OpenMP threads waiting for each other")
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json there (run python -m anita_core.assets.smollm2)")
    for name in ("steps", "seq", "new_tokens", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from anita_core.hf import load_model
    from anita_core.lora import LoRAAdapters, LoRAConfig
    from anita_core.model import ops
    from anita_core.model.generate import generate
    from bench.common import bench_device
    device = bench_device(cpu_only=True)      # a CPU benchmark on any machine

    ops.set_backend(args.backend)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = {"backend": args.backend, "threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
              "seq": args.seq, "new_tokens": args.new_tokens}
    start = time.perf_counter()
    model = load_model(args.model, progress=False, device=device)
    result["load_s"] = time.perf_counter() - start
    model.adapters = LoRAAdapters.init(LoRAConfig(r=16, alpha=32, dropout=0.05), model.config)

    generator = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (1, args.seq), generator=generator)
    targets = torch.roll(ids, -1, dims=1)
    targets[0, -1] = -100
    times = []
    for _ in range(args.steps):
        model.adapters.zero_grad()
        start = time.perf_counter()
        loss, n = model.train_step(ids, targets, grad_scale=1.0 / args.seq)
        times.append(time.perf_counter() - start)
        print(f"[{args.backend}] sft step of {args.seq} tokens: {times[-1]:.2f} s "
              f"(loss {float(loss) / int(n):.3f})", flush=True)
    result["sft_first_step_s"] = times[0]
    result["sft_step_s"] = statistics.median(times[1:]) if len(times) > 1 else times[0]

    prompt = torch.randint(0, V, (24,), generator=generator).tolist()
    start = time.perf_counter()
    out = generate(model, [prompt], max_new_tokens=args.new_tokens)
    elapsed = time.perf_counter() - start
    result["generate_s_per_token"] = elapsed / len(out[0])
    result["generated_tokens"] = len(out[0])

    result["load_average_1min_after"] = os.getloadavg()[0]
    print(f"\nCPU measurement ({result['cpus']} CPUs, {result['threads']} torch threads, load "
          f"average {result['load_average_1min']:.1f} -> {result['load_average_1min_after']:.1f}), "
          f"backend {args.backend}, SmolLM2-135M NF4, LoRA r 16 on all projections")
    for key, label in (("load_s", "load (s)"), ("sft_first_step_s", "first SFT step (s)"),
                       ("sft_step_s", f"SFT step of {args.seq} tokens (s)"),
                       ("generate_s_per_token", "generation (s/token)")):
        target = TARGETS.get(key)
        verdict = "" if target is None else f"  target <= {target:g}: " + \
            ("met" if result[key] <= target else "MISSED")
        print(f"  {label:30s} {result[key]:9.3f}{verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
