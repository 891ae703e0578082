"""Batches in the contract the model consumes, packed or one document per row.

A batch is a dict of int64 tensors, all [B, S]:
  input_ids     token ids; padding holds the pad id
  targets       the token to predict AT each position (already shifted, never
                across a document boundary), or -100: prompt, last token of a
                document, padding
  position_ids  0, 1, 2, ... restarting at every document of a packed row
  segment_ids   document index within the row (0, 1, ...); padding is -1. A
                token attends only to earlier tokens of its own segment.
"""
from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple, TypeVar

import torch

from anita_core.data.documents import IGNORE_INDEX, Document

Batch = Dict[str, torch.Tensor]
BATCH_KEYS = ("input_ids", "targets", "position_ids", "segment_ids")
PAD_SEGMENT = -1

# A packed batch is as wide as its longest row rounded up to this, never wider than
# the row length: every matmul and the loss compute each padding column, so a batch
# of short documents is not padded out to --max-seq-length. Rounding keeps the
# number of distinct widths small (each new one can mean a kernel compile or an
# autotuning pass on a GPU): at most 64 up to 8192, and < 128 padding tokens a row.
PACKED_WIDTH_MULTIPLE = 128

T = TypeVar("T")


def shuffled(items: Sequence[T], seed: Optional[int]) -> List[T]:
    """A copy of ``items`` in a seeded random order (unchanged order when seed is None)."""
    items = list(items)
    if seed is not None:
        random.Random(seed).shuffle(items)
    return items


def next_fit_rows(lengths: Sequence[int], seq_len: int, *,
                  oversize_alone: bool = False) -> List[List[int]]:
    """Groups document indices, in order, into rows of at most ``seq_len`` tokens:
    a document goes into the current row if it fits, else it opens a new row.
    Keeping the order keeps the seeded shuffle meaningful and resuming simple.
    A document longer than ``seq_len`` is refused, or with ``oversize_alone`` (DPO
    pairs, data/dpo_pack.py) gets a row of its own."""
    rows: List[List[int]] = []
    used = seq_len + 1
    for index, length in enumerate(lengths):
        if length > seq_len and not oversize_alone:
            raise ValueError(f"document {index} has {length} tokens, more than the row length "
                             f"{seq_len}; truncate documents to the row length first")
        if used + length > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


def _round_up(n: int, multiple: Optional[int]) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def collate_rows(rows: Sequence[Sequence[Document]], *, pad_id: int, length: Optional[int] = None,
                 pad_to_multiple_of: Optional[int] = None) -> Batch:
    """One batch from rows of documents laid side by side, right-padded to
    ``length`` (default: the longest row, rounded up to ``pad_to_multiple_of``)."""
    if not rows:
        raise ValueError("collate_rows: no rows")
    longest = max(sum(len(d) for d in row) for row in rows)
    width = _round_up(longest if length is None else length, pad_to_multiple_of)
    if longest > width:
        raise ValueError(f"collate_rows: a row holds {longest} tokens, more than length {width}")
    shape = (len(rows), width)
    batch = {
        "input_ids": torch.full(shape, pad_id, dtype=torch.int64),
        "targets": torch.full(shape, IGNORE_INDEX, dtype=torch.int64),
        "position_ids": torch.zeros(shape, dtype=torch.int64),
        "segment_ids": torch.full(shape, PAD_SEGMENT, dtype=torch.int64),
    }
    for b, row in enumerate(rows):
        start = 0
        for segment, doc in enumerate(row):
            end = start + len(doc)
            batch["input_ids"][b, start:end] = torch.tensor(doc.input_ids, dtype=torch.int64)
            batch["targets"][b, start:end] = torch.tensor(doc.targets, dtype=torch.int64)
            batch["position_ids"][b, start:end] = torch.arange(len(doc), dtype=torch.int64)
            batch["segment_ids"][b, start:end] = segment
            start = end
    return batch


def packed_width(longest: int, seq_len: int, multiple: Optional[int] = PACKED_WIDTH_MULTIPLE) -> int:
    """The width of a packed batch whose longest row holds ``longest`` tokens."""
    return min(_round_up(longest, multiple), max(seq_len, longest))


def largest_sft_batch(lengths: Sequence[int], *, batch_size: int, seq_len: int, pack: bool = True,
                      pad_to_multiple_of: Optional[int] = None) -> Tuple[int, int]:
    """(rows, width): the largest batch ``sft_batches`` can make of documents of these
    lengths in any order, i.e. in any epoch's shuffle (what a memory plan must fit).
    Packed, a row holds at most seq_len tokens and at most all there are; and next fit
    opens a row only when the next document does not fit, so two neighbouring rows
    hold more than seq_len together: fewer than 2 * tokens / seq_len + 1 rows."""
    rows = min(batch_size, len(lengths))
    if not pack:
        return rows, packed_width(max(lengths), seq_len, pad_to_multiple_of)
    total = sum(lengths)
    return (min(rows, 2 * total // seq_len + 1),
            packed_width(min(seq_len, total), seq_len, pad_to_multiple_of or PACKED_WIDTH_MULTIPLE))


def sft_batches(documents: Sequence[Document], *, batch_size: int, seq_len: int, pad_id: int,
                pack: bool = True, shuffle_seed: Optional[int] = None,
                pad_to_multiple_of: Optional[int] = None) -> List[Batch]:
    """All batches of one pass over ``documents`` (shuffled first when a seed is
    given; pass e.g. seed + epoch for a new order each epoch).

    pack=True: documents are packed into rows of at most ``seq_len`` tokens (next
    fit, in order); each batch is padded to its longest row rounded up to
    ``pad_to_multiple_of`` (default PACKED_WIDTH_MULTIPLE), never beyond seq_len.
    pack=False: one document per row, padded to the batch's longest row (rounded
    up when ``pad_to_multiple_of`` is given). The last batch may hold fewer rows."""
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"batch_size must be >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")
    documents = shuffled(documents, shuffle_seed)
    if pack:
        rows = [[documents[i] for i in row]
                for row in next_fit_rows([len(d) for d in documents], seq_len)]
    else:
        for i, d in enumerate(documents):
            if len(d) > seq_len:
                raise ValueError(f"document {i} has {len(d)} tokens, more than seq_len {seq_len}")
        rows = [[d] for d in documents]
    multiple = pad_to_multiple_of if pad_to_multiple_of or not pack else PACKED_WIDTH_MULTIPLE
    batches = []
    for i in range(0, len(rows), batch_size):
        group = rows[i:i + batch_size]
        longest = max(sum(len(d) for d in row) for row in group)
        batches.append(collate_rows(group, pad_id=pad_id,
                                    length=packed_width(longest, seq_len, multiple)))
    return batches



def to_hf_batch(batch: Batch) -> Dict[str, torch.Tensor]:
    """The transformers view of an unpacked batch (one document per row):
    input_ids, labels (unshifted: labels[t] = targets[t - 1], -100 at t = 0) and
    attention_mask. transformers' causal-LM loss shifts labels back, so it sees
    exactly our targets. Packed rows have no such view: ValueError."""
    segments = batch["segment_ids"]
    if (segments > 0).any():
        raise ValueError("to_hf_batch: the batch holds packed rows (segment ids > 0); "
                         "a transformers batch has one document per row")
    labels = torch.full_like(batch["targets"], IGNORE_INDEX)
    labels[:, 1:] = batch["targets"][:, :-1]
    return {"input_ids": batch["input_ids"].clone(), "labels": labels,
            "attention_mask": (segments >= 0).to(torch.int64)}


def check_batch(batch: Batch) -> None:
    """Raises ValueError when ``batch`` breaks the contract: keys, int64 [B, S],
    padding only after the documents with target -100, segments numbered
    0, 1, ... in order, positions restarting at 0 per segment, and every target
    equal to the next token of the same segment."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}")
    shape = batch["input_ids"].shape
    for key in BATCH_KEYS:
        t = batch[key]
        if t.dtype != torch.int64 or t.dim() != 2 or t.shape != shape:
            raise ValueError(f"batch[{key!r}]: expected int64 of shape {tuple(shape)}, "
                             f"got {t.dtype} {tuple(t.shape)}")
    ids, targets, pos, seg = (batch[k] for k in BATCH_KEYS)
    pad = seg == PAD_SEGMENT
    if (targets[pad] != IGNORE_INDEX).any():
        raise ValueError("a padding position has a target")
    if (pad[:, :-1] & ~pad[:, 1:]).any():
        raise ValueError("a document starts after padding (padding must be at the row's end)")
    if (seg < PAD_SEGMENT).any():
        raise ValueError("segment ids below -1")
    starts = torch.ones_like(pad)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    starts &= ~pad
    if (pos[starts] != 0).any():
        raise ValueError("a document does not start at position 0")
    inner = ~starts & ~pad
    prev_pos = torch.zeros_like(pos)
    prev_pos[:, 1:] = pos[:, :-1]
    if (pos[inner] != prev_pos[inner] + 1).any():
        raise ValueError("positions do not increase by 1 within a document")
    prev_seg = torch.full_like(seg, PAD_SEGMENT)
    prev_seg[:, 1:] = seg[:, :-1]
    if (seg[starts] != prev_seg[starts] + 1).any():
        raise ValueError("segments are not numbered 0, 1, 2, ... along the row")
    has_target = targets != IGNORE_INDEX
    if has_target[:, -1].any():
        raise ValueError("the last column has a target (its next token is not in the row)")
    same_doc_next = torch.zeros_like(pad)
    same_doc_next[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & ~pad[:, :-1]
    if (has_target & ~same_doc_next).any():
        raise ValueError("a target crosses a document boundary (last token of a document "
                         "must have target -100)")
    next_ids = torch.zeros_like(ids)
    next_ids[:, :-1] = ids[:, 1:]
    if (targets[has_target] != next_ids[has_target]).any():
        raise ValueError("a target is not the next token of its document")
