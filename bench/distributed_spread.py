"""The fp32 spread between 2 ranks and 1 process: what tests/test_distributed_cli.py's
resume bound is derived from.

    python -m bench.distributed_spread [--seeds 60] [--first 0] [--steps 6]

For each --seed, train_sft.py runs the resume test's settings (the bundled tiny
model, global batch 8, the torch kernel backend, one thread per process) once on
2 gloo ranks under torchrun and once in one process, uninterrupted, for --steps
optimizer steps, and the largest |difference| of the two final adapters is
printed. Both runs see the same micro-batches in the same global order (seeds
whose epoch has an odd number of micro-batches, which 2 ranks would cut, are
left out and said so); the only difference is the order in which fp32 gradients
are summed (per rank, then over the ranks). A CPU measurement; it takes about
20 s per seed on the 2-core machine.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from tests.test_distributed_cli import GLOBAL, RESUME_DATA, child_env, single, torchrun
from tests.run_cli import REPO


def micro_batches_per_epoch(stderr: str) -> int:
    found = re.search(r"(\d+) micro-batches per epoch", stderr)
    if found is None:
        raise RuntimeError(f"no micro-batch count in the run's log:\n{stderr[-2000:]}")
    return int(found.group(1))


def one_seed(seed: int, steps: int, tmp: Path):
    outputs = {}
    for name, command in (("ranks", torchrun), ("single", single)):
        out = tmp / f"{name}-{seed}"
        proc = subprocess.run(command(*RESUME_DATA, *GLOBAL, "--seed", seed, "--max-steps", steps,
                                      "--output-dir", out), cwd=REPO, env=child_env(),
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"seed {seed}, {name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        outputs[name] = (out, micro_batches_per_epoch(proc.stderr))
    (ranks_out, n_ranks), (single_out, n_single) = outputs["ranks"], outputs["single"]
    if n_ranks != n_single:
        return None, n_single
    a = load_file(str(ranks_out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(single_out / "adapter" / "adapter_model.safetensors"))
    return max((a[k] - b[k]).abs().max().item() for k in b), n_single


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, default=60,
                        help="seeds tried (--seed FIRST .. FIRST+N-1); about half have an even epoch")
    parser.add_argument("--first", type=int, default=0, help="first seed")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    args = parser.parse_args(argv)
    spreads = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.first, args.first + args.seeds):
            spread, n = one_seed(seed, args.steps, Path(tmp))
            if spread is None:
                print(f"seed {seed:3d}: {n} micro-batches per epoch (odd: 2 ranks cut one), left out",
                      flush=True)
                continue
            spreads.append(spread)
            print(f"seed {seed:3d}: {n} micro-batches per epoch, max |2 ranks - 1 process| "
                  f"{spread:.3g}", flush=True)
    if spreads:
        print(f"{len(spreads)} draws, {args.steps} steps: max {max(spreads):.3g}, median "
              f"{statistics.median(spreads):.3g}, min {min(spreads):.3g} (CPU, gloo, torch backend)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
