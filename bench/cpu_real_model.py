"""CPU timings of anita on a real pretrained model (SmolLM2-135M-Instruct), per backend,
side by side with transformers + PEFT + bitsandbytes 4-bit on the same tokens.

    python bench/cpu_real_model.py --model DIR [--backend torch|triton] [--steps 3]
        [--seq 512 1024 8192] [--hf-seq 512 2048] [--doc-tokens 200 400]
        [--new-tokens 32] [--threads 1] [--json OUT]

DIR is the folder ``python -m anita_core.assets.smollm2`` prints. Measured with
time.perf_counter on this machine's CPU (a CPU measurement, not a GPU number):
  load      load_model(DIR): read safetensors, quantize every projection to NF4
  sft step  one train_step (forward + hand-written backward) on one packed row of
            SEQ tokens: documents of --doc-tokens lengths (drawn once, seeded; each
            row takes the first documents of the same list, the last one cut to fit;
            positions restart and attention stays inside each document), LoRA r 16
            (alpha 32, dropout 0.05) on all seven projections, every layer keeping its
            activations (what train_sft.py's planner picks on a CPU). The first step
            (which fills the torch backend's dequantization cache) is reported apart
            from the median of the following ones; per-token cost = median / SEQ.
  hf step   the same rows, tokens and LoRA through transformers' LlamaForCausalLM
            loaded 4-bit by bitsandbytes (NF4, double quantization, fp32 compute,
            SDPA with a block-diagonal causal mask, the way packed rows are given to
            it) + PEFT, forward with labels and loss.backward(); --hf-seq sizes only
            (0 of them: skipped). Needs the test extra (transformers, peft). At a size
            both time, their steps alternate (anita, hf, anita, hf, ...), so a change of
            the machine's load reaches both.
Each step is timed twice: wall time (time.perf_counter) and the process's CPU time
(time.process_time). With one thread on a machine other jobs load, the CPU time is
the work of the step itself, the wall time that plus the waiting for a core.
  generate  greedy decoding of new-tokens tokens after a 24-token prompt with the
            KV cache: seconds per generated token (prefill included)
Targets (issue 18, torch backend, one thread): a step of 8,192 packed tokens costs at
most 1.2x per token what a 1,024-token step costs, and anita's step is at least as
fast as transformers' at 512 and 2,048 tokens. The triton backend on a CPU is the
Triton interpreter: use --steps 1 --seq 64 --new-tokens 2 --hf-seq there.
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

LORA = dict(r=16, alpha=32, dropout=0.05)
PER_TOKEN_RATIO_TARGET = 1.2          # 8,192-token step / 1,024-token step, per token


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="converted checkpoint folder")
    p.add_argument("--backend", choices=("torch", "triton"), default="torch")
    p.add_argument("--steps", type=int, default=3, help="SFT steps per size (the first is reported apart)")
    p.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 8192],
                   help="tokens per packed SFT row, one size after the other")
    p.add_argument("--hf-seq", type=int, nargs="*", default=[512, 2048],
                   help="sizes also timed with transformers + PEFT + bitsandbytes")
    p.add_argument("--doc-tokens", type=int, nargs=2, default=[200, 400], metavar=("MIN", "MAX"),
                   help="document lengths of the packed rows (uniform, seeded)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to generate (0: skip)")
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
    for name in ("steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"argument --{name}: must be >= 1")
    if args.new_tokens < 0:
        p.error("argument --new-tokens: must be >= 0")
    for name in ("seq", "hf_seq", "doc_tokens"):
        if any(n < 1 for n in getattr(args, name)):
            p.error(f"argument --{name.replace('_', '-')}: every value must be >= 1")
    if args.doc_tokens[0] > args.doc_tokens[1]:
        p.error("argument --doc-tokens: MIN must be <= MAX")
    return args


def packed_row(seq: int, doc_tokens, vocab: int, seed: int = 0):
    """(ids, targets, positions, segments) [1, seq]: the first documents of one seeded
    list, the last cut to fit; a document's last token predicts nothing."""
    generator = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < seq:
        n = int(torch.randint(doc_tokens[0], doc_tokens[1] + 1, (), generator=generator))
        lengths.append(min(n, seq - total))
        total += lengths[-1]
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seed + 1))
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    targets = torch.roll(ids, -1, dims=1)
    last = torch.cumsum(torch.tensor(lengths), 0) - 1
    targets[0, last] = -100
    return ids, targets, positions, segments


def _summary(times, cpu):
    later = slice(1, None) if len(times) > 1 else slice(0, None)
    return {"first_s": times[0], "step_s": statistics.median(times[later]), "all_s": times,
            "cpu_first_s": cpu[0], "cpu_step_s": statistics.median(cpu[later]), "all_cpu_s": cpu}


def _timed(steps_by_name: dict, steps: int) -> dict:
    """Each step function ``steps`` times, interleaved (a, b, a, b, ...) so that both see
    the same machine load as it drifts; name -> first, median of the rest, all."""
    times = {name: [] for name in steps_by_name}
    cpu = {name: [] for name in steps_by_name}
    for _ in range(steps):
        for name, step in steps_by_name.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = step()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            print(f"[{name}]: {times[name][-1]:.2f} s wall, {cpu[name][-1]:.2f} s CPU "
                  f"(loss {loss:.3f})", flush=True)
    return {name: _summary(times[name], cpu[name]) for name in times}


def anita_step(model, row):
    ids, targets, positions, segments = row
    n_targets = int((targets != -100).sum())

    def step():
        model.adapters.zero_grad()
        loss, n = model.train_step(ids, targets, positions, segments, grad_scale=1.0 / n_targets)
        return float(loss) / int(n)
    return step


def hf_model(model_dir: str):
    from peft import LoraConfig, get_peft_model
    from tests.model_factory import load_hf_4bit
    from anita_core.model.weights import PROJECTIONS
    config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                        target_modules=list(PROJECTIONS), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(load_hf_4bit(model_dir), config)


def hf_step(model, row):
    ids, targets, positions, segments = row
    seq = ids.shape[1]
    index = torch.arange(seq)
    # query i sees key j iff same document and j <= i: the block-diagonal causal mask
    mask = (segments[0][:, None] == segments[0][None, :]) & (index[None, :] <= index[:, None])
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = targets[:, :-1]         # transformers shifts the labels itself

    def step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, position_ids=positions, attention_mask=mask[None, None], labels=labels)
        out.loss.backward()
        return float(out.loss.detach())
    return step


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
    result = {"backend": args.backend, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "load_average_1min": os.getloadavg()[0], "doc_tokens": args.doc_tokens,
              "new_tokens": args.new_tokens, "anita": {}, "hf": {}}
    start = time.perf_counter()
    model = load_model(args.model, progress=False, device=device)
    result["load_s"] = time.perf_counter() - start
    model.adapters = LoRAAdapters.init(LoRAConfig(**LORA), model.config)
    # what train_sft.py's memory planner chooses on a CPU (no budget): every layer keeps
    # its activations, no recompute; transformers without gradient checkpointing does too
    model.set_layer_strategies("keep")
    V = model.config.vocab_size
    rows = {seq: packed_row(seq, args.doc_tokens, V) for seq in sorted(set(args.seq) | set(args.hf_seq))}
    hf = hf_model(args.model) if args.hf_seq else None
    for seq in sorted(set(args.seq) | set(args.hf_seq)):
        steps = {}
        if seq in args.seq:
            steps[f"anita {seq}"] = anita_step(model, rows[seq])
        if seq in args.hf_seq:
            steps[f"hf {seq}"] = hf_step(hf, rows[seq])
        for name, summary in _timed(steps, args.steps).items():
            result[name.split()[0]][seq] = summary
    if args.new_tokens:
        prompt = torch.randint(0, V, (24,), generator=torch.Generator().manual_seed(2)).tolist()
        start = time.perf_counter()
        out = generate(model, [prompt], max_new_tokens=args.new_tokens)
        result["generate_s_per_token"] = (time.perf_counter() - start) / len(out[0])
    result["load_average_1min_after"] = os.getloadavg()[0]
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def report(result: dict) -> None:
    print(f"\nCPU measurement ({result['cpus']} CPUs, {result['threads']} torch threads, load average "
          f"{result['load_average_1min']:.1f} -> {result['load_average_1min_after']:.1f}), backend "
          f"{result['backend']}, SmolLM2-135M NF4, LoRA r 16 on all projections, packed rows of "
          f"{result['doc_tokens'][0]}-{result['doc_tokens'][1]}-token documents")
    print(f"  load: {result['load_s']:.2f} s")
    print(f"  {'tokens':>7} {'anita wall (s)':>15} {'CPU (s)':>8} {'CPU ms/token':>12} {'hf wall (s)':>12} "
          f"{'CPU (s)':>8} {'anita/hf CPU':>12}")
    for seq in sorted(set(result["anita"]) | set(result["hf"])):
        a, h = result["anita"].get(seq), result["hf"].get(seq)
        cells = [f"{a['step_s']:15.2f} {a['cpu_step_s']:8.2f} {1e3 * a['cpu_step_s'] / seq:12.2f}" if a
                 else f"{'':15} {'':8} {'':12}",
                 f"{h['step_s']:12.2f} {h['cpu_step_s']:8.2f}" if h else f"{'':12} {'':8}",
                 f"{a['cpu_step_s'] / h['cpu_step_s']:12.2f}" if a and h else ""]
        print(f"  {seq:7d} " + " ".join(cells))
    anita = result["anita"]
    if 1024 in anita and 8192 in anita:
        for key, what in (("cpu_step_s", "CPU time"), ("step_s", "wall time")):
            ratio = (anita[8192][key] / 8192) / (anita[1024][key] / 1024)
            verdict = "met" if ratio <= PER_TOKEN_RATIO_TARGET else "MISSED"
            print(f"  per-token {what}, 8,192 vs 1,024 tokens: {ratio:.2f}x "
                  f"(target <= {PER_TOKEN_RATIO_TARGET}: {verdict})")
    if "generate_s_per_token" in result:
        print(f"  generation: {result['generate_s_per_token']:.3f} s/token")


if __name__ == "__main__":
    main()
