"""Row shapes, their detection, and their validation.

Each ``check_*`` function takes one raw row (a dict as read from a file) and
returns it normalized, or raises RowProblem saying what is wrong; the loader
adds the file and row number (BadRowError). ``None`` is how `datasets` writes a
field missing from one row of a file, so None counts as missing.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

from anita_core.data.templates import ROLES

SFT_SHAPES = ("instruction", "chat", "text")
SHAPES = SFT_SHAPES + ("dpo",)


class RowProblem(ValueError):
    """What is wrong with a row (no location yet)."""


class BadRowError(ValueError):
    """A malformed row, with the file (or dataset name) and the 1-based row
    number: the record's index in the file (for JSON lines, its line number
    when the file has no blank lines; for CSV, the header is not counted)."""

    def __init__(self, source: str, row_number: int, problem: str):
        super().__init__(f"{source}: row {row_number}: {problem}")
        self.source = source
        self.row_number = row_number
        self.problem = problem


def detect_shape(columns: Iterable[str], source: str = "<data>") -> str:
    """Row shape from a dataset's column names."""
    columns = set(columns)
    if "messages" in columns:
        return "chat"
    if {"chosen", "rejected"} <= columns:
        return "dpo"
    if {"instruction", "output"} <= columns:
        return "instruction"
    if "text" in columns:
        return "text"
    raise ValueError(
        f"{source}: cannot tell the row shape from the columns {sorted(columns)}; expected "
        f"'messages' (chat), 'instruction'+'output' (instruction), 'text' (raw text) or "
        f"'chosen'+'rejected' (DPO pairs)")


def _required_text(row: Dict[str, Any], field: str, *, what: str = "") -> str:
    if field not in row or row[field] is None:
        raise RowProblem(f"missing field '{field}'")
    value = row[field]
    if not isinstance(value, str):
        raise RowProblem(f"field '{field}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowProblem(f"field '{field}' is empty{what}")
    return value


def _optional_text(row: Dict[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowProblem(f"field '{field}' must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, field: str) -> List[Dict[str, str]]:
    if value is None:
        raise RowProblem(f"missing field '{field}'")
    if not isinstance(value, list):
        raise RowProblem(f"field '{field}' must be a list of messages, got {type(value).__name__}")
    if not value:
        raise RowProblem(f"field '{field}' is an empty list of messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowProblem(f"{field}[{i}] must be a {{role, content}} object, "
                             f"got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowProblem(f"{field}[{i}]: role must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise RowProblem(f"{field}[{i}]: content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def check_instruction_row(row: Dict[str, Any]) -> Dict[str, str]:
    """{system?, instruction, input?, output}: instruction and output non-empty."""
    return {"system": _optional_text(row, "system"),
            "instruction": _required_text(row, "instruction"),
            "input": _optional_text(row, "input"),
            "output": _required_text(row, "output", what=" (empty answer)")}


def check_chat_row(row: Dict[str, Any]) -> Dict[str, List[Dict[str, str]]]:
    """{messages: [{role, content}, ...]} with at least one non-empty assistant turn."""
    messages = _messages(row.get("messages"), "messages")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RowProblem("no non-empty assistant message (empty answer)")
    return {"messages": messages}


def check_text_row(row: Dict[str, Any]) -> Dict[str, str]:
    return {"text": _required_text(row, "text")}


def _answer(messages: List[Dict[str, str]], field: str) -> str:
    last = messages[-1]
    if last["role"] != "assistant":
        raise RowProblem(f"the last message of '{field}' must be the assistant's answer, "
                         f"got role {last['role']!r}")
    if not last["content"].strip():
        raise RowProblem(f"the answer in '{field}' is empty")
    return last["content"]


def source_of(row: Dict[str, Any]) -> Optional[str]:
    source = row.get("source")
    if source is not None and not isinstance(source, str):
        raise RowProblem(f"field 'source' must be a string, got {type(source).__name__}")
    return source


def check_dpo_row(row: Dict[str, Any]) -> Dict[str, Any]:
    """A preference pair, normalized to {prompt: [messages], chosen: str,
    rejected: str, source}.

    - strings: prompt, chosen, rejected all text; the prompt becomes one user turn;
    - message lists: chosen and rejected end with the assistant's answer and
      share the messages before it, which are the prompt (orpo-dpo-mix-40k's
      shape, where a 'prompt' string column, if any, is ignored); a 'prompt'
      that is itself a message list is prepended (TRL's explicit-prompt shape).
    """
    source = source_of(row)
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, list) or isinstance(rejected, list):
        chosen_messages = _messages(chosen, "chosen")
        rejected_messages = _messages(rejected, "rejected")
        chosen_answer = _answer(chosen_messages, "chosen")
        rejected_answer = _answer(rejected_messages, "rejected")
        if chosen_messages[:-1] != rejected_messages[:-1]:
            raise RowProblem("'chosen' and 'rejected' differ before their last message "
                             "(they must share the prompt)")
        prompt = chosen_messages[:-1]
        if isinstance(row.get("prompt"), list):
            prompt = _messages(row["prompt"], "prompt") + prompt
        if not prompt:
            raise RowProblem("no prompt: 'chosen' holds only the answer and there is no "
                             "'prompt' message list")
        return {"prompt": prompt, "chosen": chosen_answer, "rejected": rejected_answer,
                "source": source}
    prompt = _required_text(row, "prompt")
    return {"prompt": [{"role": "user", "content": prompt}],
            "chosen": _required_text(row, "chosen", what=" (empty answer)"),
            "rejected": _required_text(row, "rejected", what=" (empty answer)"),
            "source": source}


CHECKS = {
    "instruction": check_instruction_row,
    "chat": check_chat_row,
    "text": check_text_row,
    "dpo": check_dpo_row,
}
