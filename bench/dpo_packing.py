"""DPO pairs padded against packed with a shared prompt: the work each layout does.

On the same pairs in one run, per layout: positions computed per pair (the batch
tensors' size; "needed" = prompt + chosen + rejected, the prompt once) and the
time of one DPO micro-step of the policy (forward + backward, the reference read
from a store as a precomputed run does) per pair. Two pair sets:

  bundled    the bundled preference pairs with the bundled tokenizer (dpo preset's
             truncation), each batch of --batch-size pairs
  synthetic  chat-shaped pairs: prompt, chosen and rejected lengths log-normal with
             medians 150 / 250 / 230 tokens and sigma --sigma (default 1.0: the
             spread at which the padded dpo preset computes 1.9x the positions it
             needs, issue 30's figure for chat preference data; a median 250-token
             answer then has its 90% range at ~50-1,300 tokens before truncation),
             random ids, TRL's truncation at --max-prompt-length 512 / --max-length 1024

Padded = data/dpo.py collate_pairs (2 x batch rows, all as wide as the longest
prompt + answer); packed = data/dpo_pack.py (rows of 2 x max_length tokens,
rounded to 16). Timing: on the CPU (default there; set ANITA_BACKEND=torch for
the plain-torch kernels) time.perf_counter over --timed-batches batches, after
one warm-up batch; on a GPU, CUDA-synchronized wall time, and tokens/s =
needed positions / time. The model: by default a random NF4 LLaMA of 2 layers and
--hidden 512 (intermediate 3.5x, head_dim 64, 8 query / 2 kv heads, vocab 1024),
where, as in a real model at these lengths, the projections' work (per position)
outweighs attention's (per position pair); --hidden 0: the bundled tiny model
(hidden 64, head_dim 16), whose step is mostly attention, so its time follows
attention's key reads, not positions; or --checkpoint. Rank-8 adapters on every
projection.

    ANITA_BACKEND=torch python -m bench.dpo_packing --out dpo_packing.csv
"""
from __future__ import annotations

import argparse
import csv
import math
import random
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

FIELDS = ("pairs", "layout", "batch_size", "n_pairs", "needed_per_pair", "positions_per_pair",
          "positions_ratio_vs_padded", "timed_pairs", "ms_per_pair", "time_ratio_vs_padded",
          "tokens_per_s", "device", "model", "sigma")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.dpo_packing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", choices=("bundled", "synthetic", "both"), default="both",
                   help="which pair set(s) (default: both)")
    p.add_argument("--batch-size", type=int, default=2, help="pairs per micro-batch (default: 2, "
                   "the dpo preset's)")
    p.add_argument("--synthetic-pairs", type=int, default=512,
                   help="synthetic pairs for the position counts (default: 512)")
    p.add_argument("--sigma", type=float, default=1.0,
                   help="log-normal sigma of the synthetic lengths (default: 1.0, where the padded "
                        "layout computes 1.9x the needed positions)")
    p.add_argument("--max-length", type=int, default=1024, help="TRL max_length (default: 1024)")
    p.add_argument("--max-prompt-length", type=int, default=512,
                   help="TRL max_prompt_length (default: 512)")
    p.add_argument("--timed-batches", type=int, default=8,
                   help="batches timed per layout and pair set (default: 8; 0: counts only)")
    p.add_argument("--hidden", type=int, default=512,
                   help="hidden size of the random 2-layer model (default: 512; 0: the bundled "
                        "tiny model)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="HF LLaMA checkpoint (default: none, see --hidden)")
    p.add_argument("--smoke", action="store_true",
                   help="a few short pairs, 2 timed batches: checks that the harness runs")
    p.add_argument("--seed", type=int, default=0, help="synthetic data and order seed (default: 0)")
    p.add_argument("--out", type=Path, default=None, help="CSV file to write (default: none)")
    args = p.parse_args(argv)
    for name in ("batch_size", "synthetic_pairs", "max_length", "max_prompt_length"):
        if getattr(args, name) < 1:
            p.error(f"argument --{name.replace('_', '-')}: must be >= 1")
    if args.hidden < 0 or args.hidden % 64:
        p.error("argument --hidden: must be a multiple of 64 (0: the bundled model)")
    if args.timed_batches < 0:
        p.error("argument --timed-batches: must be >= 0")
    if not 0 < args.max_prompt_length < args.max_length:
        p.error("argument --max-prompt-length: must be in (0, --max-length)")
    if args.sigma <= 0:
        p.error("argument --sigma: must be > 0")
    return args


def synthetic_pairs(n: int, sigma: float, vocab: int, *, max_length: int, max_prompt_length: int,
                    seed: int, medians=(150, 250, 230)) -> List:
    from anita_core.data.dpo import PreferencePair, truncate_pair
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        lengths = [max(1, round(rng.lognormvariate(math.log(m), sigma))) for m in medians]
        ids = [[rng.randrange(vocab) for _ in range(k)] for k in lengths]
        kept, _ = truncate_pair(*ids, max_length=max_length, max_prompt_length=max_prompt_length)
        if kept is not None and kept[1] != kept[2]:
            out.append(PreferencePair(*kept))
    return out


def bundled_pairs(max_length: int, max_prompt_length: int) -> List:
    from anita_core.assets import TOKENIZER_DIR, sample_path
    from anita_core.data import load_tokenizer
    from anita_core.data.dpo import DPODataConfig, build_dpo_data
    config = DPODataConfig(data=sample_path("dpo"), max_length=max_length,
                           max_prompt_length=max_prompt_length)
    return build_dpo_data(config, load_tokenizer(TOKENIZER_DIR)).train


def layouts(pairs, batch_size: int, max_length: int) -> Dict[str, List[dict]]:
    from anita_core.data.dpo import dpo_batches
    from anita_core.data.dpo_pack import packed_dpo_batches
    from anita_core.train.reference_logprobs import INDEX_KEY
    out = {"padded": dpo_batches(pairs, batch_size=batch_size, pad_id=0),
           "packed": packed_dpo_batches(pairs, batch_size=batch_size, budget=2 * max_length,
                                        pad_id=0)}
    for batches in out.values():
        for k, b in enumerate(batches):
            n = min(batch_size, len(pairs) - k * batch_size)
            b[INDEX_KEY] = torch.arange(k * batch_size, k * batch_size + n)
    return out


def positions(batch: dict) -> int:
    if "score_index" in batch:
        return batch["input_ids"].numel()
    return batch["chosen"]["input_ids"].numel() + batch["rejected"]["input_ids"].numel()


def random_model(hidden: int, device):
    from anita_core.model import QLoRALlama
    from anita_core.model.config import ModelConfig
    from bench.train_models import random_base_weights
    config = ModelConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 7 // 2,
                         num_hidden_layers=2, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 256), head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=4096)
    return QLoRALlama(config, random_base_weights(config, torch.float32, device, 64, True, seed=0))


def make_objective(checkpoint, hidden: int, n_pairs: int, device):
    from anita_core.hf import load_model
    from anita_core.lora import LoRAAdapters, LoRAConfig
    from anita_core.train.objectives import DPOObjective
    from anita_core.train.reference_logprobs import ReferenceLogps
    from anita_core.cli.common import BUNDLED_MODEL
    if checkpoint is None and hidden:
        model = random_model(hidden, device)
    else:
        model = load_model(checkpoint or BUNDLED_MODEL, progress=False, device=device)
    model.adapters = LoRAAdapters.init(LoRAConfig(r=8, alpha=16, dropout=0.0, seed=0), model.config)
    store = ReferenceLogps.empty(n_pairs)
    store.computed[:] = True     # zeros: the step's cost does not depend on the values
    return DPOObjective(model, beta=0.1, reference_store=store)


def time_layouts(objective, built: Dict[str, List[dict]], count: int, device) -> Dict[str, float]:
    """Seconds per layout for the micro-steps of its first ``count`` batches, after one
    warm-up step each; the layouts' steps alternate (padded batch k, packed batch k, ...)
    so that a shared machine's load drifts over both alike."""
    def step(b):
        start = time.perf_counter()
        objective.micro_step(b, grad_scale=1.0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    for batches in built.values():
        step(batches[0])
    seconds = dict.fromkeys(built, 0.0)
    for k in range(count):
        for layout, batches in built.items():
            if k < len(batches):
                seconds[layout] += step(batches[k])
    return seconds


def measure(args) -> List[dict]:
    from bench.common import bench_device
    device = bench_device()     # the one place a bench entry point's device is decided
    sets = ("bundled", "synthetic") if args.pairs == "both" else (args.pairs,)
    timed = 2 if args.smoke else args.timed_batches
    rows = []
    objective = None
    model_name = (str(args.checkpoint) if args.checkpoint else
                  f"random 2 layers hidden {min(args.hidden, 128) if args.smoke else args.hidden}"
                  if args.hidden else "bundled tiny-llama3")
    for name in sets:
        if name == "bundled":
            pairs = bundled_pairs(args.max_length, args.max_prompt_length)
        else:
            n = 8 if args.smoke else args.synthetic_pairs
            scale = 0.1 if args.smoke else 1.0
            pairs = synthetic_pairs(n, args.sigma, 1000, max_length=args.max_length,
                                    max_prompt_length=args.max_prompt_length, seed=args.seed,
                                    medians=tuple(round(m * scale) for m in (150, 250, 230)))
        needed = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        built = layouts(pairs, args.batch_size, args.max_length)
        if timed and objective is None:
            hidden = min(args.hidden, 128) if args.smoke else args.hidden
            objective = make_objective(args.checkpoint, hidden, 10 ** 5, device)
        result = {}
        seconds = time_layouts(objective, built, timed, device) if timed else {}
        for layout, batches in built.items():
            row = dict(pairs=name, layout=layout, batch_size=args.batch_size, n_pairs=len(pairs),
                       needed_per_pair=needed / len(pairs),
                       positions_per_pair=sum(map(positions, batches)) / len(pairs),
                       device=str(device), model=model_name, sigma=args.sigma if name == "synthetic" else "")
            if timed:
                some = batches[:timed]
                some_pairs = sum(objective.units(b) for b in some)
                some_needed = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                                  for p in pairs[:some_pairs])
                row.update(timed_pairs=some_pairs, ms_per_pair=1e3 * seconds[layout] / some_pairs,
                           tokens_per_s=some_needed / seconds[layout])
            result[layout] = row
        for row in result.values():
            row["positions_ratio_vs_padded"] = (result["padded"]["positions_per_pair"]
                                                / row["positions_per_pair"])
            if timed:
                row["time_ratio_vs_padded"] = result["padded"]["ms_per_pair"] / row["ms_per_pair"]
            rows.append(row)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = measure(args)
    label = "SMOKE RUN — not performance" if args.smoke else "measurement"
    print(f"== bench.dpo_packing ({label}) ==")
    print("  ".join(f"{c:>14}" for c in FIELDS))
    for r in rows:
        print("  ".join(f"{(f'{r[c]:.4g}' if isinstance(r.get(c), float) else str(r.get(c, ''))):>14}"
                        for c in FIELDS))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=("label", "command") + FIELDS)
            writer.writeheader()
            command = " ".join(["python", "-m", "bench.dpo_packing"] + sys.argv[1:])
            for r in rows:
                writer.writerow(dict({c: r.get(c, "") for c in FIELDS}, label=label, command=command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
