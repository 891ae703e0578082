"""A small wrapper around a `tokenizers` tokenizer.json and the
tokenizer_config.json beside it: plain encoding (no automatic BOS/EOS; the
templates write the special tokens as text), the tokenizer's own special
tokens and chat template, and the ids the data pipeline needs.

Any tokenizer loads (LLaMA-3's, SmolLM2's ChatML, a SentencePiece-style
LLaMA-2 / Mistral one, ...); what a template needs of it is checked by
``templates.check_template`` before any data is rendered."""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple

from tokenizers import Tokenizer as _BackendTokenizer

from anita_core.data import templates

# transformers' named special tokens (SPECIAL_TOKENS_ATTRIBUTES): the ones a
# chat template sees as variables.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# a surrogate code point is no character UTF-8 can write: the `tokenizers` library refuses
# a string holding one with a TypeError that names no text; anita says where it is
_SURROGATE = re.compile("[\ud800-\udfff]")


class Tokenizer:
    """``encode`` never adds special tokens by itself; special tokens written in
    the text are recognised as single ids, as in transformers'
    ``encode(text, add_special_tokens=False)``.

    ``special_tokens``: the named special tokens of tokenizer_config.json
    (bos_token, eos_token, pad_token, ...) that the vocabulary holds; without a
    config, LLaMA-3's <|begin_of_text|> / <|eot_id|> when present.
    ``chat_template``: the config's (or chat_template.jinja's) template, or None.

    Ids: ``bos_id`` / ``eos_id`` (the bos_token / eos_token, None when the
    tokenizer has none), ``pad_id`` (the pad token, else
    <|finetune_right_pad_id|>, else eos, else 0: padding is never a target),
    and LLaMA-3's ``start_header_id``, ``end_header_id``, ``end_of_text_id``
    (None when absent).
    """

    def __init__(self, backend: _BackendTokenizer, *, config: Optional[dict] = None,
                 chat_template: Optional[str] = None, name: str = "<tokenizer>",
                 config_name: Optional[str] = None):
        self.backend = backend
        self.name = name
        self.config_name = config_name or os.path.join(os.path.dirname(name), "tokenizer_config.json")
        config = config or {}
        specials: Dict[str, str] = {}
        for key in SPECIAL_TOKEN_NAMES:
            token = _token_content(config.get(key))
            if token is not None and backend.token_to_id(token) is not None:
                specials[key] = token
        if not config:   # no config: LLaMA-3's markers, as the bundled tokenizer's config says
            for key, token in (("bos_token", templates.BEGIN_OF_TEXT), ("eos_token", templates.EOT)):
                if backend.token_to_id(token) is not None:
                    specials[key] = token
        self.special_tokens = specials
        self.chat_template = chat_template
        self.bos_token, self.eos_token = specials.get("bos_token"), specials.get("eos_token")
        self.bos_id = None if self.bos_token is None else backend.token_to_id(self.bos_token)
        self.eos_id = None if self.eos_token is None else backend.token_to_id(self.eos_token)
        self.start_header_id = backend.token_to_id(templates.START_HEADER)
        self.end_header_id = backend.token_to_id(templates.END_HEADER)
        self.end_of_text_id = backend.token_to_id(templates.END_OF_TEXT)
        pad_id = None
        for candidate in (specials.get("pad_token"), templates.PAD):
            if candidate is not None and backend.token_to_id(candidate) is not None:
                pad_id = backend.token_to_id(candidate)
                break
        self.pad_id = pad_id if pad_id is not None else (self.eos_id if self.eos_id is not None else 0)

    def has_token(self, token: str) -> bool:
        """Whether ``token`` is a single id (an added or special token)."""
        return self.backend.token_to_id(token) is not None

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding rows needed)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        return self._encode_batch([text], False)[0].ids

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = False) -> List[List[int]]:
        """``add_special_tokens``: let tokenizer.json's post-processor add its tokens (BOS...)."""
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens)]

    def encode_batch_with_offsets(self, texts: Iterable[str],
                                  ) -> List[Tuple[List[int], List[Tuple[int, int]]]]:
        """(ids, (start, end) character span of each token) per text."""
        return [(e.ids, e.offsets) for e in self._encode_batch(list(texts), False)]

    def _encode_batch(self, texts: List[str], add_special_tokens: bool):
        """The library's encodings; a text it refuses is a ValueError saying which and why
        (a text holding a surrogate, e.g. a lone JSON escape "\\ud800", or not a string)."""
        try:
            return self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        except Exception as e:      # `tokenizers` raises TypeError / its own Exception
            for index, text in enumerate(texts):
                if not isinstance(text, str):
                    raise ValueError(f"text {index + 1} of {len(texts)} is a {type(text).__name__}, "
                                     "not a string") from None
                bad = _SURROGATE.search(text)
                if bad:
                    raise ValueError(f"text {index + 1} of {len(texts)} holds a lone surrogate "
                                     f"U+{ord(bad.group()):04X} at character {bad.start() + 1} "
                                     "(no character UTF-8 can write)") from None
            raise ValueError(f"{self.name}: the tokenizer failed: {type(e).__name__}: {e}") from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id}, "
                f"chat_template={'yes' if self.chat_template else 'no'})")


def _token_content(value) -> Optional[str]:
    """tokenizer_config.json writes a token either as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_of(config: dict, folder: str, config_file: str) -> Optional[str]:
    """The chat template as transformers finds it: chat_template.jinja beside the
    config wins; else the config's chat_template, a string or a list of
    {name, template} of which the one named "default" is used."""
    jinja_file = os.path.join(folder, CHAT_TEMPLATE_FILE)
    if os.path.isfile(jinja_file):
        with open(jinja_file, "rb") as f:
            raw = f.read()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{jinja_file}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value
                 if isinstance(t, dict) and isinstance(t.get("name"), str)}
        template = named.get("default")
        if template is None or isinstance(template, str):
            return template
        raise ValueError(f"{config_file}: chat_template 'default' must be a string, got "
                         f"{type(template).__name__}")
    raise ValueError(f"{config_file}: chat_template must be a string or a list of "
                     f"{{name, template}}, got {type(value).__name__}")


def load_tokenizer(path: str) -> Tokenizer:
    """Loads ``path/tokenizer.json`` (a folder, e.g. a model folder, or the
    tokenizer.json file itself; the bundled tokenizer is the folder
    anita_core.assets.TOKENIZER_DIR, which the command line picks for a model
    folder without one). Special tokens and the chat template come from
    tokenizer_config.json (and chat_template.jinja) next to it when present."""
    path = os.fspath(path)
    folder, file = (os.path.dirname(path), path) if path.endswith(".json") else (
        path, os.path.join(path, "tokenizer.json"))
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json at {file!r} (pass a model folder holding a "
                                f"tokenizer.json, or the file itself)")
    try:
        backend = _BackendTokenizer.from_file(file)
    except Exception as e:          # `tokenizers` raises a bare Exception (serde's message)
        reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file}: not a tokenizer the `tokenizers` library reads ({reason})") from None
    config: dict = {}
    config_file = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_file):
        try:
            with open(config_file, "rb") as f:
                config = json.loads(f.read().decode("utf-8"))
        except RecursionError:
            raise ValueError(f"{config_file}: not valid JSON (nested too deeply)") from None
        except ValueError as e:     # not JSON, not UTF-8, or an integer past 4,300 digits
            raise ValueError(f"{config_file}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    return Tokenizer(backend, config=config, chat_template=_chat_template_of(config, folder, config_file),
                     name=file, config_name=config_file)
