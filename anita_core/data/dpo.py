"""The DPO data pipeline: preference rows -> (prompt, chosen, rejected) token
ids, the source filter, TRL's truncation, and chosen/rejected batches in the
same contract as SFT (targets mask the prompt).

Tokenization follows TRL 1.16's DPOTrainer (dpo_render.py): the prompt is the
template with the generation prompt (for llama3: BOS, turns, assistant header)
and each completion is what follows it in prompt + answer (for llama3: the
stripped answer and <|eot_id|>; for the tokenizer's own chat template, whatever
it writes after the prompt, e.g. ChatML's "answer<|im_end|>\n").
A row the template cannot render, or that leaves no prompt or no answer token,
is a BadRowError naming its file and row (skipped and counted with
skip_bad_rows); a pair whose chosen and rejected ids are the same is skipped,
and the first few such rows are named in the log.

Truncation (``truncate_pair``):
- max_length only: TRL 1.16. A pair whose prompt alone has >= max_length
  tokens is dropped (DPOTrainer filters it out); otherwise prompt + completion
  keeps its first max_length tokens (the collator's "keep_start"): the prompt
  stays whole and each completion loses its end.
- with max_prompt_length: TRL 1.16 no longer has this option; it follows the
  rule of TRL's DPOTrainer.tokenize_row up to 0.11 (the versions the ANITA
  recipe ran with max_length 1024, max_prompt_length 512), with that trainer's
  default truncation_mode "keep_end". With L = the longer completion: if
  prompt + L > max_length, the prompt keeps its LAST max_prompt_length tokens
  (its BOS may go, as it did there); if still prompt + L > max_length, both
  completions keep their FIRST max_length - max_prompt_length tokens.
  The result always fits, so the TRL 1.16 step then changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Dict, List, Optional, Sequence, Tuple, Union

from anita_core.data import templates
from anita_core.data.documents import IGNORE_INDEX, Document
from anita_core.data.dpo_render import PairProblem, check_dpo_template, encode_pairs
from anita_core.data.loading import read_tables, shape_rows
from anita_core.data.packing import Batch, collate_rows, shuffled
from anita_core.data.rows import BadRowError
from anita_core.data.sft import split_train_eval
from anita_core.data.stats import DataStats
from anita_core.data.tokenizer import Tokenizer


@dataclass
class PreferencePair:
    prompt_ids: List[int]
    chosen_ids: List[int]      # the chosen completion: answer tokens + <|eot_id|>
    rejected_ids: List[int]
    source: Optional[str] = None


@dataclass
class DPODataConfig:
    data: Union[str, Sequence[str]]
    system_prompt: Optional[str] = None     # default system turn for prompts without one
    template: str = "llama3"                # llama3 | chat | none (dpo_render)
    max_length: Optional[int] = 1024        # prompt + completion; None: no truncation
    max_prompt_length: Optional[int] = None
    exclude_sources: Collection[str] = ()   # e.g. ("toxic-dpo",)
    max_samples: Optional[int] = None
    eval_split: Union[int, float] = 0
    seed: int = 0
    skip_bad_rows: bool = False
    split: str = "train"
    cache_dir: Optional[str] = None


@dataclass
class DPOData:
    train: List[PreferencePair]
    eval: List[PreferencePair]
    stats: DataStats = field(default_factory=DataStats)


def prompt_text(prompt: Sequence[Dict[str, str]], system_prompt: Optional[str] = None) -> str:
    """The rendered prompt: chat template with the assistant header at the end."""
    messages = templates.with_system_prompt(prompt, system_prompt)
    return templates.render(templates.llama3_chat_segments(messages, add_generation_prompt=True))


def tokenize_pairs(rows: Sequence[Dict[str, Any]], tokenizer: Tokenizer,
                   system_prompt: Optional[str] = None, template: str = "llama3",
                   ) -> List[PreferencePair]:
    """Token ids for validated DPO rows (see rows.check_dpo_row), rendered with
    ``template`` (dpo_render); a row that cannot be rendered raises its PairProblem."""
    pairs = []
    for row, ids in zip(rows, encode_pairs(rows, tokenizer, template, system_prompt)):
        if isinstance(ids, PairProblem):
            raise ids
        pairs.append(PreferencePair(*ids, source=row.get("source")))
    return pairs


def truncate_pair(prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], *,
                  max_length: Optional[int], max_prompt_length: Optional[int] = None,
                  ) -> Tuple[Optional[Tuple[List[int], List[int], List[int]]], bool]:
    """((prompt, chosen, rejected) or None when dropped, was_truncated); the rule
    is in this module's docstring."""
    prompt, chosen, rejected = list(prompt), list(chosen), list(rejected)
    original_lengths = (len(prompt), len(chosen), len(rejected))
    if max_length is None:
        return (prompt, chosen, rejected), False
    if max_prompt_length is not None:
        if not 0 < max_prompt_length < max_length:
            raise ValueError(f"max_prompt_length must be in (0, max_length={max_length}), "
                             f"got {max_prompt_length}")
        longer = max(len(chosen), len(rejected))
        if len(prompt) + longer > max_length:
            prompt = prompt[-max_prompt_length:]
        if len(prompt) + longer > max_length:
            keep = max_length - max_prompt_length
            chosen, rejected = chosen[:keep], rejected[:keep]
    if len(prompt) >= max_length:
        return None, False
    keep = max_length - len(prompt)
    chosen, rejected = chosen[:keep], rejected[:keep]
    truncated = (len(prompt), len(chosen), len(rejected)) != original_lengths
    return (prompt, chosen, rejected), truncated


def pair_documents(pair: PreferencePair) -> Tuple[Document, Document]:
    """prompt + chosen and prompt + rejected as documents whose targets are the
    completion tokens only (targets[t] = ids[t + 1] for t + 1 >= len(prompt))."""
    out = []
    for completion in (pair.chosen_ids, pair.rejected_ids):
        ids = pair.prompt_ids + completion
        start = len(pair.prompt_ids)
        targets = [ids[t + 1] if t + 1 >= start else IGNORE_INDEX for t in range(len(ids) - 1)]
        out.append(Document(ids, targets + [IGNORE_INDEX]))
    return out[0], out[1]


def collate_pairs(pairs: Sequence[PreferencePair], *, pad_id: int,
                  pad_to_multiple_of: Optional[int] = None) -> Dict[str, Batch]:
    """{"chosen": batch, "rejected": batch}, both padded to one common length
    (the longest of all 2 * len(pairs) sequences)."""
    documents = [pair_documents(p) for p in pairs]
    width = max(max(len(c), len(r)) for c, r in documents)
    return {name: collate_rows([[docs[k]] for docs in documents], pad_id=pad_id, length=width,
                               pad_to_multiple_of=pad_to_multiple_of)
            for k, name in enumerate(("chosen", "rejected"))}


def dpo_batches(pairs: Sequence[PreferencePair], *, batch_size: int, pad_id: int,
                shuffle_seed: Optional[int] = None,
                pad_to_multiple_of: Optional[int] = None) -> List[Dict[str, Batch]]:
    """All batches of one pass over ``pairs`` (seeded shuffle first when given)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = shuffled(pairs, shuffle_seed)
    return [collate_pairs(pairs[i:i + batch_size], pad_id=pad_id,
                          pad_to_multiple_of=pad_to_multiple_of)
            for i in range(0, len(pairs), batch_size)]


def build_dpo_data(config: DPODataConfig, tokenizer: Tokenizer) -> DPOData:
    check_dpo_template(tokenizer, config.template)     # before reading anything
    stats = DataStats()
    locations: List[Tuple[str, int]] = []
    # read -> shape -> render and tokenize (encode_pairs) -> pair documents -> split;
    # batching (dpo_batches) is the pack stage
    tables = read_tables(config.data, max_samples=config.max_samples, split=config.split,
                         cache_dir=config.cache_dir, seed=config.seed)
    rows = shape_rows(tables, stats=stats, shape="dpo", allowed_shapes=("dpo",),
                      skip_bad_rows=config.skip_bad_rows, exclude_sources=config.exclude_sources,
                      locations=locations)
    rows = [row for _, row in rows]
    pairs = []
    encoded = encode_pairs(rows, tokenizer, config.template, config.system_prompt)
    for row, ids, (source, number) in zip(rows, encoded, locations):
        if isinstance(ids, PairProblem):
            error = BadRowError(source, number, f"{_preview(row)}: {ids}")
            if not config.skip_bad_rows:
                raise error
            stats.note_bad_row(str(error))
            continue
        prompt_ids, chosen_ids, rejected_ids = ids
        if chosen_ids == rejected_ids:    # same answer after templating: no signal
            stats.note_identical_pair(f"{source}: row {number}")
            continue
        kept, truncated = truncate_pair(prompt_ids, chosen_ids, rejected_ids,
                                        max_length=config.max_length,
                                        max_prompt_length=config.max_prompt_length)
        if kept is None:
            stats.dropped_too_long += 1
            continue
        stats.truncated += truncated
        pairs.append(PreferencePair(*kept, source=row.get("source")))
    if not pairs:
        raise ValueError(stats.nothing_usable(config.data, "preference pairs"))
    train, held_out = split_train_eval(pairs, config.eval_split, config.seed)
    stats.examples = len(pairs)
    stats.train_examples, stats.eval_examples = len(train), len(held_out)
    stats.tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    stats.target_tokens = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    return DPOData(train=train, eval=held_out, stats=stats)


def _preview(row: Dict[str, Any]) -> str:
    text = " ".join(row["prompt"][-1]["content"].split())
    return f"pair whose prompt ends {text[-40:]!r}"
