"""Every environment variable the trainers read, read here and nowhere else in
anita_core.train / recipes / cli / eval (each function reads it when called, so a
test or a launcher that sets one later is seen):

    ANITA_RUNS_DIR            where default output folders go (default: ./runs)
    WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
                              torchrun's process group (anita_core.train.distributed)
    ANITA_STOP_AT             the tests' stop points (anita_core.train.stop_points)
    WANDB_PROJECT, WANDB_NAME, WANDB_DIR
                              W&B's own variables, honoured by --report-to wandb

Read elsewhere, by their layers' own modules: ANITA_BACKEND (anita_core.model.ops),
ANITA_HOST_MEMORY_BUDGET (the memory budget), the Triton mode and tuning variables
(csrc_triton), and ANITA_STOP_AT once more by script_entry.py, before torch imports."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

RUNS_DIR_ENV = "ANITA_RUNS_DIR"
STOP_AT_ENV = "ANITA_STOP_AT"


def runs_dir() -> str:
    return os.environ.get(RUNS_DIR_ENV) or "runs"


def world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset or empty); not validated here."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def process_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def stop_at() -> Optional[str]:
    return os.environ.get(STOP_AT_ENV)


@dataclass(frozen=True)
class TorchrunEnv:
    """torchrun's variables as strings (None when unset): checked by the caller, which
    names the bad one."""
    rank: Optional[str]
    world_size: Optional[str]
    local_rank: Optional[str]
    master_addr: Optional[str]
    master_port: Optional[str]


def torchrun() -> TorchrunEnv:
    get = os.environ.get
    return TorchrunEnv(get("RANK"), get("WORLD_SIZE"), get("LOCAL_RANK"), get("MASTER_ADDR"),
                       get("MASTER_PORT"))


@dataclass(frozen=True)
class WandbEnv:
    project: Optional[str]
    name: Optional[str]
    dir: Optional[str]


def wandb() -> WandbEnv:
    return WandbEnv(os.environ.get("WANDB_PROJECT") or None, os.environ.get("WANDB_NAME") or None,
                    os.environ.get("WANDB_DIR") or None)
