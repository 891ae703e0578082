"""The memory flags of train_sft.py / train_dpo.py, and the MemoryRequest they become
(the budgets and the plan themselves: anita_core.memory.budget)."""
from __future__ import annotations

from anita_core.memory.budget import HOST_BUDGET_ENV, host_budget_from_env
from anita_core.memory.planner import STRATEGIES
from anita_core.cli.flag_types import positive_float


def add_memory_arguments(g) -> None:
    """The memory flags of train_sft.py / train_dpo.py, in argument group ``g``."""
    g.add_argument("--offload-activations", action="store_true",
                   help="keep each block's input in (pinned) CPU memory between forward and backward "
                        "(same as --recompute offload)")
    g.add_argument("--memory-budget", type=positive_float, default=None, metavar="GiB",
                   help="device memory the run may use; the memory planner keeps as many layers' "
                        "activations as fit, recomputes the rest (default: free GPU memory minus a "
                        "margin; on a CPU unlimited: every layer keeps)")
    g.add_argument("--host-memory-budget", type=positive_float, default=None, metavar="GiB",
                   help="pinned host memory the planner may fill with offloaded layer inputs; a plan "
                        f"needing more is refused, --recompute offload recomputes the layers beyond "
                        f"it (default: ${HOST_BUDGET_ENV} if set, else on a GPU the machine's "
                        "available memory minus max(4 GiB, 10%%); on a CPU unlimited)")
    g.add_argument("--recompute", default="auto", choices=("auto",) + STRATEGIES,
                   help="per-layer activation strategy: auto (the planner), or one for every layer")


def check_memory_environment(parser) -> None:
    """A malformed ANITA_HOST_MEMORY_BUDGET is a usage error before anything loads."""
    try:
        host_budget_from_env()
    except ValueError as e:
        parser.error(str(e))
