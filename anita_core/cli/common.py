"""Flags and error handling every command shares (train_sft.py, train_dpo.py,
eval.py, chat.py): threads, tokenizer, compute dtype, the default output folder,
and the one-line error with exit code 2. Nothing here imports the trainer."""
from __future__ import annotations

import os
import sys
from typing import NoReturn, Optional

from anita_core.assets import ASSETS_DIR
from anita_core.cli import environment
from anita_core.cli.flag_types import int_between, one_line, printable

EXIT_BAD_INPUT = 2          # bad flag, file, row or output folder (argparse's code too)
EXIT_DIVERGED = 3           # a non-finite loss, gradient, weight or eval metric
EXIT_RANK_FAILED = 4        # another rank died, or a collective timed out
EXIT_DISK_FULL = 5          # a write met a full disk or quota; --resume once there is space
#                             (the same value as anita_core.train.storage_faults.EXIT_DISK_FULL)

BUNDLED_MODEL = os.path.join(ASSETS_DIR, "tiny-llama3")
RUNS_DIR_ENV = environment.RUNS_DIR_ENV     # where default output folders go (default: ./runs)
MAX_THREADS = 1024          # --threads: torch starts that many threads at its next parallel op


def add_tokenizer_argument(group) -> None:
    """--tokenizer: the trainers and chat.py; without it the model folder's own."""
    group.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="the model's tokenizer: a folder holding its tokenizer.json (and "
                            "tokenizer_config.json), or the file itself; default: the --model "
                            "folder's, which is then required")


def add_threads_argument(group) -> None:
    """--threads N: torch.set_num_threads, for the trainers, chat.py and eval.py."""
    group.add_argument("--threads", type=int_between(1, MAX_THREADS), default=None, metavar="N",
                       help="CPU threads torch computes with (torch.set_num_threads; default: "
                            "torch's, one per core). On a CPU shared with other jobs, 1 avoids "
                            "threads waiting for each other's descheduled peers")


def apply_threads(threads: Optional[int]) -> None:
    """--threads' value (None: torch's default)."""
    if threads:
        import torch
        torch.set_num_threads(threads)


def check_model_flag(parser, model: str) -> None:
    """--model is a local folder or a hub name ("owner/name"); anything else stops here
    with argparse's one-line error (exit 2), before the output folder is touched."""
    if os.path.isdir(model):
        return
    if os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") != 1:
        parser.error(f"argument --model: {model}: no such model directory (and not a hub "
                     "name owner/name)")


def default_output_dir(name: str) -> str:
    """runs/<name>, or $ANITA_RUNS_DIR/<name> (the tests point it at a folder of their own,
    so a suite never writes into, nor reads, a user's runs/)."""
    return os.path.join(environment.runs_dir(), name)


def compute_dtype(name: str):
    """--dtype's torch dtype: auto is bf16 on a GPU, fp32 on the CPU."""
    import torch
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name == "bf16":
        import csrc_triton
        if csrc_triton.INTERPRETING:
            log_to_stderr("warning: --dtype bf16 under the Triton interpreter: its fp32 -> bf16 "
                          "stores truncate instead of rounding, so results differ from a GPU's; "
                          "use fp32 (or fp16) on a CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def usage_error(message: str) -> NoReturn:
    """One line on stderr, exit code 2."""
    log_to_stderr(f"error: {one_line(message)}")
    raise SystemExit(EXIT_BAD_INPUT)


def log_to_stderr(message: str) -> None:
    print(printable(message), file=sys.stderr, flush=True)
