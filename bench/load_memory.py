"""Peak host memory of load_base_weights (quantize-on-load) vs the checkpoint size.

    python bench/load_memory.py                       # build a ~280 MB fp32 checkpoint, measure (~2 min on CPU)
    python bench/load_memory.py --checkpoint DIR      # measure an existing checkpoint
    python bench/load_memory.py --layers 8 --vocab 32000 --shard-mb 200

Each measurement runs in a fresh Python subprocess and reports:
  baseline   RSS after imports and one tiny warm-up quantization (the Triton
             interpreter's own start-up memory); the RSS high-water mark is then
             reset (/proc/self/clear_refs), so "peak" is the load's own peak
  peak       the RSS high-water mark at the end (VmHWM; ru_maxrss without /proc)
  held       current RSS at the end (the result is still alive)
Two subprocesses are compared: anita's load_base_weights, and the naive
"read the whole full-precision state dict" (every tensor of every shard,
copied into memory of its own) that quantize-on-load avoids.

The random checkpoint is Llama-shaped (GQA, llama3 RoPE) and written shard by
shard with safetensors, so building it needs about one shard of memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 1024 * 1024


# ----------------------------------------------------------------- building
def build_checkpoint(out: Path, *, vocab: int, hidden: int, intermediate: int, layers: int,
                     heads: int, kv_heads: int, shard_mb: int, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    from anita_core.model.config import ModelConfig, projection_shapes
    from anita_core.model.weights import PROJECTIONS, projection_module_path

    config = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=hidden // heads,
                         rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192},
                         max_position_embeddings=131072)
    shapes = projection_shapes(config)
    plan = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        plan.append((f"model.layers.{i}.input_layernorm.weight", (hidden,)))
        plan += [(f"{projection_module_path(i, p)}.weight", shapes[p]) for p in PROJECTIONS]
        plan.append((f"model.layers.{i}.post_attention_layernorm.weight", (hidden,)))
    plan += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]

    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    limit = shard_mb * MB
    names_per_shard, current, size = [], {}, 0

    def flush(tensors):
        # Written under a temporary name: the final name needs the shard count.
        names_per_shard.append(list(tensors))
        save_file(tensors, str(out / f"part-{len(names_per_shard)}"), metadata={"format": "pt"})

    for name, shape in plan:
        t = torch.randn(shape, generator=generator) * (0.02 if len(shape) == 2 else 1.0)
        if size and size + t.numel() * 4 > limit:
            flush(current)
            current, size = {}, 0  # only one shard of tensors alive at a time
        current[name] = t
        size += t.numel() * 4
    flush(current)
    del current
    n = len(names_per_shard)
    weight_map = {}
    for k, names in enumerate(names_per_shard, start=1):
        final = f"model-{k:05d}-of-{n:05d}.safetensors"
        os.replace(out / f"part-{k}", out / final)
        weight_map.update({name: final for name in names})
    total = sum(4 * _numel(shape) for _, shape in plan)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=1))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------- measuring
def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """This process's RSS high-water mark: VmHWM where /proc has it, else
    getrusage's ru_maxrss. ru_maxrss alone misleads here: Linux carries the
    *parent's* high-water mark across fork+exec into the child's ru_maxrss
    (seen: 470 MB in a fresh child whose own peak was 306 MB), and
    clear_refs cannot reset that part."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets the RSS high-water mark
    (VmHWM) to the current RSS, so import-time spikes do not
    hide the load's own peak. False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(checkpoint: str, mode: str, blocksize: int, double_quant: bool) -> dict:
    """Runs inside the fresh subprocess."""
    import torch

    from anita_core.hf.load import load_base_weights
    from csrc_triton import nf4_quantize

    nf4_quantize(torch.randn(256, 64), blocksize=blocksize, double_quant=double_quant)  # warm-up
    import_peak = _peak_rss()
    reset = _reset_peak_rss()
    baseline_peak, baseline_now = _peak_rss(), _current_rss()
    start = time.perf_counter()
    result = {}
    if mode == "anita":
        config, base = load_base_weights(checkpoint, blocksize=blocksize,
                                         double_quant=double_quant, progress=False)
        dense = [base.embed_tokens, base.norm] + ([base.lm_head] if base.lm_head is not None else [])
        for layer in base.layers:
            dense += [layer.input_layernorm, layer.post_attention_layernorm]
        result["dense_bytes"] = sum(t.numel() * t.element_size() for t in dense)
        result["nf4_bytes"] = sum(q.nbytes() for layer in base.layers
                                  for q in layer.projections.values())
    else:
        from safetensors import safe_open
        state = {}
        for f in sorted(Path(checkpoint).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as opened:
                # clone: safetensors returns views of the file's memory map;
                # a model built from the state dict owns its parameters.
                state.update({k: opened.get_tensor(k).clone() for k in opened.keys()})
        result["dense_bytes"] = sum(t.numel() * t.element_size() for t in state.values())
    result.update(seconds=time.perf_counter() - start, baseline_peak=baseline_peak,
                  import_peak=import_peak, peak_reset=reset,
                  baseline_now=baseline_now, peak=_peak_rss(), held=_current_rss())
    return result


def run_subprocess(checkpoint: Path, mode: str, blocksize: int, double_quant: bool) -> dict:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
            "from bench.load_memory import measure; "
            "print('RESULT ' + json.dumps(measure(sys.argv[2], sys.argv[3], int(sys.argv[4]), "
            "sys.argv[5] == '1')))")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-c", code, str(REPO), str(checkpoint), mode,
                           str(blocksize), "1" if double_quant else "0"],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement subprocess ({mode}) failed:\n{proc.stderr[-4000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def checkpoint_bytes(checkpoint: Path) -> tuple:
    from anita_core.hf.files import catalog_checkpoint
    catalog = catalog_checkpoint(checkpoint)
    files = catalog.files()
    largest_shard = max(f.stat().st_size for f in files)
    largest_tensor = max(e.nbytes for e in catalog.entries.values())
    return sum(e.nbytes for e in catalog.entries.values()), largest_shard, largest_tensor, len(files)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="measure this checkpoint directory")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--shard-mb", type=int, default=64)
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--skip-naive", action="store_true",
                        help="do not measure the full-precision state-dict baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))

    with tempfile.TemporaryDirectory(prefix="anita_load_memory_") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = Path(tmp) / "ckpt"
            t = time.perf_counter()
            build_checkpoint(checkpoint, vocab=args.vocab, hidden=args.hidden,
                             intermediate=args.intermediate, layers=args.layers,
                             heads=args.heads, kv_heads=args.kv_heads,
                             shard_mb=args.shard_mb, seed=args.seed)
            print(f"built {checkpoint} in {time.perf_counter() - t:.1f} s")
        full, largest_shard, largest_tensor, n_files = checkpoint_bytes(checkpoint)
        dq = not args.no_double_quant
        anita = run_subprocess(checkpoint, "anita", args.blocksize, dq)
        naive = None if args.skip_naive else run_subprocess(checkpoint, "naive", args.blocksize, dq)

    quantized = anita["dense_bytes"] + anita["nf4_bytes"]
    print(f"\ncheckpoint: {full / MB:.1f} MB full precision in {n_files} file(s); "
          f"largest shard {largest_shard / MB:.1f} MB, largest tensor {largest_tensor / MB:.1f} MB")
    print(f"loaded:     {quantized / MB:.1f} MB = {anita['nf4_bytes'] / MB:.1f} MB NF4 "
          f"projections + {anita['dense_bytes'] / MB:.1f} MB dense (embeddings, norms, lm_head)\n")
    rows = [("load_base_weights (NF4 on load)", anita)]
    if naive is not None:
        rows.append(("full-precision state dict", naive))
    print(f"| {'what':33s} | {'time s':>6s} | {'baseline MB':>11s} | {'peak MB':>8s} | "
          f"{'peak - base':>11s} | {'held MB':>8s} | {'(peak-base)/full':>16s} |")
    print(f"|{'-' * 35}|{'-' * 8}|{'-' * 13}|{'-' * 10}|{'-' * 13}|{'-' * 10}|{'-' * 18}|")
    for label, r in rows:
        grown = r["peak"] - r["baseline_peak"]
        print(f"| {label:33s} | {r['seconds']:6.1f} | {r['baseline_peak'] / MB:11.1f} | "
              f"{r['peak'] / MB:8.1f} | {grown / MB:11.1f} | {r['held'] / MB:8.1f} | "
              f"{grown / full:16.2f} |")
    if not anita["peak_reset"]:
        print("\nnote: could not reset the RSS high-water mark; peaks include import-time "
              f"spikes (import peak {anita['import_peak'] / MB:.1f} MB)")
    grown = anita["peak"] - anita["baseline_peak"]
    print(f"\nanita: peak growth {grown / MB:.1f} MB = quantized result {quantized / MB:.1f} MB "
          f"+ {max(grown - quantized, 0) / MB:.1f} MB in flight "
          f"(largest shard {largest_shard / MB:.1f} MB, largest tensor {largest_tensor / MB:.1f} MB)")


if __name__ == "__main__":
    main()
