"""The run's curves, drawn from metrics.jsonl into one PNG in the run folder
(OUTPUT_DIR/curves.png): at the end of every run, and on demand with
``python -m anita_core.plot RUN_DIR``.

Panels against the optimizer step: the training loss with the eval loss, the learning
rate, the gradient norm (before clipping), tokens/s, the device memory where the run
measured it (a GPU), and for DPO the rewards of the chosen and the rejected answers,
their margin and the reward accuracy (train and eval). matplotlib (the `plot` extra)
draws it on its Agg canvas, without pyplot's global state. The PNG carries what it
draws in a text chunk (``anita:series``: panel -> series -> number of points), so a
reader can check a PNG without trusting the code that drew it.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from anita_core.train.run_folder import CURVES_FILE, read_metrics

PLOT_EXTRA = "matplotlib is not installed (pip install matplotlib, or pip install -e \".[plot]\")"
SERIES_KEY = "anita:series"
PANEL_INCHES = (4.4, 3.0)          # width, height of one panel
DPI = 100


@dataclass
class Series:
    label: str
    steps: List[int]
    values: List[float]


@dataclass
class Panel:
    title: str
    ylabel: str
    series: List[Series]
    ylim: Optional[tuple] = None


def _series(records: Sequence[dict], key: str, label: str) -> Optional[Series]:
    points = [(r["step"], float(r[key])) for r in records
              if isinstance(r.get(key), (int, float)) and "step" in r]
    if not points:
        return None
    return Series(label, [s for s, _ in points], [v for _, v in points])


def _panel(records, title: str, ylabel: str, keys: Sequence[tuple], ylim=None) -> Optional[Panel]:
    """A panel of the series ``keys`` ((record key, label), ...) that the records hold."""
    series = [s for s in (_series(records, key, label) for key, label in keys) if s is not None]
    return Panel(title, ylabel, series, ylim) if series else None


def panels(records: Sequence[dict]) -> List[Panel]:
    """What the PNG draws, from metrics.jsonl's records: each panel whose values exist."""
    found = [
        _panel(records, "loss", "loss", [("loss", "train"), ("eval_loss", "eval")]),
        _panel(records, "learning rate", "learning rate", [("lr", "learning rate")]),
        _panel(records, "gradient norm", "L2 norm, before clipping", [("grad_norm", "gradient norm")]),
        _panel(records, "tokens/s", "mean since the process started",
               [("tokens_per_s", "tokens/s")]),
        _panel(records, "device memory", "GiB", [("memory_peak_gib", "peak allocated"),
                                                 ("memory_allocated_gib", "allocated"),
                                                 ("memory_reserved_gib", "reserved")]),
        _panel(records, "DPO rewards", "reward (beta x log-ratio)",
               [("rewards/chosen", "train chosen"), ("rewards/rejected", "train rejected"),
                ("eval_rewards/chosen", "eval chosen"), ("eval_rewards/rejected", "eval rejected")]),
        _panel(records, "DPO reward margin", "chosen - rejected",
               [("rewards/margins", "train"), ("eval_rewards/margins", "eval")]),
        _panel(records, "DPO reward accuracy", "share of pairs, chosen > rejected",
               [("rewards/accuracies", "train"), ("eval_rewards/accuracies", "eval")], ylim=(-0.05, 1.05)),
    ]
    return [p for p in found if p is not None]


def grid(n: int) -> tuple:
    """(rows, columns) for n panels: 2 columns up to 4 panels, 3 up to 6, then 4."""
    columns = 2 if n <= 4 else 3 if n <= 6 else 4
    return max(1, math.ceil(n / columns)), columns


def _style(series: Series) -> dict:
    """Eval dashed with square markers, train solid; a chosen answer's reward green, a
    rejected one's red (train and eval alike); a few points get markers so one shows."""
    evaluation = series.label.startswith("eval")
    style = dict(linewidth=1.2, linestyle="--" if evaluation else "-", markersize=4 if evaluation else 3,
                 marker="s" if evaluation else ("o" if len(series.steps) <= 50 else None))
    for word, color in (("chosen", "tab:green"), ("rejected", "tab:red")):
        if word in series.label:
            style["color"] = color
    return style


def curves_figure(records: Sequence[dict], title: str = ""):
    """A matplotlib Figure of ``panels(records)``; ValueError when there is nothing to draw."""
    from matplotlib.figure import Figure
    drawn = panels(records)
    if not drawn:
        raise ValueError("metrics.jsonl holds no step records to draw")
    rows, columns = grid(len(drawn))
    figure = Figure(figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows + 0.4), dpi=DPI,
                    layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, panel in zip(axes, drawn):
        for series in panel.series:
            ax.plot(series.steps, series.values, label=series.label, **_style(series))
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        if panel.ylim:
            ax.set_ylim(*panel.ylim)
        ax.grid(True, alpha=0.3)
        if len(panel.series) > 1:
            ax.legend(fontsize="small")
    for ax in axes[len(drawn):]:
        ax.set_visible(False)
    if title:
        figure.suptitle(title)
    return figure, drawn


def series_summary(drawn: Sequence[Panel]) -> Dict[str, Dict[str, int]]:
    """panel title -> series label -> number of points: what the PNG's text chunk says."""
    return {p.title: {s.label: len(s.steps) for s in p.series} for p in drawn}


def draw_curves(output_dir: Path, png: Optional[Path] = None) -> Path:
    """Draw the run's curves into ``png`` (default OUTPUT_DIR/curves.png), replacing it
    whole (written aside, then renamed). ValueError when metrics.jsonl has no records."""
    output_dir = Path(output_dir)
    records = read_metrics(output_dir)
    steps = [r["step"] for r in records if "loss" in r]
    name = output_dir.resolve().name
    title = f"{name}: {len(steps)} steps logged" + (f", last {steps[-1]}" if steps else "")
    figure, drawn = curves_figure(records, title)
    png = Path(png) if png is not None else output_dir / CURVES_FILE
    fd, tmp = tempfile.mkstemp(dir=png.parent, prefix=f".{png.name}.", suffix=".png")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)        # an ordinary file's mode, not mkstemp's private 0600
        figure.savefig(tmp, format="png", metadata={
            "Title": f"anita run {name}", SERIES_KEY: json.dumps(series_summary(drawn))})
        os.replace(tmp, png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return png


def draw_run_curves(output_dir: Path, log: Callable[[str], None]) -> Optional[Path]:
    """The end of a run: draw its curves, or say in one line why they were not drawn.
    Never fails the run (the curves are a view of metrics.jsonl, which is kept)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log(f"curves not drawn: {PLOT_EXTRA}; draw them later with "
            f"python -m anita_core.plot {output_dir}")
        return None
    try:
        png = draw_curves(output_dir)
    except KeyboardInterrupt:   # a second Ctrl-C while drawing: the run is over already
        log("curves not drawn: interrupted")
        return None
    except Exception as e:      # a plot is never worth a failed run
        log(f"warning: curves not drawn ({type(e).__name__}: {e})")
        return None
    log(f"curves: {png}")
    return png
