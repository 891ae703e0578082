"""The SFT data path as a row of stages, data going one way, each stage called
once, on the previous stage's output and its own options:

    read      sources -> tables               loading.read_tables
    shape     tables -> validated rows        loading.shape_rows
    render    rows -> segment chunks          sft.render_rows
    tokenize  segments -> ids, answer flags   sft.tokenize_chunks
    document  ids -> Documents, then split    sft.chunk_documents, sft.split_train_eval
    pack      Documents -> batches            packing.sft_batches (per epoch, by the recipe)

The render, tokenize and document stages pass chunks of rows along lazily, so
only one chunk's text is held at a time. No stage calls back into an earlier one."""
from __future__ import annotations

from typing import List, Tuple

from anita_core.data import templates
from anita_core.data.loading import read_tables, shape_rows
from anita_core.data.rows import SFT_SHAPES
from anita_core.data.sft import (DocumentOptions, RenderOptions, SFTData, SFTDataConfig,
                                 chunk_documents, render_rows, split_train_eval, tokenize_chunks)
from anita_core.data.stats import DataStats
from anita_core.data.tokenizer import Tokenizer


def build_sft_data(config: SFTDataConfig, tokenizer: Tokenizer) -> SFTData:
    if config.max_seq_length < 2:
        raise ValueError(f"max_seq_length must be >= 2, got {config.max_seq_length}")
    if config.template not in templates.TEMPLATES:
        raise ValueError(f"unknown template {config.template!r}; expected one of {templates.TEMPLATES}")
    if config.shape != "auto":      # before reading anything: the tokenizer can render this shape
        templates.check_template(tokenizer, config.template, config.shape)
        if config.shape not in SFT_SHAPES:
            raise ValueError(f"row shape {config.shape!r} is not usable here; expected 'auto' or "
                             f"one of {sorted(SFT_SHAPES)}")
    stats = DataStats()
    locations: List[Tuple[str, int]] = []
    tables = read_tables(config.data, max_samples=config.max_samples, split=config.split,
                         cache_dir=config.cache_dir, seed=config.seed, progress=config.progress)
    rows = shape_rows(tables, stats=stats, shape=config.shape, allowed_shapes=SFT_SHAPES,
                      skip_bad_rows=config.skip_bad_rows, locations=locations)
    rendered = render_rows(rows, tokenizer,
                           RenderOptions(config.template, config.system_prompt,
                                         need_answers=not config.train_on_all_tokens,
                                         skip_bad_rows=config.skip_bad_rows),
                           stats, locations)
    encoded = tokenize_chunks(rendered, tokenizer)
    documents = chunk_documents(encoded, DocumentOptions(config.max_seq_length,
                                                         config.train_on_all_tokens),
                                stats, total_rows=len(rows), progress=config.progress)
    if not documents:
        raise ValueError(stats.nothing_usable(config.data, "examples"))
    train, held_out = split_train_eval(documents, config.eval_split, config.seed)
    stats.examples = len(documents)
    stats.train_examples, stats.eval_examples = len(train), len(held_out)
    stats.tokens = sum(len(d) for d in documents)
    stats.target_tokens = sum(d.num_targets for d in documents)
    return SFTData(train=train, eval=held_out, stats=stats)
