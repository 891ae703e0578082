"""Token documents: rendered segments -> token ids with already-shifted targets.

A Document's ``targets[t]`` is the token the model must predict at position t:
``input_ids[t + 1]`` when that token is learned (an answer token, or any token
but the first when training on all tokens), else IGNORE_INDEX. The last token
of a document never has a target, so once documents are packed side by side no
target can point into the next document.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from anita_core.data.templates import Segment, render
from anita_core.data.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass
class Document:
    input_ids: List[int]
    targets: List[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


def encode_segments(tokenizer: Tokenizer, documents: Sequence[Sequence[Segment]],
                    ) -> List[Tuple[List[int], List[bool]]]:
    """(token ids, is-answer flag per token) for each document.

    The whole rendered text is encoded at once (in one batch call), so the ids
    are exactly the tokenization of the text, as transformers' tokenizing
    apply_chat_template gives them, whatever the tokenizer's pre-tokenizer does
    at segment boundaries. A token is an answer token when its characters
    overlap an answer segment (transformers' rule for assistant masks)."""
    encoded = tokenizer.encode_batch_with_offsets([render(segments) for segments in documents])
    return [(ids, answer_mask(offsets, segment_answer_spans(segments)))
            for segments, (ids, offsets) in zip(documents, encoded)]


def segment_answer_spans(segments: Sequence[Segment]) -> List[Tuple[int, int]]:
    """[start, end) character spans of the answer segments, neighbours joined."""
    spans: List[Tuple[int, int]] = []
    at = 0
    for s in segments:
        if s.is_answer and s.text:
            if spans and spans[-1][1] == at:
                spans[-1] = (spans[-1][0], at + len(s.text))
            else:
                spans.append((at, at + len(s.text)))
        at += len(s.text)
    return spans


def answer_mask(offsets: Sequence[Tuple[int, int]], spans: Sequence[Tuple[int, int]]) -> List[bool]:
    """Per token: does its [start, end) character range overlap one of the
    sorted ``spans``? (One pass: tokens and spans are both in order.)"""
    mask = [False] * len(offsets)
    span = 0
    for t, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        mask[t] = end > spans[span][0]
    return mask


def prompt_length(is_answer: Sequence[bool]) -> int:
    """Tokens before the first answer token (the whole document when it has none)."""
    for i, flag in enumerate(is_answer):
        if flag:
            return i
    return len(is_answer)


def make_document(ids: Sequence[int], is_answer: Sequence[bool], *, max_length: Optional[int] = None,
                  train_on_all_tokens: bool = False) -> Tuple[Optional[Document], bool]:
    """(document, was_truncated); the document is None when the prompt alone
    fills ``max_length`` (no answer token would remain: dropped, never an error).

    Longer documents keep their first ``max_length`` tokens; the last kept token
    then has no target, exactly as when truncated ids and labels are shifted."""
    if len(ids) != len(is_answer):
        raise ValueError(f"ids ({len(ids)}) and is_answer ({len(is_answer)}) differ in length")
    if max_length is not None and prompt_length(is_answer) >= max_length:
        return None, False
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, is_answer = ids[:max_length], is_answer[:max_length]
    # position 0 is never a target: nothing in the document precedes it
    learned = [flag or (train_on_all_tokens and t > 0) for t, flag in enumerate(is_answer)]
    targets = [ids[t + 1] if learned[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
    targets.append(IGNORE_INDEX)
    document = Document(list(ids), targets)
    if document.num_targets == 0:
        return None, False
    return document, truncated
