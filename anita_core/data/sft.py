"""The SFT data pipeline: sources -> validated rows -> rendered segments ->
token documents (truncated or dropped, counted) -> seeded shuffle -> train and
held-out eval documents. Batching is packing.sft_batches."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

from anita_core.data import templates
from anita_core.data.chat_template import ChatTemplateError
from anita_core.data.documents import Document, encode_segments, make_document
from anita_core.data.loading import read_rows
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


def documents_from_rows(rows: Sequence[Tuple[str, Dict[str, Any]]], tokenizer: Tokenizer, *,
                        template: str = "llama3", system_prompt: Optional[str] = None,
                        max_seq_length: Optional[int] = None, train_on_all_tokens: bool = False,
                        stats: Optional[DataStats] = None, progress: bool = False,
                        chunk_rows: int = 2048, locations: Optional[Sequence[Tuple[str, int]]] = None,
                        skip_bad_rows: bool = False) -> List[Document]:
    """Tokenized documents for validated (shape, row) pairs; rows whose prompt
    fills ``max_seq_length`` are dropped and counted, longer ones truncated.
    Rows are rendered and tokenized ``chunk_rows`` at a time (one batch call
    each), so only one chunk of text is held at once; ``progress`` shows a bar.
    First, ``templates.check_template`` for every row shape present.

    A row the chat template fails on (or marks no answer in) is a BadRowError
    named by its ``locations`` entry (file, row number; else its index among
    ``rows``), or with ``skip_bad_rows`` skipped and counted."""
    stats = DataStats() if stats is None else stats
    for shape in sorted({shape for shape, _ in rows}):
        templates.check_template(tokenizer, template, shape)
    documents = []
    bar = _progress_bar(len(rows), "tokenizing", progress)
    for first in range(0, len(rows), chunk_rows):
        rendered = []
        for index in range(first, min(first + chunk_rows, len(rows))):
            shape, row = rows[index]
            try:
                rendered.append(row_segments(shape, row, template=template,
                                             system_prompt=system_prompt, tokenizer=tokenizer,
                                             need_answers=not train_on_all_tokens))
            except ChatTemplateError as e:
                source, number = (locations[index] if locations is not None
                                  else ("the rows read", index + 1))
                error = BadRowError(source, number, f"{_preview(shape, row)}: {e}")
                if not skip_bad_rows:
                    raise error from None
                stats.note_bad_row(str(error))
        for ids, is_answer in encode_segments(tokenizer, rendered):
            document, truncated = make_document(ids, is_answer, max_length=max_seq_length,
                                                train_on_all_tokens=train_on_all_tokens)
            if document is None:
                stats.dropped_too_long += 1
                continue
            stats.truncated += truncated
            documents.append(document)
        bar.update(min(chunk_rows, len(rows) - first))
    bar.close()
    return documents


def _preview(shape: str, row: Dict[str, Any]) -> str:
    text = {"chat": lambda: row["messages"][0]["content"], "text": lambda: row["text"],
            "instruction": lambda: row["instruction"]}[shape]()
    text = " ".join(text.split())
    return f"{shape} row starting {text[:40]!r}"


def _progress_bar(total: int, what: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=what, unit=" rows", disable=not enabled, leave=False)


def build_sft_data(config: SFTDataConfig, tokenizer: Tokenizer) -> SFTData:
    if config.max_seq_length < 2:
        raise ValueError(f"max_seq_length must be >= 2, got {config.max_seq_length}")
    if config.template not in templates.TEMPLATES:
        raise ValueError(f"unknown template {config.template!r}; expected one of {templates.TEMPLATES}")
    if config.shape != "auto":      # before reading anything: the tokenizer can render this shape
        templates.check_template(tokenizer, config.template, config.shape)
    stats = DataStats()
    locations: List[Tuple[str, int]] = []
    rows = read_rows(config.data, stats=stats, shape=config.shape, allowed_shapes=SFT_SHAPES,
                     skip_bad_rows=config.skip_bad_rows, max_samples=config.max_samples,
                     split=config.split, cache_dir=config.cache_dir, seed=config.seed,
                     progress=config.progress, locations=locations)
    documents = documents_from_rows(
        rows, tokenizer, template=config.template, system_prompt=config.system_prompt,
        max_seq_length=config.max_seq_length, train_on_all_tokens=config.train_on_all_tokens,
        stats=stats, progress=config.progress, locations=locations,
        skip_bad_rows=config.skip_bad_rows)
    if not documents:
        raise ValueError(stats.nothing_usable(config.data, "examples"))
    train, held_out = split_train_eval(documents, config.eval_split, config.seed)
    stats.examples = len(documents)
    stats.train_examples, stats.eval_examples = len(train), len(held_out)
    stats.tokens = sum(len(d) for d in documents)
    stats.target_tokens = sum(d.num_targets for d in documents)
    return SFTData(train=train, eval=held_out, stats=stats)
