"""The option groups every recipe's config is made of (run folder and model,
LoRA, optimization, data, memory, reporting, distributed). A preset is a config
value built from these; the flags override its fields."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

from anita_core.cli.common import BUNDLED_MODEL
from anita_core.memory.budget import MemoryRequest
from anita_core.model.weights import PROJECTIONS

ALL_PROJECTIONS = ",".join(PROJECTIONS)


@dataclass(frozen=True)
class LoRAOptions:
    r: int = 16
    alpha: float = 8.0
    dropout: float = 0.0                    # anita's choice: no LoRA dropout
    use_rslora: bool = False
    target_modules: str = ALL_PROJECTIONS   # comma-separated, as --target-modules

    def targets(self) -> Tuple[str, ...]:
        return tuple(t.strip() for t in self.target_modules.split(",") if t.strip())


@dataclass(frozen=True)
class OptimOptions:
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    optimizer: str = "paged_adamw_8bit"     # adamw | paged_adamw_8bit
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    batch_size: int = 1                     # rows (SFT) or pairs (DPO) per micro-batch
    gradient_accumulation_steps: int = 8
    max_grad_norm: float = 1.0              # anita's choice; 0: off
    num_epochs: float = 1.0
    max_steps: int = -1                     # -1: off (epochs decide)
    logging_steps: int = 1
    eval_steps: int = 0                     # 0: at the end
    save_steps: int = 0
    save_minutes: float = 30.0              # anita's choice: a checkpoint every 30 min of wall time
    save_total_limit: int = 2


@dataclass(frozen=True)
class ReportOptions:
    report_to: Tuple[str, ...] = ()
    wandb_project: Optional[str] = None
    run_name: Optional[str] = None


@dataclass(frozen=True)
class DistributedOptions:
    sharded_base: bool = False
    collective_timeout: float = 600.0


@dataclass(frozen=True)
class RunOptions:
    """Where the run reads and writes, and how it computes."""
    model: str = BUNDLED_MODEL
    tokenizer: Optional[str] = None
    output_dir: Optional[str] = None        # None: runs/<script>-<preset>
    resume: Optional[str] = None            # a checkpoint folder, or "latest"
    overwrite: bool = False
    init_adapter: Optional[str] = None
    merge_export: Optional[str] = None
    dtype: str = "auto"
    seed: int = 42
    progress: bool = True
    memory: MemoryRequest = field(default_factory=MemoryRequest)     # the memory flags
    report: ReportOptions = field(default_factory=ReportOptions)
    distributed: DistributedOptions = field(default_factory=DistributedOptions)


@dataclass(frozen=True)
class DataOptions:
    """What both stages' data builders share."""
    files: Tuple[str, ...] = ()             # file(s), folder(s) or hub name(s)
    max_samples: Optional[int] = None
    eval_split: Union[int, float] = 0       # a count (>= 1) or a fraction (< 1)
    skip_bad_rows: bool = False
    system_prompt: Optional[str] = None
