"""A tokenizer's own chat template (Jinja, from tokenizer_config.json), rendered
as transformers' apply_chat_template renders it, and the assistant answers'
character spans in the rendered text, for answer-only loss.

Rendering: a sandboxed Jinja environment (ImmutableSandboxedEnvironment,
trim_blocks, lstrip_blocks, the loop-control extension), with the variables and
helpers transformers gives a template: ``messages``, ``add_generation_prompt``,
the named special tokens (``bos_token``, ``eos_token``, ...), ``tools`` and
``documents`` (None), ``raise_exception``, ``strftime_now``, a ``tojson``
filter that does not escape HTML, and a ``namespace`` that refuses names
starting with "_". transformers itself is not needed.

Answer spans:
- a template that marks answers with ``{% generation %} ... {% endgeneration %}``:
  the text each block produced (what transformers' return_assistant_tokens_mask
  marks);
- any other template: for the assistant message i, the text that rendering
  messages[:i + 1] adds to rendering messages[:i] with the generation prompt,
  cut after the first eos_token that follows the answer's text (the
  end-of-turn token is learned; what the template writes after it, e.g.
  ChatML's newline, is context). The two renderings must be prefixes of the
  whole conversation's text and the span must hold the (stripped) answer; a
  template for which this fails (one that rewrites earlier turns, or the
  answers themselves) is refused.
"""
from __future__ import annotations

import json
import re
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

GENERATION_TAG = re.compile(r"\{%[-+]?\s*generation\s*[-+]?%\}")
Span = Tuple[int, int]        # [start, end) character offsets in the rendered text


class ChatTemplateError(ValueError):
    """The chat template failed on, or cannot mark the answers of, a conversation."""


# The (rendered blocks so far, spans) of the render in progress, when spans are wanted.
_TRACKING: ContextVar = ContextVar("anita_generation_spans", default=None)


class _GenerationBlocks(jinja2.ext.Extension):
    """``{% generation %}body{% endgeneration %}``: outputs the body and, while a
    tracked render is running, records where its text lands in the output."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

    def _record(self, caller):
        text = caller()
        tracking = _TRACKING.get()
        if tracking is not None:
            blocks, spans = tracking
            # the block's output is emitted as one piece after everything rendered before it
            start = sum(len(b) for b in blocks)
            spans.append((start, start + len(text)))
        return text


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace without underscore-prefixed attributes (no reach into
    Python internals from an untrusted template)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace "
                                                  f"attribute {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationBlocks, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                               namespace=_Namespace)
    try:
        return environment.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {e.lineno}: "
                                f"{e.message})") from None


def has_generation_blocks(source: str) -> bool:
    return GENERATION_TAG.search(source) is not None


def render(source: str, messages: Sequence[Mapping[str, str]], special_tokens: Mapping[str, str],
           *, add_generation_prompt: bool = False, track_spans: bool = False,
           ) -> Tuple[str, List[Span]]:
    """(rendered text, spans of the {% generation %} blocks, empty unless
    ``track_spans``)."""
    template = compile_template(source)
    variables = dict(special_tokens)
    variables.update(messages=[dict(m) for m in messages], tools=None, documents=None,
                     add_generation_prompt=add_generation_prompt)
    blocks: List[str] = []
    spans: List[Span] = []
    token = _TRACKING.set((blocks, spans) if track_spans else None)
    try:
        for block in template.generate(**variables):
            blocks.append(block)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from None
    finally:
        _TRACKING.reset(token)
    return "".join(blocks), spans


def answer_spans(source: str, messages: Sequence[Dict[str, str]],
                 special_tokens: Mapping[str, str]) -> Tuple[str, List[Span]]:
    """(the conversation rendered, the assistant answers' non-empty spans in it);
    the rule is in the module docstring. Raises ChatTemplateError when the
    template fails or rewrites earlier turns."""
    if has_generation_blocks(source):
        text, spans = render(source, messages, special_tokens, track_spans=True)
        return text, [s for s in spans if s[1] > s[0]]
    text, _ = render(source, messages, special_tokens)
    eos = special_tokens.get("eos_token")
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, _ = render(source, messages[:i], special_tokens, add_generation_prompt=True)
        through, _ = render(source, messages[:i + 1], special_tokens)
        if not (through.startswith(before) and text.startswith(through)):
            raise ChatTemplateError(
                f"the chat template renders message {i} (assistant) differently depending on what "
                "follows it, so its answer span cannot be found; use a template with "
                "{% generation %} blocks, or --train-on-all-tokens")
        start, end = len(before), len(through)
        if end == start:          # the template writes nothing for this answer
            continue
        content = message["content"].strip()
        at = text.find(content, start, end)
        if at < 0:
            raise ChatTemplateError(
                f"the chat template does not write the answer of message {i} (assistant) as "
                "given, so its answer span cannot be found; use a template with "
                "{% generation %} blocks, or --train-on-all-tokens")
        cut = text.find(eos, at + len(content), end) if eos else -1
        if cut >= 0:
            end = cut + len(eos)
        spans.append((start, end))
    return text, spans
