"""python -m anita_core.plot RUN_DIR: draw a run's curves from its metrics.jsonl into
RUN_DIR/curves.png (or --output PNG), as every run does when it ends. A run still
training can be drawn too: its metrics.jsonl holds whole lines only.

Needs matplotlib (the `plot` extra); without it, one line naming the extra (exit 2).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "python -m anita_core.plot"
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run's output folder (holding metrics.jsonl)")
    parser.add_argument("--output", default=None, metavar="PNG",
                        help="where the PNG goes (default: RUN_DIR/curves.png)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from anita_core.train.curves import PLOT_EXTRA, draw_curves
    from anita_core.train.run_folder import METRICS_FILE

    def error(message: str) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    run_dir = Path(args.run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        return error(f"{run_dir}: no {METRICS_FILE} here (not a run folder)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return error(PLOT_EXTRA)
    try:
        png = draw_curves(run_dir, args.output)
    except (ValueError, OSError) as e:
        return error(f"{run_dir}: {e}")
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
