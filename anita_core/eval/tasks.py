"""lm-eval tasks for eval.py: names checked against lm-eval's task index (and local
task YAMLs) before any model loads, the paper's preset, and each task built (its
dataset read) up front so a missing dataset is one line naming it.

Preset ``anita``: the Open Italian LLM Leaderboard tasks the LLaMAntino-3-ANITA
paper reports, with its few-shot counts: arc_it and hellaswag_it 0-shot,
m_mmlu_it 5-shot (lm-eval's okapi multilingual tasks).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

PRESETS: Dict[str, Dict[str, int]] = {
    "anita": {"arc_it": 0, "hellaswag_it": 0, "m_mmlu_it": 5},
}
LIST_TASKS_HINT = ("list the available ones with `lm-eval ls tasks` (local task YAMLs: "
                   "`lm-eval ls tasks --include_path DIR`, here --include-path DIR)")


class TaskError(ValueError):
    """A task name that does not exist, or a task whose dataset cannot be read."""


def task_manager(names: Sequence[str], include_path: Optional[Sequence[str]] = None,
                 builtin: bool = True):
    """lm-eval's TaskManager for ``names``: the local folders alone when they hold every
    name (or ``builtin`` is False), else lm-eval's built-in tasks too. Indexing the
    ~14,700 built-in task YAMLs takes lm-eval tens of seconds, so it is skipped when
    it is not needed."""
    from lm_eval.tasks import TaskManager
    paths = list(include_path) if include_path else None
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if not builtin or all(name in local.all_tasks for name in names):
            return local
    return TaskManager(include_path=paths)


def check_names(manager, names: Sequence[str]) -> None:
    """TaskError naming the first unknown task and how to list the known ones."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            raise TaskError(f"unknown task {name!r}; {LIST_TASKS_HINT}")


def dataset_of(manager, name: str) -> str:
    """"path (name)" of a task's dataset as its YAML states it, for messages."""
    entry = manager.task_index.get(name)
    cfg = (entry.cfg or {}) if entry is not None else {}
    path, subset = cfg.get("dataset_path"), cfg.get("dataset_name")
    if not path:
        return "its dataset"
    return f"dataset {path}" + (f" ({subset})" if subset else "")


def build_tasks(manager, names: Sequence[str]) -> dict:
    """lm-eval's task dict for ``names``, each built now (datasets read); TaskError
    naming the task and its dataset when one cannot be read (offline, for a hub one)."""
    from lm_eval.tasks import get_task_dict
    tasks = {}
    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    for name in names:
        quiet.setLevel(logging.CRITICAL)    # lm-eval logs the same failure at length
        try:
            tasks.update(get_task_dict([name], manager))
        except Exception as e:              # datasets raises many types: offline, missing file...
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TaskError(f"task {name!r}: {dataset_of(manager, name)} could not be loaded "
                            f"(offline, or not on the hub?): {type(e).__name__}: {reason}") from None
        finally:
            quiet.setLevel(level)
    return tasks


def requested(tasks: Optional[List[str]], preset: Optional[str],
              num_fewshot: Optional[int]) -> Dict[str, Optional[int]]:
    """task -> few-shot count (None: the task's own default)."""
    if preset is not None:
        chosen = dict(PRESETS[preset])
        if num_fewshot is not None:
            chosen = {t: num_fewshot for t in chosen}
        return chosen
    return {t: num_fewshot for t in tasks or []}
