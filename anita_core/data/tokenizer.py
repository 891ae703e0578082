"""A small wrapper around a `tokenizers` tokenizer.json with LLaMA-3's special
tokens: plain encoding (no automatic BOS/EOS; the templates write the special
tokens as text), and the ids the data pipeline needs."""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional

from tokenizers import Tokenizer as _BackendTokenizer

from anita_core.data import templates


def default_tokenizer_dir() -> str:
    from anita_core.assets import TOKENIZER_DIR
    return TOKENIZER_DIR


class Tokenizer:
    """``encode`` never adds special tokens by itself; special tokens written in
    the text (``<|eot_id|>`` ...) are recognised as single ids, as in
    transformers' ``encode(text, add_special_tokens=False)``.

    Ids: ``bos_id`` = <|begin_of_text|>, ``eos_id`` = <|eot_id|> (the end of a
    chat turn and of every training document), ``end_of_text_id``,
    ``pad_id`` (the config's pad token, else <|finetune_right_pad_id|>, else eos),
    ``start_header_id``, ``end_header_id``.
    """

    def __init__(self, backend: _BackendTokenizer, *, pad_token: Optional[str] = None,
                 name: str = "<tokenizer>"):
        self.backend = backend
        self.name = name
        self.bos_id = self._required_id(templates.BEGIN_OF_TEXT)
        self.eos_id = self._required_id(templates.EOT)
        self.start_header_id = self._required_id(templates.START_HEADER)
        self.end_header_id = self._required_id(templates.END_HEADER)
        self.end_of_text_id = backend.token_to_id(templates.END_OF_TEXT)
        pad_id = None
        for candidate in (pad_token, templates.PAD):
            if candidate is not None and backend.token_to_id(candidate) is not None:
                pad_id = backend.token_to_id(candidate)
                break
        self.pad_id = self.eos_id if pad_id is None else pad_id

    def _required_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.name}: the tokenizer has no {token} token; the LLaMA-3 "
                             f"templates need <|begin_of_text|>, <|start_header_id|>, "
                             f"<|end_header_id|> and <|eot_id|>")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding rows needed)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> List[List[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id})")


def _token_content(value) -> Optional[str]:
    """tokenizer_config.json writes a token either as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_tokenizer(path: Optional[str] = None) -> Tokenizer:
    """Loads ``path/tokenizer.json`` (a folder, e.g. a model folder, or the
    tokenizer.json file itself); the bundled tokenizer when ``path`` is None.
    The pad token is taken from tokenizer_config.json next to it when present."""
    path = default_tokenizer_dir() if path is None else os.fspath(path)
    folder, file = (os.path.dirname(path), path) if path.endswith(".json") else (
        path, os.path.join(path, "tokenizer.json"))
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json at {file!r} (pass a model folder holding a "
                                f"tokenizer.json, or the file itself)")
    backend = _BackendTokenizer.from_file(file)
    pad_token = None
    config_file = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            pad_token = _token_content(json.load(f).get("pad_token"))
    return Tokenizer(backend, pad_token=pad_token, name=file)
