"""Bundled defaults written for the project: the byte-level BPE tokenizer
(``tokenizer/``), the small Italian/English sample datasets (``data/``) and the
scripts that rebuild both from the hand-written text in ``sample_text.py``."""
from __future__ import annotations

import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(ASSETS_DIR, "tokenizer")
DATA_DIR = os.path.join(ASSETS_DIR, "data")

# file name of each bundled sample dataset, keyed by the row shape it holds
SAMPLE_FILES = {
    "instruction": "instruction.jsonl",     # {system, instruction, input, output}
    "chat": "chat.jsonl",                   # {messages: [{role, content}, ...]}
    "text": "text_it.jsonl",                # {text}, Italian, for language adaptation
    "dpo": "dpo_pairs.jsonl",               # {prompt, chosen, rejected, source} strings
    "dpo_messages": "dpo_messages.jsonl",   # {source, prompt, chosen: [msgs], rejected: [msgs]}
}


def sample_path(shape: str) -> str:
    """Absolute path of the bundled sample dataset for ``shape``."""
    if shape not in SAMPLE_FILES:
        raise ValueError(f"unknown sample dataset {shape!r}; expected one of {sorted(SAMPLE_FILES)}")
    return os.path.join(DATA_DIR, SAMPLE_FILES[shape])
