"""The SFT data's own stages: render (validated rows -> segments), tokenize
(segments -> ids and answer flags), document (ids -> Documents, truncated or
dropped, counted), and the seeded train / held-out split. The whole row of
stages, read to pack, is pipeline.py."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

from anita_core.data import templates
from anita_core.data.chat_template import ChatTemplateError
from anita_core.data.documents import Document, encode_segments, make_document
from anita_core.data.packing import shuffled
from anita_core.data.rows import SFT_SHAPES, BadRowError
from anita_core.data.stats import DataStats
from anita_core.data.tokenizer import Tokenizer

T = TypeVar("T")


@dataclass
class SFTDataConfig:
    data: Union[str, Sequence[str]]       # file(s), folder(s) or hub name(s)
    shape: str = "auto"                   # auto | instruction | chat | text
    template: str = "llama3"              # llama3 | alpaca | chat (the tokenizer's own)
    system_prompt: Optional[str] = None   # default system text for rows without one
    max_seq_length: int = 2048
    train_on_all_tokens: bool = False     # default: loss on answer tokens only
    max_samples: Optional[int] = None
    eval_split: Union[int, float] = 0     # count (int >= 1) or fraction (0 < x < 1)
    seed: int = 0
    skip_bad_rows: bool = False
    split: str = "train"                  # hub datasets only
    cache_dir: Optional[str] = None       # `datasets` cache
    progress: bool = False                # progress bars while reading and tokenizing


@dataclass
class SFTData:
    train: List[Document]
    eval: List[Document]
    stats: DataStats = field(default_factory=DataStats)


def row_segments(shape: str, row: Dict[str, Any], *, template: str = "llama3",
                 system_prompt: Optional[str] = None, tokenizer: Optional[Tokenizer] = None,
                 need_answers: bool = True) -> List[templates.Segment]:
    """A validated row rendered into segments. ``tokenizer`` gives the chat
    template (template "chat"), alpaca's markers and raw text's BOS/EOS;
    without it, LLaMA-3's. ``need_answers=False`` (training on all tokens)
    lets a chat template that marks no answer through."""
    if template == "chat" and shape in ("instruction", "chat"):
        if tokenizer is None:
            raise ValueError("template 'chat' renders with a tokenizer's chat template; pass tokenizer")
        messages = row["messages"] if shape == "chat" else templates.instruction_messages(
            row["system"], row["instruction"], row["input"], row["output"])
        return templates.tokenizer_chat_segments(tokenizer, messages, system_prompt,
                                                 need_answers=need_answers)
    if shape == "instruction":
        bos, eos = (templates.BEGIN_OF_TEXT, templates.EOT) if tokenizer is None else (
            templates.instruction_markers(tokenizer))
        return templates.instruction_segments(row, template, system_prompt, bos=bos, eos=eos)
    if shape == "chat":
        return templates.chat_segments(row["messages"], system_prompt)
    if shape == "text":
        if tokenizer is None:
            return templates.raw_text_segments(row["text"])
        return templates.raw_text_segments(row["text"], bos=tokenizer.bos_token, eos=tokenizer.eos_token)
    raise ValueError(f"unknown SFT row shape {shape!r}; expected one of {SFT_SHAPES}")


def eval_count(n: int, eval_split: Union[int, float]) -> int:
    """How many of ``n`` examples go to the held-out split."""
    if isinstance(eval_split, bool) or eval_split < 0:
        raise ValueError(f"eval_split must be a count >= 0 or a fraction in (0, 1), got {eval_split!r}")
    if eval_split == 0:
        return 0
    if isinstance(eval_split, float) and eval_split < 1:
        k = max(1, math.floor(n * eval_split))
    elif float(eval_split).is_integer():
        k = int(eval_split)
    else:
        raise ValueError(f"eval_split must be a count >= 0 or a fraction in (0, 1), got {eval_split!r}")
    if k >= n:
        raise ValueError(f"eval_split={eval_split!r} takes {k} of {n} examples and leaves none "
                         f"to train on")
    return k


def split_train_eval(items: Sequence[T], eval_split: Union[int, float], seed: int,
                     ) -> Tuple[List[T], List[T]]:
    """(train, eval): a seeded shuffle, then the first k items are held out."""
    items = shuffled(items, seed)
    k = eval_count(len(items), eval_split)
    return items[k:], items[:k]


@dataclass(frozen=True)
class RenderOptions:
    """The render stage's options: the template, the default system prompt, whether
    a row must mark answers (not when training on all tokens), and bad rows."""
    template: str = "llama3"
    system_prompt: Optional[str] = None
    need_answers: bool = True
    skip_bad_rows: bool = False
    chunk_rows: int = 2048          # rows rendered (then tokenized) at a time


@dataclass(frozen=True)
class DocumentOptions:
    max_seq_length: Optional[int] = None
    train_on_all_tokens: bool = False


@dataclass
class Chunk:
    """One chunk of rows on its way through the stages: ``rows`` counts the rows it
    came from (skipped bad rows included), ``items`` what the last stage made."""
    rows: int
    items: list


def render_rows(rows: Sequence[Tuple[str, Dict[str, Any]]], tokenizer: Tokenizer,
                options: RenderOptions, stats: DataStats,
                locations: Optional[Sequence[Tuple[str, int]]] = None) -> Iterator[Chunk]:
    """The render stage: validated (shape, row) pairs -> chunks of segment lists,
    ``options.chunk_rows`` rows at a time (only one chunk of text is held at once).
    First, ``templates.check_template`` for every row shape present. A row the chat
    template fails on (or marks no answer in) is a BadRowError named by its
    ``locations`` entry (file, row number; else its index among ``rows``), or with
    ``skip_bad_rows`` skipped and counted."""
    for shape in sorted({shape for shape, _ in rows}):
        templates.check_template(tokenizer, options.template, shape)
    for first in range(0, len(rows), options.chunk_rows):
        rendered = []
        for index in range(first, min(first + options.chunk_rows, len(rows))):
            shape, row = rows[index]
            try:
                rendered.append(row_segments(shape, row, template=options.template,
                                             system_prompt=options.system_prompt, tokenizer=tokenizer,
                                             need_answers=options.need_answers))
            except ChatTemplateError as e:
                source, number = (locations[index] if locations is not None
                                  else ("the rows read", index + 1))
                error = BadRowError(source, number, f"{_preview(shape, row)}: {e}")
                if not options.skip_bad_rows:
                    raise error from None
                stats.note_bad_row(str(error))
        yield Chunk(min(options.chunk_rows, len(rows) - first), rendered)


def tokenize_chunks(chunks: Iterable[Chunk], tokenizer: Tokenizer) -> Iterator[Chunk]:
    """The tokenize stage: each chunk's segment lists -> (token ids, is-answer flags),
    one batch call per chunk (documents.encode_segments)."""
    for chunk in chunks:
        yield Chunk(chunk.rows, encode_segments(tokenizer, chunk.items))


def chunk_documents(chunks: Iterable[Chunk], options: DocumentOptions, stats: DataStats,
                    total_rows: int, progress: bool = False) -> List[Document]:
    """The document stage: token ids -> Documents (shifted targets); a row whose
    prompt fills ``max_seq_length`` is dropped and counted, a longer one truncated.
    ``progress`` shows a bar over the ``total_rows`` rows."""
    documents = []
    bar = _progress_bar(total_rows, "tokenizing", progress)
    try:
        for chunk in chunks:
            for ids, is_answer in chunk.items:
                document, truncated = make_document(ids, is_answer, max_length=options.max_seq_length,
                                                    train_on_all_tokens=options.train_on_all_tokens)
                if document is None:
                    stats.dropped_too_long += 1
                    continue
                stats.truncated += truncated
                documents.append(document)
            bar.update(chunk.rows)
    finally:
        bar.close()
    return documents


def documents_from_rows(rows: Sequence[Tuple[str, Dict[str, Any]]], tokenizer: Tokenizer, *,
                        template: str = "llama3", system_prompt: Optional[str] = None,
                        max_seq_length: Optional[int] = None, train_on_all_tokens: bool = False,
                        stats: Optional[DataStats] = None, progress: bool = False,
                        chunk_rows: int = 2048, locations: Optional[Sequence[Tuple[str, int]]] = None,
                        skip_bad_rows: bool = False) -> List[Document]:
    """Tokenized documents for validated (shape, row) pairs: the render, tokenize and
    document stages in turn (see each for what it checks, drops and counts)."""
    stats = DataStats() if stats is None else stats
    rendered = render_rows(rows, tokenizer, RenderOptions(template, system_prompt,
                                                          not train_on_all_tokens, skip_bad_rows,
                                                          chunk_rows), stats, locations)
    return chunk_documents(tokenize_chunks(rendered, tokenizer),
                           DocumentOptions(max_seq_length, train_on_all_tokens), stats,
                           total_rows=len(rows), progress=progress)


def _preview(shape: str, row: Dict[str, Any]) -> str:
    text = {"chat": lambda: row["messages"][0]["content"], "text": lambda: row["text"],
            "instruction": lambda: row["instruction"]}[shape]()
    text = " ".join(text.split())
    return f"{shape} row starting {text[:40]!r}"


def _progress_bar(total: int, what: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=what, unit=" rows", disable=not enabled, leave=False)
