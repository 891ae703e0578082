"""Data pipeline: files -> validated rows -> templates -> token ids with
shifted targets -> batches (packed or not) in the contract the model consumes.

Batch contract (int64 tensors [B, S]): input_ids; targets (the token to predict
at each position, already shifted, -100 for no loss); position_ids (restarting
at 0 for each document of a packed row); segment_ids (document index in the
row, -1 for padding; a token attends only to earlier tokens of its segment).
"""
from anita_core.data.documents import IGNORE_INDEX, Document, make_document
from anita_core.data.dpo import (DPOData, DPODataConfig, PreferencePair, build_dpo_data,
                                 collate_pairs, dpo_batches, pair_documents, tokenize_pairs,
                                 truncate_pair)
from anita_core.data.loading import read_rows, read_table
from anita_core.data.packing import (BATCH_KEYS, Batch, check_batch, collate_rows, largest_sft_batch,
                                     next_fit_rows, sft_batches, shuffled, to_hf_batch)
from anita_core.data.rows import BadRowError, detect_shape
from anita_core.data.pipeline import build_sft_data
from anita_core.data.sft import (SFTData, SFTDataConfig, documents_from_rows, row_segments,
                                 split_train_eval)
from anita_core.data.stats import DataStats
from anita_core.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "IGNORE_INDEX", "Document", "make_document",
    "DPOData", "DPODataConfig", "PreferencePair", "build_dpo_data", "collate_pairs", "dpo_batches",
    "pair_documents", "tokenize_pairs", "truncate_pair",
    "read_rows", "read_table",
    "BATCH_KEYS", "Batch", "check_batch", "collate_rows", "largest_sft_batch", "next_fit_rows",
    "sft_batches", "shuffled", "to_hf_batch",
    "BadRowError", "detect_shape",
    "SFTData", "SFTDataConfig", "build_sft_data", "documents_from_rows", "row_segments",
    "split_train_eval",
    "DataStats",
    "Tokenizer", "load_tokenizer",
]
