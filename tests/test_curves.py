"""The curves PNG: each panel draws exactly metrics.jsonl's series (SFT and DPO, the
memory panel where a run measured memory), `python -m anita_core.plot RUN_DIR` draws
any run folder, and without matplotlib a run still ends well, saying in one line
that the curves were skipped, while the command refuses in one line naming the extra."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from anita_core.train.curves import DPI, PANEL_INCHES, curves_figure, draw_curves, grid, panels
from anita_core.train.run_folder import CURVES_FILE
from tests.report_readers import png_facts
from tests.run_cli import REPO, TINY, run_script
from tests.test_data_loading import blocked_env

NEEDS_PLOT = 'matplotlib is not installed (pip install matplotlib, or pip install -e ".[plot]")'


def sft_records(steps=7, eval_every=3):
    records = []
    for s in range(1, steps + 1):
        records.append({"step": s, "epoch": s / 10, "lr": 1e-3 * s, "grad_norm": 0.5 + s / 7,
                        "units": 11, "loss": 3.0 - s / 9, "tokens": 40, "computed_tokens": 64,
                        "tokens_per_s": 100.0 + s})
        if s % eval_every == 0:
            records.append({"step": s, "eval_loss": 2.9 - s / 11})
    return records


def dpo_records(steps=4):
    records = []
    for s in range(1, steps + 1):
        records.append({"step": s, "lr": 5e-4, "grad_norm": 0.3, "loss": 0.69 - s / 50,
                        "rewards/chosen": s / 10, "rewards/rejected": -s / 9, "rewards/margins": s / 10 + s / 9,
                        "rewards/accuracies": min(1.0, s / 3), "logps/chosen": -50.0, "logps/rejected": -60.0,
                        "tokens_per_s": 90.0, "memory_peak_gib": 1.5 + s / 100, "memory_allocated_gib": 1.2,
                        "memory_reserved_gib": 2.0})
    records.append({"step": steps, "eval_loss": 0.6, "eval_rewards/chosen": 0.2, "eval_rewards/rejected": -0.3,
                    "eval_rewards/margins": 0.5, "eval_rewards/accuracies": 0.75})
    return records


def drawn_lines(figure):
    """title -> label -> (x, y) of every line the figure's visible axes draw."""
    out = {}
    for ax in figure.axes:
        if ax.get_visible():
            out[ax.get_title()] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                                   for line in ax.get_lines()}
    return out


def test_sft_panels_draw_exactly_the_records():
    records = sft_records()
    figure, drawn = curves_figure(records)
    lines = drawn_lines(figure)
    assert list(lines) == ["loss", "learning rate", "gradient norm", "tokens/s"]
    steps = list(range(1, 8))
    assert lines["loss"] == {"train": (steps, [3.0 - s / 9 for s in steps]),
                             "eval": ([3, 6], [2.9 - 3 / 11, 2.9 - 6 / 11])}
    assert lines["learning rate"] == {"learning rate": (steps, [1e-3 * s for s in steps])}
    assert lines["gradient norm"] == {"gradient norm": (steps, [0.5 + s / 7 for s in steps])}
    assert lines["tokens/s"] == {"tokens/s": (steps, [100.0 + s for s in steps])}
    for ax in figure.axes[:4]:
        assert ax.get_xlabel() == "step" and ax.get_ylabel()
    assert [p.title for p in drawn] == list(lines)


def test_dpo_panels_add_rewards_margins_and_accuracy_and_memory_where_measured():
    figure, drawn = curves_figure(dpo_records())
    lines = drawn_lines(figure)
    assert list(lines) == ["loss", "learning rate", "gradient norm", "tokens/s", "device memory",
                           "DPO rewards", "DPO reward margin", "DPO reward accuracy"]
    steps = [1, 2, 3, 4]
    assert lines["DPO rewards"] == {"train chosen": (steps, [s / 10 for s in steps]),
                                    "train rejected": (steps, [-s / 9 for s in steps]),
                                    "eval chosen": ([4], [0.2]), "eval rejected": ([4], [-0.3])}
    assert lines["DPO reward margin"]["eval"] == ([4], [0.5])
    assert lines["DPO reward accuracy"]["train"] == (steps, [1 / 3, 2 / 3, 1.0, 1.0])
    assert lines["device memory"]["peak allocated"] == (steps, [1.5 + s / 100 for s in steps])
    assert len(figure.axes) == 8 and grid(len(drawn)) == (2, 4)


def test_grid_and_nothing_to_draw():
    assert [grid(n) for n in (1, 4, 5, 6, 7, 9)] == [(1, 2), (2, 2), (2, 3), (2, 3), (2, 4), (3, 4)]
    assert panels([{"step": 1, "eval_loss": 2.0}])[0].title == "loss"
    with pytest.raises(ValueError, match="no step records"):
        curves_figure([])


def test_draw_curves_writes_the_png_whole(tmp_path):
    records = dpo_records()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records)
                                            + '{"step": 5, "lo')        # a line cut by a kill
    png = draw_curves(tmp_path)
    assert png == tmp_path / CURVES_FILE and png.stat().st_size > 20_000
    size, series = png_facts(png)
    assert size == (round(4 * PANEL_INCHES[0] * DPI), round((2 * PANEL_INCHES[1] + 0.4) * DPI))
    assert series["loss"] == {"train": 4, "eval": 1} and series["DPO reward accuracy"] == {"train": 4, "eval": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temp file left


def test_plot_command_draws_a_run_folder(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_records()))
    target = tmp_path / "elsewhere.png"
    proc = subprocess.run([sys.executable, "-m", "anita_core.plot", str(tmp_path), "--output", str(target)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(target)
    size, series = png_facts(target)
    assert size == (880, 640) and series["loss"] == {"train": 7, "eval": 2}
    proc = subprocess.run([sys.executable, "-m", "anita_core.plot", str(tmp_path / "nothing")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"python -m anita_core.plot: error: {tmp_path / 'nothing'}: no "
                                   "metrics.jsonl here (not a run folder)")


def test_without_matplotlib_the_run_ends_well_and_the_command_names_the_extra(tmp_path):
    env = {**blocked_env(tmp_path, "matplotlib"), "ANITA_BACKEND": "torch"}
    out = tmp_path / "run"
    proc = run_script("train_sft.py", *TINY, "--max-steps", 2, "--output-dir", out, timeout=300, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"curves not drawn: {NEEDS_PLOT}; draw them later with python -m anita_core.plot {out}"
            in proc.stderr.splitlines())
    assert (out / "adapter").is_dir() and not (out / CURVES_FILE).exists()
    proc = subprocess.run([sys.executable, "-m", "anita_core.plot", str(out)], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"python -m anita_core.plot: error: {NEEDS_PLOT}"
