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

Bounds: a template is code from the model folder, so one rendering is bounded: at
most MAX_RENDER_SECONDS of wall time (checked at every piece of output, call,
attribute, item and filter), MAX_RENDER_CHARS of output, MAX_RANGE_ITEMS items over
all its range() calls, and no `*`, `+`, `**` or filter argument that would build a
value past MAX_RENDER_CHARS (or a power of more than 64 bits). Passing one, or any
error the template raises (a TypeError, a recursion, a division by zero), is a
ChatTemplateError, never the library's own exception. A loop that neither writes,
calls, reads an attribute nor uses range() is bounded only by the data it loops over.

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

import functools
import json
import re
import time
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
MAX_RENDER_SECONDS = 10.0     # a conversation renders in milliseconds
MAX_RENDER_CHARS = 64 * 2**20   # twice the longest data line table.py reads
MAX_RANGE_ITEMS = 1_000_000
_SURROGATE = re.compile("[\ud800-\udfff]")


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


class _Budget:
    """What the rendering in progress may still spend (module docstring: Bounds)."""

    def __init__(self):
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS
        self.chars = MAX_RENDER_CHARS
        self.range_items = MAX_RANGE_ITEMS


_BUDGET: ContextVar = ContextVar("anita_render_budget", default=None)


def _over(what: str) -> jinja2.exceptions.SecurityError:
    return jinja2.exceptions.SecurityError(f"the rendering {what}")


def _tick(chars: int = 0, range_items: int = 0) -> None:
    budget = _BUDGET.get()
    if budget is None:
        return
    if time.monotonic() > budget.deadline:
        raise _over(f"took more than {MAX_RENDER_SECONDS:g} s")
    budget.chars -= chars
    budget.range_items -= range_items
    if budget.chars < 0:
        raise _over(f"wrote more than {MAX_RENDER_CHARS:,} characters")
    if budget.range_items < 0:
        raise _over(f"asked range() for more than {MAX_RANGE_ITEMS:,} items")


def _too_big(value) -> bool:
    return isinstance(value, (str, list, tuple)) and len(value) > MAX_RENDER_CHARS


def _bounded_range(*args):
    items = range(*args)
    _tick(range_items=len(items))
    return items


def _bounded_filter(f):
    """``f`` refusing a number argument or a result past MAX_RENDER_CHARS."""
    @functools.wraps(f)
    def bounded(*args, **kwargs):
        _tick()
        for arg in (*args[1:], *kwargs.values()):
            if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_RENDER_CHARS:
                raise _over(f"gave a filter the argument {arg:,}")
        result = f(*args, **kwargs)
        if _too_big(result):
            raise _over(f"made a value of more than {MAX_RENDER_CHARS:,} items")
        return result
    return bounded


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with the rendering's budget checked at each operation it intercepts."""
    intercepted_binops = frozenset(["*", "+", "**"])

    def call_binop(self, context, operator, left, right):
        _tick()
        sizes = [len(v) for v in (left, right) if isinstance(v, (str, list, tuple))]
        numbers = [v for v in (left, right) if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if operator == "*" and sizes and numbers and sizes[0] * max(numbers[0], 0) > MAX_RENDER_CHARS:
            raise _over(f"would repeat a value to more than {MAX_RENDER_CHARS:,} items")
        if operator == "+" and len(sizes) == 2 and sum(sizes) > MAX_RENDER_CHARS:
            raise _over(f"would join values into more than {MAX_RENDER_CHARS:,} items")
        if operator == "**" and len(numbers) == 2 and abs(numbers[0]) > 1 and abs(numbers[1]) > 64:
            raise _over(f"would raise {numbers[0]!r} to the power {numbers[1]!r}")
        return super().call_binop(context, operator, left, right)

    def call(*args, **kwargs):
        _tick()
        return ImmutableSandboxedEnvironment.call(*args, **kwargs)

    def getattr(self, obj, attribute):
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        return super().getitem(obj, argument)


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
    environment = _BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationBlocks, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.filters = {name: _bounded_filter(f) for name, f in environment.filters.items()}
    environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                               namespace=_Namespace, range=_bounded_range)
    try:
        return environment.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {e.lineno}: "
                                f"{e.message})") from None
    except (RecursionError, MemoryError, ValueError) as e:     # a template past the parser's depth
        raise ChatTemplateError(f"the chat template cannot be compiled ({type(e).__name__})") from None


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
    budget = _BUDGET.set(_Budget())
    try:
        for block in template.generate(**variables):
            _tick(chars=len(block))
            blocks.append(block)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from None
    except Exception as e:    # the template's own errors (TypeError, RecursionError, ...), said here
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
    finally:
        _BUDGET.reset(budget)
        _TRACKING.reset(token)
    text = "".join(blocks)
    bad = _SURROGATE.search(text)
    if bad:     # e.g. a "\ud800" literal in the template: no tokenizer encodes it
        raise ChatTemplateError(f"the chat template wrote a lone surrogate U+{ord(bad.group()):04X} "
                                f"at character {bad.start() + 1} (no text UTF-8 can write)")
    return text, spans


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
