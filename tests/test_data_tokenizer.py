"""The bundled tokenizer and sample datasets: rebuildable by the project's
scripts, loadable by transformers, and rendering the LLaMA-3 chat template
exactly as transformers' apply_chat_template does."""
from __future__ import annotations

import filecmp
import json
import os

import pytest

from anita_core.assets import DATA_DIR, SAMPLE_FILES, TOKENIZER_DIR, build_data, build_tokenizer, sample_path
from anita_core.data import load_tokenizer, templates
from anita_core.data.documents import encode_segments
from anita_core.data.dpo import prompt_text
from anita_core.data.rows import CHECKS, check_dpo_row

SPECIAL = {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>"}


def _jsonl(shape):
    with open(sample_path(shape), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def hf_tok():
    import transformers
    return transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def test_bundled_tokenizer_ids(tok):
    assert 512 <= tok.vocab_size <= 1024
    assert tok.bos_id == tok.token_to_id(SPECIAL["bos"])
    assert tok.eos_id == tok.token_to_id(SPECIAL["eos"])
    assert tok.pad_id == tok.token_to_id(SPECIAL["pad"])
    assert len({tok.bos_id, tok.eos_id, tok.pad_id, tok.start_header_id, tok.end_header_id,
                tok.end_of_text_id}) == 6
    # LLaMA-3 layout: special tokens after the regular vocabulary
    assert min(tok.bos_id, tok.eos_id, tok.pad_id) >= tok.vocab_size - 10
    # no automatic specials; written specials are single ids
    assert tok.bos_id not in tok.encode("ciao a tutti")
    assert tok.encode("<|begin_of_text|>x<|eot_id|>")[0] == tok.bos_id
    assert tok.encode("<|begin_of_text|>x<|eot_id|>")[-1] == tok.eos_id
    assert tok.encode("<|start_header_id|>") == [tok.start_header_id]


def test_byte_level_round_trip_on_all_sample_text(tok):
    texts = ["Perché è già così? «Sì», disse l'uomo — 3,14 € 😀 \t\n fine  "]
    for row in _jsonl("instruction"):
        texts += [row["instruction"], row["input"], row["output"]]
    texts += [row["text"] for row in _jsonl("text")]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text


def test_transformers_loads_the_tokenizer_folder(tok, hf_tok):
    assert hf_tok.bos_token == SPECIAL["bos"] and hf_tok.bos_token_id == tok.bos_id
    assert hf_tok.eos_token == SPECIAL["eos"] and hf_tok.eos_token_id == tok.eos_id
    assert hf_tok.pad_token == SPECIAL["pad"] and hf_tok.pad_token_id == tok.pad_id
    assert len(hf_tok) == tok.vocab_size
    for text in ["Il capoluogo della regione Umbria è Perugia.", "What is 7 plus 5?\n\nOk."]:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
        # like LLaMA-3, asking transformers for special tokens prepends BOS
        assert hf_tok(text)["input_ids"] == [tok.bos_id] + tok.encode(text)


def _hf_chat(hf_tok, messages, add_generation_prompt=False):
    text = hf_tok.apply_chat_template(messages, tokenize=False,
                                      add_generation_prompt=add_generation_prompt)
    ids = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                     add_generation_prompt=add_generation_prompt)["input_ids"]
    return text, list(ids)


@pytest.mark.parametrize("system_prompt", [None, "Sei un assistente utile."])
def test_chat_rows_render_like_apply_chat_template(tok, hf_tok, system_prompt):
    conversations = [CHECKS["chat"](row)["messages"] for row in _jsonl("chat")]
    conversations.append([{"role": "user", "content": "  spazi intorno \n"},
                          {"role": "assistant", "content": "\n risposta\t "}])
    rendered = []
    for messages in conversations:
        segments = templates.chat_segments(messages, system_prompt)
        full = templates.with_system_prompt(messages, system_prompt)
        expected_text, expected_ids = _hf_chat(hf_tok, full)
        assert templates.render(segments) == expected_text
        rendered.append((segments, expected_ids))
    # segment-wise tokenization equals tokenizing the whole string
    encoded = encode_segments(tok, [s for s, _ in rendered])
    for (ids, _), (_, expected_ids) in zip(encoded, rendered):
        assert ids == expected_ids


def test_instruction_rows_render_like_apply_chat_template(tok, hf_tok):
    rows = [CHECKS["instruction"](row) for row in _jsonl("instruction")]
    segments = [templates.instruction_segments(row, "llama3") for row in rows]
    for row, (ids, _), segs in zip(rows, encode_segments(tok, segments), segments):
        messages = templates.instruction_messages(row["system"], row["instruction"], row["input"],
                                                  row["output"])
        expected_text, expected_ids = _hf_chat(hf_tok, messages)
        assert templates.render(segs) == expected_text
        assert ids == expected_ids


def test_dpo_prompts_render_like_apply_chat_template(tok, hf_tok):
    for row in _jsonl("dpo_messages")[:60] + _jsonl("dpo")[:60]:
        pair = check_dpo_row(row)
        text, ids = _hf_chat(hf_tok, pair["prompt"], add_generation_prompt=True)
        assert prompt_text(pair["prompt"]) == text
        assert tok.encode(prompt_text(pair["prompt"])) == ids


def test_assets_rebuild_byte_identical(tmp_path):
    data_dir, tok_dir = tmp_path / "data", tmp_path / "tokenizer"
    build_data.build(str(data_dir))
    build_tokenizer.build(str(data_dir), str(tok_dir))
    for name in SAMPLE_FILES.values():
        assert filecmp.cmp(data_dir / name, os.path.join(DATA_DIR, name), shallow=False), name
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert filecmp.cmp(tok_dir / name, os.path.join(TOKENIZER_DIR, name), shallow=False), name


def test_sample_datasets_are_small_bilingual_and_valid():
    for shape, name in SAMPLE_FILES.items():
        rows = _jsonl(shape)
        assert 100 <= len(rows) <= 300, (name, len(rows))
        assert os.path.getsize(sample_path(shape)) < 100 * 1024, name
        check = CHECKS["dpo" if shape.startswith("dpo") else shape]
        for row in rows:
            check(row)                  # raises on a malformed row
        text = json.dumps(rows, ensure_ascii=False)
        assert " è " in text, name      # Italian
        if shape != "text":             # raw text is Italian only (language adaptation)
            assert " the " in text, name
    sources = [row["source"] for row in _jsonl("dpo_messages")]
    assert 5 <= sources.count("toxic-dpo") < len(sources) // 2
    assert all(isinstance(row["chosen"], list) for row in _jsonl("dpo_messages"))
    assert all(isinstance(row["chosen"], str) for row in _jsonl("dpo"))


def test_load_tokenizer_accepts_the_json_file_and_reports_missing_pieces(tmp_path, tok):
    direct = load_tokenizer(os.path.join(TOKENIZER_DIR, "tokenizer.json"))
    assert direct.encode("ciao") == tok.encode("ciao") and direct.pad_id == tok.pad_id
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "nowhere"))
    # a tokenizer without LLaMA-3's special tokens loads; the llama3 template
    # refuses it by name (the tokenizer file and the first missing token)
    from tokenizers import Tokenizer, models, pre_tokenizers
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel()
    plain.add_special_tokens(["<|begin_of_text|>"])
    plain.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.bos_id == loaded.token_to_id("<|begin_of_text|>") and loaded.eos_id is None
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'tokenizer.json'}: no <\|start_header_id\|> "
                                         r"token, which --template llama3 needs; no --template works"):
        templates.check_template(loaded, "llama3", "instruction")
    with pytest.raises(ValueError, match=r"no eos_token, which raw text rows end with"):
        templates.check_template(loaded, "llama3", "text")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: not valid JSON"):
        load_tokenizer(str(tmp_path))
