"""train_dpo.py end to end, pairs packed by default (torch backend): the run trains, its
reference store records the packed batching, each step record carries the positions
computed per pair beside the padded layout's, and the run summary reports both."""
from __future__ import annotations

import json

from anita_core.train.reference_logprobs import KEY_FILE, STORE_DIR
from tests.run_cli import run_script


def test_train_dpo_packs_pairs_and_reports_the_positions(tmp_path, monkeypatch):
    monkeypatch.setenv("ANITA_BACKEND", "torch")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    proc = run_script("train_dpo.py", "--no-progress", "--eval-split", "2", "--batch-size", "2",
                      "--max-samples", "10", "--max-length", "48", "--max-prompt-length", "0",
                      "--gradient-accumulation-steps", "1", "--max-steps", "2",
                      "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    key = json.loads((out / STORE_DIR / KEY_FILE).read_text())
    assert key["batching"].endswith("packed=96")          # 2 x --max-length
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "positions/padded" in r]
    assert len(steps) == 2
    for r in steps:
        # per pair: a packed batch of 2 pairs is one row of <= 96 tokens, rounded to 16 at
        # most; the padded one 4 rows of the longest prompt + answer (<= 48)
        assert 0 < r["positions/computed"] <= 64 and 0 < r["positions/padded"] <= 96
        assert r["computed_tokens"] == 2 * r["positions/computed"]
    assert "positions computed per pair: " in proc.stderr and "(padded batches: " in proc.stderr
