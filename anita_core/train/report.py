"""Where a run's metrics go: ``metrics.jsonl`` always, and the ``--report-to`` backends
(TensorBoard, Weights & Biases) beside it, all written by rank 0 only.

The backends get TRL's names, as the HF Trainer's TensorBoard and W&B callbacks write
them (its ``rewrite_logs``): ``eval_x`` becomes ``eval/x`` and every other key
``train/x``, with the Trainer's own words for two of anita's keys (``lr`` is
``learning_rate``, ``tokens_per_s`` is ``tokens_per_second``). So a run shows
``train/loss``, ``train/learning_rate``, ``train/grad_norm``, ``eval/loss``, and for DPO
``train/rewards/chosen``, ``eval/logps/rejected`` ..., the panels a TRL run's have.

A resume cuts metrics.jsonl back to its checkpoint's step before the trainer opens the
backends (``Reporter.session``), and each backend opens cut back to that same step and
holding metrics.jsonl's rows up to it, so every curve holds each step once:
TensorBoard rewrites its event files without the later steps (report_tensorboard.py),
W&B continues the same run rewound (report_wandb.py). A backend first asked for on a
resume starts with the rows the run logged before. A backend that was asked for but
is not installed is refused while the flags are parsed, before anything loads.
"""
from __future__ import annotations

import argparse
import importlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

from anita_core.train.report_wandb import DEFAULT_WANDB_PROJECT
from anita_core.train.run_folder import append_metrics, read_metrics

BACKENDS = ("tensorboard", "wandb")
# backend -> (what the code imports, the pip package, the setup.py extra)
_NEEDS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard", "tensorboard"),
          "wandb": ("wandb", "wandb", "wandb")}
# anita's record keys whose TRL / HF Trainer names differ
TRL_NAMES = {"lr": "learning_rate", "tokens_per_s": "tokens_per_second"}


class ReportError(RuntimeError):
    """A backend could not start or write (e.g. W&B online without a login)."""


def report_targets(text: str) -> Tuple[str, ...]:
    """--report-to's value: ``none``, or a comma-separated subset of BACKENDS."""
    items = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [t for t in items if t not in BACKENDS + ("none",)]
    if unknown or not items or ("none" in items and len(items) > 1):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected none, or a comma-separated subset of {','.join(BACKENDS)}")
    return tuple(t for t in items if t != "none")


def add_report_arguments(g) -> None:
    """The reporting flags of train_sft.py / train_dpo.py, in argument group ``g``."""
    g.add_argument("--report-to", type=report_targets, default="none", metavar="none|" + ",".join(BACKENDS),
                   help="where metrics go besides metrics.jsonl (comma-separated for several): "
                        "tensorboard writes OUTPUT_DIR/tensorboard; wandb logs to Weights & Biases "
                        "(WANDB_MODE=offline keeps it on disk, under OUTPUT_DIR/wandb, for `wandb sync`)")
    g.add_argument("--wandb-project", default=None, metavar="NAME",
                   help=f"W&B project (default: $WANDB_PROJECT, else {DEFAULT_WANDB_PROJECT})")
    g.add_argument("--run-name", default=None, metavar="NAME",
                   help="the run's name in W&B (default: $WANDB_NAME, else the output folder's name)")


def check_installed(targets: Sequence[str]) -> None:
    """ValueError, one line naming the extra, for the first backend that cannot be imported."""
    for name in targets:
        module, package, extra = _NEEDS[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            missing = e.name.split(".")[0] if e.name else package
            if missing != package:          # installed, but something it needs is not
                raise
            raise ValueError(f"--report-to {name}: the '{package}' package is not installed "
                             f"(pip install {package}, or pip install -e \".[{extra}]\")") from None


def backend_name(key: str) -> str:
    """The name a backend shows for a metrics.jsonl key (TRL's, see the module docstring)."""
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    return "train/" + TRL_NAMES.get(key, key)


def backend_metrics(record: dict) -> Dict[str, float]:
    """A metrics.jsonl record's numbers under the backends' names (its step excluded)."""
    return {backend_name(k): float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Reporter:
    """Writes each record to metrics.jsonl and to the backends. ``writes``: False on
    the ranks other than 0, which then write nothing anywhere. A backend that fails
    to write is turned off with one warning (``log``), never the run: metrics.jsonl
    still holds every record, and its own failures (a full disk) stop the run as before."""

    def __init__(self, output_dir: Path, backends: Sequence = (), writes: bool = True,
                 log: Callable[[str], None] = print):
        self.output_dir, self.backends, self.writes = Path(output_dir), list(backends), writes
        self.log_line = log
        self._live: list = []           # the backends open now

    @contextmanager
    def session(self, step: int) -> Iterator["Reporter"]:
        """The backends open cut back to ``step`` (the run's position after a resume)
        and close when training ends, with its outcome (W&B marks a run that raised
        as failed)."""
        self.open(step)
        try:
            yield self
        except BaseException:
            self.close(failed=True)
            raise
        self.close(failed=False)

    def kept_rows(self, step: int) -> Dict[int, Dict[str, float]]:
        """step -> metrics (backends' names; a step's train and eval records together) of
        metrics.jsonl's records up to ``step``: what each backend holds when it opens."""
        rows: Dict[int, Dict[str, float]] = {}
        for record in read_metrics(self.output_dir):
            if 0 < record.get("step", 0) <= step:
                rows.setdefault(record["step"], {}).update(backend_metrics(record))
        return dict(sorted(rows.items()))

    def open(self, step: int) -> None:
        """Open every backend at ``step``; ReportError (naming it) when one cannot start."""
        if not self.writes or not self.backends:
            return
        kept = self.kept_rows(step)
        for backend in self.backends:
            try:
                backend.open(step, kept)
            except Exception as e:
                self.close(failed=True)
                raise ReportError(f"{backend.name}: {e}") from e
            self._live.append(backend)

    def log(self, record: dict) -> None:
        if not self.writes:
            return
        append_metrics(self.output_dir, record)
        metrics = backend_metrics(record)
        for backend in list(self._live):
            try:
                backend.log(record["step"], metrics)
            except Exception as e:
                self._live.remove(backend)
                self.log_line(f"warning: --report-to {backend.name}: writing failed ({type(e).__name__}: "
                              f"{e}); it is off for the rest of this run, metrics.jsonl holds every record")
                self._close(backend, failed=True)

    def close(self, failed: bool = False) -> None:
        live, self._live = self._live, []
        for backend in live:
            self._close(backend, failed)

    def _close(self, backend, failed: bool) -> None:
        try:
            backend.close(failed)
        except Exception as e:      # the run's outcome stands; say what was not finished
            self.log_line(f"warning: --report-to {backend.name}: closing failed ({type(e).__name__}: {e})")

def report_backends(report_to: Sequence[str], output_dir: Path, config, *,
                    wandb_project: Optional[str] = None, run_name: Optional[str] = None) -> list:
    """The backends ``report_to`` names (rank 0's), not yet open; W&B's config is
    the run's TrainConfig (``config``), its settings included."""
    from dataclasses import asdict
    backends = []
    if "tensorboard" in report_to:
        from anita_core.train.report_tensorboard import TensorBoardLog
        backends.append(TensorBoardLog(output_dir))
    if "wandb" in report_to:
        from anita_core.train.report_wandb import WandbRun
        backends.append(WandbRun(output_dir, project=wandb_project, run_name=run_name,
                                 config=asdict(config)))
    return backends
