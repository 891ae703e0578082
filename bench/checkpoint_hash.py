"""What a checkpoint's manifest costs: writing a LLaMA-3-8B r16 checkpoint vs hashing it.

    python -m bench.checkpoint_hash [--dir DIR] [--repeats 5] [--rank 16] [--json OUT]

Builds the LoRA adapters of LLaMA-3-8B (hidden 4096, intermediate 14336, 32
layers, 8 KV heads of 128: q/o 4096 -> 4096, k/v 4096 -> 1024, gate/up 4096 ->
14336, down 14336 -> 4096) at rank r on all 7 projections: r x (in + out)
parameters per projection, 41,943,040 at r 16. Gives them AdamW's two moments
(one optimizer step on zero gradients). Then, --repeats times, into DIR
(default: a temp folder on this machine's disk), with time.perf_counter
(wall) and time.thread_time (CPU time of this thread), on this machine's CPU
and disk (a CPU measurement, not a GPU-host number):

  write      save_checkpoint as the trainer calls it (after os.sync, so no
             earlier write's dirty pages are flushed inside it): the files,
             their fsyncs, the rename, the ``latest`` pointer, and the manifest
  manifest   write_manifest over the same files right after (page cache hot,
             as it is inside save_checkpoint): the part of the write that is
             hashing, in wall time and in CPU time
  sha256     the same files hashed with hashlib.sha256, for comparison
  verify     file_manifest.damage: what a --resume spends checking the checkpoint

and reports manifest / (write - manifest): the hash's share of the write time.
Wall time counts the waits for a core on a shared machine; CPU time is what
the hash costs a core of its own. Medians over the repeats are printed; every
repeat goes into --json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anita_core.lora import LoRAAdapters, LoRAConfig  # noqa: E402
from anita_core.model.weights import PROJECTIONS  # noqa: E402
from anita_core.train.file_manifest import damage, write_manifest  # noqa: E402
from anita_core.train.run_checkpoint import save_checkpoint  # noqa: E402
from bench.shapes import LLAMA3_8B  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dir", default=None, help="where the checkpoints go (default: a temp folder)")
    p.add_argument("--repeats", type=int, default=5, help="checkpoints written")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--json", default=None, help="also write every repeat here")
    return p


def _sha256(path: Path) -> str:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return hashlib.sha256(mapped).hexdigest()


def llama3_8b_training_state(rank: int):
    """(adapters, trainer-state dict with AdamW's moments) at LLaMA-3-8B shapes."""
    adapters = LoRAAdapters.init(LoRAConfig(r=rank, alpha=2 * rank, dropout=0.0,
                                            target_modules=tuple(PROJECTIONS)),
                                 LLAMA3_8B.model_config())
    params = list(adapters.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return adapters, {"step": 1, "epoch": 0, "batch_index": 0, "optimizer": optimizer.state_dict()}


def _timed(fn):
    """(wall seconds, CPU seconds of this thread) of fn()."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    adapters, state = llama3_8b_training_state(args.rank)
    root = Path(args.dir or tempfile.mkdtemp(prefix="anita-checkpoint-hash-"))
    rows = []
    for repeat in range(1, args.repeats + 1):
        # the previous repeat's checkpoint is deleted untimed (save_checkpoint's pruning of
        # old checkpoints is not what is measured), and every dirty page flushed
        shutil.rmtree(root / "checkpoints", ignore_errors=True)
        os.sync()
        write, _ = _timed(lambda: save_checkpoint(root, repeat, adapters, state, keep=0))
        folder = root / "checkpoints" / f"step-{repeat:08d}"
        files = [p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"]
        manifest, manifest_cpu = _timed(lambda: write_manifest(folder))
        sha256, sha256_cpu = _timed(lambda: [_sha256(path) for path in files])
        verify, _ = _timed(lambda: damage(folder))
        rest = write - manifest
        rows.append({"repeat": repeat, "bytes": sum(p.stat().st_size for p in files), "write_s": write,
                     "manifest_s": manifest, "manifest_cpu_s": manifest_cpu, "sha256_s": sha256,
                     "sha256_cpu_s": sha256_cpu, "verify_s": verify, "manifest_share": manifest / rest,
                     "manifest_cpu_share": manifest_cpu / rest, "sha256_share": sha256 / rest,
                     "sha256_cpu_share": sha256_cpu / rest})
        r = rows[-1]
        print(f"repeat {repeat}: write {write:.3f} s; manifest {manifest:.3f} s wall "
              f"({r['manifest_share']:.1%} of the rest), {manifest_cpu:.3f} s CPU "
              f"({r['manifest_cpu_share']:.1%}); sha256 {sha256:.3f} s wall ({r['sha256_share']:.1%}), "
              f"{sha256_cpu:.3f} s CPU ({r['sha256_cpu_share']:.1%}); verify {verify:.3f} s", flush=True)
    m = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "repeat"}
    print(f"\nLLaMA-3-8B LoRA r {args.rank}, all 7 projections: {adapters.num_parameters():,} "
          f"parameters; checkpoint {m['bytes'] / 1e6:.1f} MB (adapter fp32 + AdamW moments)")
    print(f"median of {len(rows)}: write {m['write_s']:.3f} s, of which the manifest (xxh3-128) "
          f"{m['manifest_s']:.3f} s wall = {m['manifest_share']:.1%} of the rest, "
          f"{m['manifest_cpu_s']:.3f} s CPU = {m['manifest_cpu_share']:.1%}; sha256 instead: "
          f"{m['sha256_share']:.1%} wall, {m['sha256_cpu_share']:.1%} CPU; verify on resume "
          f"{m['verify_s']:.3f} s")
    print(f"(CPU measurement: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; disk of {root})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rank": args.rank, "repeats": rows, "median": m},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
