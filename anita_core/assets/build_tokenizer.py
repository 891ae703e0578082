"""Trains the bundled byte-level BPE tokenizer on the project's own sample text
(Italian and English) and writes a transformers-loadable tokenizer folder:
tokenizer.json, tokenizer_config.json (with a LLaMA-3 chat template) and
special_tokens_map.json.

    python -m anita_core.assets.build_tokenizer [--data DIR] [--out DIR]

The layout mirrors LLaMA-3's tokenizer: LLaMA-3's pre-tokenizer split pattern,
byte-level alphabet (any text encodes, nothing is ever unknown), the regular
vocabulary first and the special tokens after it, in LLaMA-3.1's order, and a
post-processor that adds <|begin_of_text|> when transformers is asked for
special tokens. Deterministic: rebuilding gives byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Iterator, List

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from anita_core.assets import DATA_DIR, SAMPLE_FILES, TOKENIZER_DIR
from anita_core.data import templates

# LLaMA-3's pre-tokenizer pattern: contractions, words with one leading
# non-letter, numbers in groups of up to three digits, punctuation runs,
# newline runs, other whitespace.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Special tokens in LLaMA-3.1's relative order (its ids 128000..128009).
SPECIAL_TOKENS = [
    templates.BEGIN_OF_TEXT, templates.END_OF_TEXT, "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", templates.PAD, "<|reserved_special_token_2|>",
    templates.START_HEADER, templates.END_HEADER, "<|eom_id|>", templates.EOT,
]
VOCAB_SIZE = 1024                                  # regular tokens + special tokens
MODEL_MAX_LENGTH = 8192


def corpus(data_dir: str) -> Iterator[str]:
    """Every piece of text in the sample datasets, laid out as the templates lay
    it out (role names, the blank line after a header, the Alpaca headers), so
    the fixed parts of a prompt become few tokens."""
    for shape in sorted(SAMPLE_FILES):
        with open(os.path.join(data_dir, SAMPLE_FILES[shape]), encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if "instruction" in row:
                    yield templates.alpaca_prompt(row["system"], row["instruction"], row["input"])
                    yield row["output"]
                yield from _strings(row)


def _strings(value) -> Iterator[str]:
    """Text fields of a row; a message contributes its role, the header's blank
    line and its content."""
    if isinstance(value, str):
        if value:
            yield value
    elif isinstance(value, dict):
        if "role" in value:
            yield from (value["role"], "\n\n", value["content"])
        else:
            for key in sorted(value):
                if key != "source":
                    yield from _strings(value[key])
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def train(data_dir: str = DATA_DIR) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS), min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(corpus(data_dir), trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE - len(SPECIAL_TOKENS):
        raise RuntimeError(f"BPE training reached only {tokenizer.get_vocab_size()} tokens; "
                           f"the corpus is too small for {VOCAB_SIZE - len(SPECIAL_TOKENS)}")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in SPECIAL_TOKENS])
    bos = templates.BEGIN_OF_TEXT
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
        special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


def tokenizer_config(tokenizer: Tokenizer) -> dict:
    added = {str(tokenizer.token_to_id(t)): {
        "content": t, "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    return {
        "added_tokens_decoder": added,
        "bos_token": templates.BEGIN_OF_TEXT,
        "eos_token": templates.EOT,
        "pad_token": templates.PAD,
        "chat_template": templates.LLAMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def special_tokens_map() -> dict:
    return {"bos_token": templates.BEGIN_OF_TEXT, "eos_token": templates.EOT,
            "pad_token": templates.PAD}


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def build(data_dir: str = DATA_DIR, out_dir: str = TOKENIZER_DIR) -> List[str]:
    tokenizer = train(data_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in
             ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
    tokenizer.save(paths[0], pretty=True)
    _write_json(paths[1], tokenizer_config(tokenizer))
    _write_json(paths[2], special_tokens_map())
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DATA_DIR, help="folder of the sample datasets to train on")
    parser.add_argument("--out", default=TOKENIZER_DIR, help="output folder (default: the bundled tokenizer/)")
    args = parser.parse_args(argv)
    for path in build(args.data, args.out):
        print(f"{os.path.getsize(path) / 1024:7.1f} KB  {path}")


if __name__ == "__main__":
    main()
