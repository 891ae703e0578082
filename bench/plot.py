"""PNG plots from a CSV written by bench/kernels.py, bench/nf4_matmul.py or
bench/train.py (the CSV's 'bench' column says which).

    python -m bench.plot bench/results/kernels-20250101T000000Z.csv
    python -m bench.plot RESULTS.csv --out-dir /tmp/plots

Only rows with status 'ok' are drawn. A smoke-run CSV gives plots stamped
"SMOKE RUN — not performance" across the figure. Needs matplotlib
(pip install -e ".[bench]").
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a file: make `import bench` work like python -m
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SMOKE_LABEL  # noqa: E402


class MissingMatplotlib(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingMatplotlib("matplotlib is not installed: pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _number(value: str) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _stamp(fig, rows, title: str) -> None:
    """Title with device and date; a smoke run is stamped across the figure."""
    first = rows[0]
    fig.suptitle(f"{title}\n{first['device']} · {first['dtype']} · {first['timestamp'][:10]} · "
                 f"{first['label']}", fontsize=10)
    if first["label"] == SMOKE_LABEL:
        fig.text(0.5, 0.5, SMOKE_LABEL, fontsize=28, color="red", alpha=0.35, ha="center",
                 va="center", rotation=25, transform=fig.transFigure)


def _save(fig, plt, path: Path, written: List[Path]) -> None:
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)


def _by(rows, *keys) -> Dict[tuple, list]:
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r)
    return groups


# ------------------------------------------------------------------ kernels
def _plot_kernels(rows, out_dir: Path, stem: str) -> List[Path]:
    plt = _pyplot()
    written: List[Path] = []
    ok = [r for r in rows if r["status"] == "ok"]
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in ok if r["op"] == op]
        if not op_rows:
            continue
        groups = list(dict.fromkeys(r["group"] for r in op_rows))
        modes = list(dict.fromkeys(r["mode"] for r in op_rows))
        weight_only = all(r["tokens"] == "" for r in op_rows)
        frac_key = "frac_matmul" if op_rows[0]["bound"] == "compute" else "frac_copy_bw"
        for metric, ylabel, suffix in (("median_ms", "median time (ms)", "time"),
                                       (frac_key, f"{frac_key} (of measured ceiling)", "ceiling")):
            panel_groups = [""] if weight_only else groups
            fig, axes = plt.subplots(len(panel_groups), len(modes), squeeze=False,
                                     figsize=(4.2 * len(modes), 3.2 * len(panel_groups)))
            for gi, group in enumerate(panel_groups):
                for mi, mode in enumerate(modes):
                    ax = axes[gi][mi]
                    cell = [r for r in op_rows if r["mode"] == mode and (weight_only or r["group"] == group)]
                    for provider, prov_rows in _by(cell, "provider").items():
                        if weight_only:
                            xs = [r["group"] for r in prov_rows]
                        else:
                            xs = [int(r["tokens"]) for r in prov_rows]
                        ys = [_number(r[metric]) for r in prov_rows]
                        ax.plot(xs, ys, marker="o", label=provider[0])
                    if not weight_only:
                        ax.set_xscale("log", base=2)
                        ax.set_xlabel("tokens T")
                    else:
                        ax.tick_params(axis="x", labelrotation=20)
                    if metric == "median_ms":
                        ax.set_yscale("log")
                    ax.set_ylabel(ylabel, fontsize=8)
                    ax.set_title(f"{mode}" + (f" · {group}" if group else ""), fontsize=9)
                    ax.grid(True, alpha=0.3)
                    ax.legend(fontsize=7)
            _stamp(fig, rows, f"{op} ({suffix})")
            _save(fig, plt, out_dir / f"{stem}-{op}-{suffix}.png", written)
    return written


# ------------------------------------------------------------------ nf4_matmul
def _plot_nf4_matmul(rows, out_dir: Path, stem: str) -> List[Path]:
    plt = _pyplot()
    written: List[Path] = []
    ok = [r for r in rows if r["status"] == "ok"]
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    modes = list(dict.fromkeys(r["mode"] for r in ok))
    if not ok:
        return written
    fig, axes = plt.subplots(len(shapes), len(modes), squeeze=False,
                             figsize=(5 * len(modes), 3.4 * len(shapes)))
    for si, shape in enumerate(shapes):
        for mi, mode in enumerate(modes):
            ax = axes[si][mi]
            cell = [r for r in ok if r["shape"] == shape and r["mode"] == mode]
            for (provider,), prov_rows in _by(cell, "provider").items():
                ax.plot([int(r["m"]) for r in prov_rows], [_number(r["tflops"]) for r in prov_rows],
                        marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")   # M = 1 and M = 16K differ by orders of magnitude
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("TFLOP/s (2 M N K / time)", fontsize=8)
            ax.set_title(f"{mode} · {shape}", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    _stamp(fig, rows, "nf4_matmul vs dequantize + matmul vs bf16 matmul")
    _save(fig, plt, out_dir / f"{stem}.png", written)
    return written


# ------------------------------------------------------------------ train
def _plot_train(rows, out_dir: Path, stem: str) -> List[Path]:
    plt = _pyplot()
    written: List[Path] = []
    ok = [r for r in rows if r["status"] == "ok" and r["measurement"] == "throughput"]
    fits = [r for r in rows if r["measurement"] == "longest_seq_batch1"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    frameworks = list(dict.fromkeys(r["framework"] for r in rows))
    seqs = sorted({int(r["seq_len"]) for r in ok})
    width = 0.8 / max(1, len(frameworks))
    for fi, fw in enumerate(frameworks):
        fw_rows = {int(r["seq_len"]): r for r in ok if r["framework"] == fw}
        xs = [i + fi * width for i in range(len(seqs))]
        axes[0].bar(xs, [_number(fw_rows[s]["tokens_per_s"]) if s in fw_rows else 0 for s in seqs],
                    width, label=fw)
        axes[1].bar(xs, [_number(fw_rows[s]["peak_mib"]) or 0 if s in fw_rows else 0 for s in seqs],
                    width, label=fw)
    for ax, ylabel in ((axes[0], "tokens / s"), (axes[1], "peak GPU memory (MiB)")):
        ax.set_xticks([i + width * (len(frameworks) - 1) / 2 for i in range(len(seqs))])
        ax.set_xticklabels([str(s) for s in seqs])
        ax.set_xlabel("sequence length (batch as fits)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    bars = axes[2].bar([r["framework"] for r in fits], [_number(r["seq_len"]) or 0 for r in fits])
    for bar, r in zip(bars, fits):
        # a search that reached its limit without running out of memory is a lower bound
        text = f">= {r['seq_len']}" if "limit" in r["status"] else (r["seq_len"] or r["status"])
        axes[2].annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                         ha="center", va="bottom", fontsize=8)
    axes[2].set_ylabel("longest sequence at batch 1")
    _stamp(fig, rows, "QLoRA training steps")
    _save(fig, plt, out_dir / f"{stem}.png", written)
    return written


PLOTTERS = {"kernels": _plot_kernels, "nf4_matmul": _plot_nf4_matmul, "train": _plot_train}


def plot_csv(path: Path, out_dir: Optional[Path] = None) -> List[Path]:
    """Write the PNGs for one CSV (next to it unless out_dir); returns their paths."""
    path = Path(path)
    rows = read_rows(path)
    if not rows:
        return []
    bench = rows[0]["bench"]
    if bench not in PLOTTERS:
        raise ValueError(f"{path}: unknown bench {bench!r}; expected one of {list(PLOTTERS)}")
    out_dir = Path(out_dir) if out_dir else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    return PLOTTERS[bench](rows, out_dir, path.stem)


def plot_or_note(path: Path) -> List[Path]:
    """plot_csv, printing what was written, or why nothing was (no matplotlib)."""
    try:
        written = plot_csv(path)
    except MissingMatplotlib as why:
        print(f"note: no plots ({why})")
        return []
    print(f"plots: {', '.join(str(p) for p in written) or 'none (no ok rows)'}")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path, nargs="+", help="CSV file(s) written by a bench script")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where to write the PNGs (default: next to each CSV)")
    args = parser.parse_args(argv)
    for path in args.csv:
        written = plot_csv(path, args.out_dir)
        print("\n".join(str(p) for p in written) or f"{path}: no ok rows to plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
