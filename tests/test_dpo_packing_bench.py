"""bench/dpo_packing.py: --help, bad input as one line, and a smoke run (torch backend)
that writes its CSV with both layouts of both pair sets, labelled as a smoke run, the
positions counted from the batches it built (checked here against the packer and
collate_pairs directly)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from bench import dpo_packing

REPO = Path(__file__).resolve().parent.parent


def _run(*args):
    env = dict(os.environ, ANITA_BACKEND="torch", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bench.dpo_packing", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def test_help_and_bad_input():
    proc = _run("--help")
    assert proc.returncode == 0 and "--sigma" in proc.stdout and "synthetic" in proc.stdout
    proc = _run("--max-prompt-length", "2000")
    assert proc.returncode == 2 and "--max-prompt-length" in proc.stderr.strip().splitlines()[-1]


def test_smoke_run_writes_both_layouts(tmp_path):
    out = tmp_path / "dpo_packing.csv"
    proc = _run("--smoke", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["pairs"], r["layout"]) for r in rows] == [
        ("bundled", "padded"), ("bundled", "packed"), ("synthetic", "padded"), ("synthetic", "packed")]
    assert all(r["label"].startswith("SMOKE RUN") for r in rows)
    for padded, packed in (rows[0:2], rows[2:4]):
        assert float(packed["positions_per_pair"]) < float(padded["positions_per_pair"])
        assert float(packed["positions_per_pair"]) >= float(packed["needed_per_pair"])
        assert abs(float(packed["positions_ratio_vs_padded"]) - float(padded["positions_per_pair"])
                   / float(packed["positions_per_pair"])) < 1e-4 * float(packed["positions_ratio_vs_padded"])
        assert float(packed["ms_per_pair"]) > 0 and float(padded["ms_per_pair"]) > 0


def test_position_counts_match_the_batches():
    from anita_core.data.dpo import collate_pairs
    from anita_core.data.dpo_pack import collate_packed_pairs
    pairs = dpo_packing.synthetic_pairs(6, 0.6, 100, max_length=64, max_prompt_length=32, seed=3,
                                        medians=(20, 30, 25))
    built = dpo_packing.layouts(pairs, 2, 64)
    for k in range(3):
        group = pairs[2 * k:2 * k + 2]
        padded = collate_pairs(group, pad_id=0)
        assert dpo_packing.positions(built["padded"][k]) == 2 * padded["chosen"]["input_ids"].numel()
        packed = collate_packed_pairs(group, budget=128, pad_id=0)
        assert dpo_packing.positions(built["packed"][k]) == packed["input_ids"].numel()
    for p in pairs:      # TRL's truncation held
        assert len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 64
