"""SFT data pipeline: exact rendering, label masking, truncation and dropping,
packing without leaks, seeded shuffling, every file format, malformed rows."""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from anita_core.assets import TOKENIZER_DIR, sample_path
from anita_core.data import (IGNORE_INDEX, BadRowError, SFTDataConfig, build_sft_data, check_batch,
                             documents_from_rows, largest_sft_batch, load_tokenizer,
                             next_fit_rows, sft_batches,
                             shuffled, to_hf_batch)
from anita_core.data import templates
from anita_core.data.documents import Document, make_document
from anita_core.data.packing import PACKED_WIDTH_MULTIPLE
from anita_core.data.rows import CHECKS
from tests.helpers import sample_rows


EOT = "<|eot_id|>"
BOS = "<|begin_of_text|>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER_DIR)


def _docs(tok, shape, rows, **kwargs):
    return documents_from_rows([(shape, CHECKS[shape](r)) for r in rows], tok, **kwargs)


def _target_text(tok, doc):
    return tok.decode([t for t in doc.targets if t != IGNORE_INDEX])


def _assert_shifted(doc):
    """Every target is the next token of the document; the last token has none."""
    assert len(doc.targets) == len(doc.input_ids)
    assert doc.targets[-1] == IGNORE_INDEX
    for t, target in enumerate(doc.targets[:-1]):
        assert target in (IGNORE_INDEX, doc.input_ids[t + 1])


def _render_one(tok, shape, row, **kwargs):
    (doc,) = _docs(tok, shape, [row], **kwargs)
    return tok.decode(doc.input_ids), doc


# ------------------------------------------------------------------ rendering
def test_alpaca_rendering_is_exact(tok):
    with_input = {"system": "", "instruction": " Traduci la parola. ", "input": "cane\n",
                  "output": " dog "}
    text, doc = _render_one(tok, "instruction", with_input, template="alpaca")
    assert text == (
        BOS + "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTraduci la parola.\n\n### Input:\ncane\n\n### Response:\ndog" + EOT)
    assert _target_text(tok, doc) == "dog" + EOT
    no_input = {"system": "Rispondi in breve.", "instruction": "Che ore sono?", "input": "",
                "output": "Le tre."}
    text, doc = _render_one(tok, "instruction", no_input, template="alpaca")
    assert text == (BOS + "Rispondi in breve.\n\n### Instruction:\nChe ore sono?\n\n"
                    "### Response:\nLe tre." + EOT)
    text, _ = _render_one(tok, "instruction", dict(no_input, system=""), template="alpaca")
    assert text.startswith(BOS + "Below is an instruction that describes a task. Write a response "
                                 "that appropriately completes the request.\n\n### Instruction:")


def test_llama3_instruction_rendering_is_exact(tok):
    row = {"system": "", "instruction": "Traduci la parola.", "input": "cane", "output": "dog"}
    text, doc = _render_one(tok, "instruction", row, template="llama3")
    assert text == (BOS + "<|start_header_id|>user<|end_header_id|>\n\nTraduci la parola.\n\ncane"
                    + EOT + "<|start_header_id|>assistant<|end_header_id|>\n\ndog" + EOT)
    assert _target_text(tok, doc) == "dog" + EOT


def test_default_system_prompt_only_fills_a_missing_one(tok):
    default = "Sei un assistente."
    row = {"system": "", "instruction": "Ciao?", "input": "", "output": "Ciao!"}
    text, _ = _render_one(tok, "instruction", row, template="llama3", system_prompt=default)
    assert text.startswith(BOS + "<|start_header_id|>system<|end_header_id|>\n\nSei un assistente."
                           + EOT + "<|start_header_id|>user")
    own = dict(row, system="Parla come un pirata.")
    text, _ = _render_one(tok, "instruction", own, template="llama3", system_prompt=default)
    assert "Parla come un pirata." in text and default not in text
    text, _ = _render_one(tok, "instruction", row, template="alpaca", system_prompt=default)
    assert text.startswith(BOS + "Sei un assistente.\n\n### Instruction:\nCiao?")
    chat = {"messages": [{"role": "user", "content": "Ciao?"}, {"role": "assistant", "content": "Ciao!"}]}
    text, _ = _render_one(tok, "chat", chat, system_prompt=default)
    assert text == (BOS + "<|start_header_id|>system<|end_header_id|>\n\nSei un assistente." + EOT
                    + "<|start_header_id|>user<|end_header_id|>\n\nCiao?" + EOT
                    + "<|start_header_id|>assistant<|end_header_id|>\n\nCiao!" + EOT)
    chat_with_system = {"messages": [{"role": "system", "content": "Breve."}] + chat["messages"]}
    text, _ = _render_one(tok, "chat", chat_with_system, system_prompt=default)
    assert default not in text and "Breve." in text


def test_raw_text_rendering_and_targets(tok):
    row = {"text": " Il Po nasce dal Monviso.\n"}
    text, doc = _render_one(tok, "text", row)
    assert text == BOS + " Il Po nasce dal Monviso.\n" + EOT       # raw text is not stripped
    assert doc.input_ids[0] == tok.bos_id
    assert doc.targets[:-1] == doc.input_ids[1:]                   # every token after BOS is learned


# ------------------------------------------------------------------ label masking
def test_only_assistant_tokens_are_targets(tok):
    rows = sample_rows("chat")
    for row, doc in zip(rows, _docs(tok, "chat", rows)):
        _assert_shifted(doc)
        answers = "".join(m["content"].strip() + EOT for m in row["messages"] if m["role"] == "assistant")
        assert _target_text(tok, doc) == answers
    rows = sample_rows("instruction")
    for template in templates.TEMPLATES:
        for row, doc in zip(rows, _docs(tok, "instruction", rows, template=template)):
            _assert_shifted(doc)
            assert _target_text(tok, doc) == row["output"].strip() + EOT


def test_train_on_all_tokens(tok):
    rows = sample_rows("chat")[:20]
    for doc in _docs(tok, "chat", rows, train_on_all_tokens=True):
        assert doc.targets[:-1] == doc.input_ids[1:]
        assert doc.targets[-1] == IGNORE_INDEX


def test_targets_give_the_transformers_loss(tok):
    """Our targets and to_hf_batch's labels describe the same loss:
    transformers' LlamaForCausalLM(labels=...) equals cross-entropy on targets."""
    import transformers
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=24, intermediate_size=40,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, pad_token_id=tok.pad_id)
    model = transformers.LlamaForCausalLM(config).double().train()
    docs = _docs(tok, "chat", sample_rows("chat")[:5])
    (batch,) = sft_batches(docs, batch_size=5, seq_len=301, pad_id=tok.pad_id, pack=False)
    check_batch(batch)
    hf = to_hf_batch(batch)
    assert torch.equal(hf["attention_mask"], (batch["segment_ids"] >= 0).long())
    out = model(**hf)
    ours = torch.nn.functional.cross_entropy(out.logits.reshape(-1, config.vocab_size),
                                             batch["targets"].reshape(-1), ignore_index=IGNORE_INDEX)
    # same logits; transformers casts them to float32 for its loss, so the two
    # agree to float32 rounding (~1e-7 relative), far below any masking error
    torch.testing.assert_close(ours, out.loss.double(), rtol=1e-6, atol=0)


# ------------------------------------------------------------------ truncation and dropping
def test_truncation_and_dropping_are_counted(tok, tmp_path):
    ids = list(range(10, 30))
    is_answer = [False] * 8 + [True] * 12            # prompt of 8 tokens
    for max_length in (8, 5):                        # prompt alone fills the row: dropped
        assert make_document(ids, is_answer, max_length=max_length) == (None, False)
    doc, truncated = make_document(ids, is_answer, max_length=9)   # one answer token survives
    assert truncated and doc.input_ids == ids[:9] and doc.num_targets == 1
    assert doc.targets == [IGNORE_INDEX] * 7 + [ids[8], IGNORE_INDEX]
    doc, truncated = make_document(ids, is_answer, max_length=20)
    assert not truncated and doc.targets == [IGNORE_INDEX] * 7 + ids[8:] + [IGNORE_INDEX]

    long_prompt = {"system": "", "instruction": "parola " * 200, "input": "", "output": "ok"}
    long_answer = {"system": "", "instruction": "Ripeti.", "input": "", "output": "sì " * 200}
    short = {"system": "", "instruction": "Ciao?", "input": "", "output": "Ciao!"}
    path = _writesample_rows(str(tmp_path), [short, long_prompt, long_answer, short])
    data = build_sft_data(SFTDataConfig(path, max_seq_length=64), tok)
    s = data.stats
    assert (s.rows_read, s.dropped_too_long, s.truncated, s.examples) == (4, 1, 1, 3)
    assert max(len(d) for d in data.train) == 64
    assert s.tokens == sum(len(d) for d in data.train)
    assert s.target_tokens == sum(d.num_targets for d in data.train)


# ------------------------------------------------------------------ packing
def _unpack(batch):
    """Documents back out of a packed batch, by segment id."""
    docs = []
    for b in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][b]
        for s in range(int(seg.max()) + 1):
            where = seg == s
            docs.append(Document(batch["input_ids"][b][where].tolist(),
                                 batch["targets"][b][where].tolist()))
    return docs


def test_packing_never_leaks_across_documents(tok):
    docs = _docs(tok, "chat", sample_rows("chat")) + _docs(tok, "text", sample_rows("text"))
    seq_len = 203
    batches = sft_batches(docs, batch_size=3, seq_len=seq_len, pad_id=tok.pad_id, shuffle_seed=7)
    rows_seen = 0
    for batch in batches:
        check_batch(batch)
        ids, targets, pos, seg = (batch[k] for k in ("input_ids", "targets", "position_ids", "segment_ids"))
        width = ids.shape[1]
        longest = int((seg >= 0).sum(dim=1).max())
        # the longest row rounded up, never past seq_len: not padded out to seq_len
        assert width == min(-(-longest // PACKED_WIDTH_MULTIPLE) * PACKED_WIDTH_MULTIPLE, seq_len)
        for b in range(ids.shape[0]):
            rows_seen += 1
            for t in range(width):
                if seg[b, t] < 0:                                   # padding
                    assert ids[b, t] == tok.pad_id and targets[b, t] == IGNORE_INDEX
                    continue
                first = t == 0 or seg[b, t - 1] != seg[b, t]
                assert pos[b, t] == (0 if first else pos[b, t - 1] + 1)
                last = t == width - 1 or seg[b, t + 1] != seg[b, t]
                if last:                                            # document boundary
                    assert targets[b, t] == IGNORE_INDEX
                elif targets[b, t] != IGNORE_INDEX:
                    assert targets[b, t] == ids[b, t + 1]
            assert int(seg[b].max()) >= 0
    # every document comes back out whole, in the seeded order
    assert [(d.input_ids, d.targets) for b in batches for d in _unpack(b)] == \
           [(d.input_ids, d.targets) for d in shuffled(docs, 7)]
    assert rows_seen == len(next_fit_rows([len(d) for d in shuffled(docs, 7)], seq_len))
    assert rows_seen < len(docs) // 2                              # rows really are packed


def test_short_documents_are_not_padded_to_the_row_length(tok):
    """The sft preset's 8192-token rows: 40 instruction rows fit in one row of ~1,600
    tokens, which used to be padded to 8192 (80% padding); now to its length rounded
    up to PACKED_WIDTH_MULTIPLE. The documents come out whole and in order."""
    docs = _docs(tok, "instruction", sample_rows("instruction")[:40])
    real = sum(len(d) for d in docs)
    assert real < 8192 - 4 * PACKED_WIDTH_MULTIPLE
    (batch,) = sft_batches(docs, batch_size=1, seq_len=8192, pad_id=tok.pad_id)
    check_batch(batch)
    assert batch["input_ids"].shape == (1, -(-real // PACKED_WIDTH_MULTIPLE) * PACKED_WIDTH_MULTIPLE)
    assert [(d.input_ids, d.targets) for d in _unpack(batch)] == [(d.input_ids, d.targets) for d in docs]
    # rows of one batch share the longest one's width; a multiple that would pass
    # seq_len stops at seq_len
    two = sft_batches(docs[:6], batch_size=2, seq_len=150, pad_id=tok.pad_id, pad_to_multiple_of=100)
    for b in two:
        check_batch(b)
        longest = int((b["segment_ids"] >= 0).sum(dim=1).max())
        assert b["input_ids"].shape[1] == min(-(-longest // 100) * 100, 150)
    assert max(b["input_ids"].shape[1] for b in two) == 150           # the cap was met


def test_largest_sft_batch_bounds_every_epoch(tok):
    """The memory plan is made for largest_sft_batch: no shuffle packs a wider batch."""
    docs = _docs(tok, "chat", sample_rows("chat")) + _docs(tok, "text", sample_rows("text"))
    lengths = [len(d) for d in docs]
    for pack, seq_len in ((True, 203), (True, 100000), (False, 400)):
        rows, width = largest_sft_batch(lengths, batch_size=3, seq_len=seq_len, pack=pack)
        seen = [tuple(b["input_ids"].shape) for seed in range(8)
                for b in sft_batches(docs, batch_size=3, seq_len=seq_len, pad_id=tok.pad_id,
                                     pack=pack, shuffle_seed=seed)]
        assert all(r <= rows and w <= width for r, w in seen), (pack, seq_len, rows, width)
        assert max(r for r, _ in seen) == rows and max(w for _, w in seen) == width
    # all the data in one row: as wide as all its tokens (rounded), not seq_len
    assert largest_sft_batch(lengths, batch_size=3, seq_len=100000)[1] == \
        -(-sum(lengths) // PACKED_WIDTH_MULTIPLE) * PACKED_WIDTH_MULTIPLE


def test_next_fit_rows_fill_rows_in_order():
    lengths = [5, 4, 3, 7, 1, 1, 9, 2]
    rows = next_fit_rows(lengths, 9)
    assert rows == [[0, 1], [2], [3, 4, 5], [6], [7]]
    for row, nxt in zip(rows, rows[1:]):                          # the next document did not fit
        assert sum(lengths[i] for i in row) + lengths[nxt[0]] > 9
    with pytest.raises(ValueError, match="more than the row length"):
        next_fit_rows([3, 12], 9)


def test_check_batch_catches_each_broken_rule(tok):
    docs = _docs(tok, "text", sample_rows("text")[:6])
    (good,) = sft_batches(docs, batch_size=1, seq_len=131, pad_id=tok.pad_id)[:1]
    check_batch(good)
    seg = good["segment_ids"][0]
    boundary = int((seg[1:] != seg[:-1]).nonzero()[0])            # last token of document 0
    pad_at = int((seg < 0).nonzero()[0])

    def broken(key, index, value):
        bad = {k: v.clone() for k, v in good.items()}
        bad[key][0, index] = value
        return bad

    cases = [
        (broken("targets", boundary, int(good["input_ids"][0, boundary + 1])), "crosses a document"),
        (broken("position_ids", boundary + 1, 5), "start at position 0"),
        (broken("position_ids", 3, 9), "increase by 1"),
        (broken("targets", pad_at, 4), "padding position has a target"),
        ({**good, "segment_ids": good["segment_ids"].where(good["segment_ids"] < 1,
                                                           good["segment_ids"] + 1)}, "numbered"),
        (broken("targets", 2, int(good["input_ids"][0, 3]) + 1), "not the next token"),
        ({**good, "targets": good["targets"].int()}, "int64"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            check_batch(bad)


def test_unpacked_batches_pad_to_the_longest_row(tok):
    docs = _docs(tok, "instruction", sample_rows("instruction")[:7])
    (batch,) = sft_batches(docs, batch_size=7, seq_len=500, pad_id=tok.pad_id, pack=False)
    check_batch(batch)
    assert batch["input_ids"].shape == (7, max(len(d) for d in docs))
    assert batch["segment_ids"].max() == 0
    for b, d in enumerate(docs):
        assert batch["input_ids"][b, :len(d)].tolist() == d.input_ids
        assert (batch["segment_ids"][b, len(d):] == -1).all()
    (rounded,) = sft_batches(docs, batch_size=7, seq_len=500, pad_id=tok.pad_id, pack=False,
                             pad_to_multiple_of=16)
    check_batch(rounded)
    width = batch["input_ids"].shape[1]
    assert rounded["input_ids"].shape[1] == -(-width // 16) * 16
    assert torch.equal(rounded["input_ids"][:, :width], batch["input_ids"])
    hf = to_hf_batch(batch)
    assert hf["labels"][:, 0].eq(IGNORE_INDEX).all()
    assert torch.equal(hf["labels"][:, 1:], batch["targets"][:, :-1])
    packed = sft_batches(docs, batch_size=7, seq_len=500, pad_id=tok.pad_id)[0]
    with pytest.raises(ValueError, match="packed rows"):
        to_hf_batch(packed)


# ------------------------------------------------------------------ shuffling and splits
def test_shuffle_and_eval_split_are_deterministic_by_seed(tok):
    path = sample_path("instruction")
    a = build_sft_data(SFTDataConfig(path, seed=3, eval_split=0.1, max_seq_length=256), tok)
    b = build_sft_data(SFTDataConfig(path, seed=3, eval_split=0.1, max_seq_length=256), tok)
    c = build_sft_data(SFTDataConfig(path, seed=4, eval_split=0.1, max_seq_length=256), tok)
    key = lambda docs: [tuple(d.input_ids) for d in docs]
    assert key(a.train) == key(b.train) and key(a.eval) == key(b.eval)
    assert key(a.train) != key(c.train)
    assert len(a.eval) == 21 and a.stats.eval_examples == 21 and a.stats.train_examples == 192
    assert sorted(key(a.train) + key(a.eval)) == sorted(key(c.train) + key(c.eval))
    batches = lambda seed: sft_batches(a.train, batch_size=4, seq_len=256, pad_id=tok.pad_id,
                                       shuffle_seed=seed)
    first, again, other = batches(11), batches(11), batches(12)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, again))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, other))
    counted = build_sft_data(SFTDataConfig(path, eval_split=5, max_samples=30), tok)
    assert (counted.stats.rows_read, len(counted.train), len(counted.eval)) == (30, 25, 5)
    with pytest.raises(ValueError, match="leaves none"):
        build_sft_data(SFTDataConfig(path, eval_split=30, max_samples=30), tok)
    # several sources: max_samples draws from all of them together, at random by seed
    sources = [sample_path("text"), path]
    everything = build_sft_data(SFTDataConfig(sources), tok)
    pool = [tuple(d.input_ids) for d in everything.train]
    both = build_sft_data(SFTDataConfig(sources, max_samples=150, seed=3), tok)
    assert both.stats.rows_read == 150 and both.stats.examples == 150
    drawn = [tuple(d.input_ids) for d in both.train]
    assert all(pool.count(d) >= drawn.count(d) for d in set(drawn))        # a sub-multiset
    raw_text = sum(d.num_targets == len(d) - 1 for d in both.train)        # from the text file
    assert 0 < raw_text < 150
    again = build_sft_data(SFTDataConfig(sources, max_samples=150, seed=3), tok)
    other = build_sft_data(SFTDataConfig(sources, max_samples=150, seed=4), tok)
    assert key(again.train) == key(both.train) and sorted(key(other.train)) != sorted(drawn)


# ------------------------------------------------------------------ file formats
def _writesample_rows(directory, rows, name="rows.jsonl"):
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _write(tmp_path, fmt, rows):
    path = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        return _writesample_rows(str(tmp_path), rows, path.name)
    if fmt == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "csv"])
def test_every_file_format_gives_the_same_documents(tok, tmp_path, fmt):
    shapes = ["instruction", "text"] + ([] if fmt == "csv" else ["chat"])   # CSV holds flat rows
    for shape in shapes:
        rows = sample_rows(shape)[:23]
        expected = _docs(tok, shape, rows, max_seq_length=300)
        path = _write(tmp_path, fmt, rows)
        data = build_sft_data(SFTDataConfig(path, max_seq_length=300), tok)
        assert data.stats.rows_read == 23
        got = sorted(tuple(d.input_ids) for d in data.train)
        assert got == sorted(tuple(d.input_ids) for d in expected), (fmt, shape)


def test_unreadable_sources_give_clear_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_sft_data(SFTDataConfig(str(tmp_path / "missing.jsonl")), tok)
    for missing in (str(tmp_path / "no_folder"), "./not/here", "~/nowhere"):
        with pytest.raises(FileNotFoundError, match="no such file or folder"):
            build_sft_data(SFTDataConfig(missing), tok)
    odd = tmp_path / "rows.txt"
    odd.write_text("hello")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'"):
        build_sft_data(SFTDataConfig(str(odd)), tok)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "uno"}\n{"text": "due"}\n{"text": "tre\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: row 3: not valid JSON"):
        build_sft_data(SFTDataConfig(str(broken)), tok)
    array = tmp_path / "array.json"
    array.write_text('[\n{"text": "uno"},\n{"text": "due"}\n{"text": "tre"}\n]\n')
    with pytest.raises(ValueError, match=r"array\.json: line 4: not valid JSON"):
        build_sft_data(SFTDataConfig(str(array)), tok)
    columns = _writesample_rows(str(tmp_path), [{"question": "a", "answer": "b"}], "columns.jsonl")
    with pytest.raises(ValueError, match="cannot tell the row shape"):
        build_sft_data(SFTDataConfig(columns), tok)
    dpo = sample_path("dpo")
    with pytest.raises(ValueError, match="holds dpo rows"):
        build_sft_data(SFTDataConfig(dpo), tok)


# ------------------------------------------------------------------ malformed rows
GOOD = {
    "instruction": {"system": "", "instruction": "Ciao?", "input": "", "output": "Ciao!"},
    "chat": {"messages": [{"role": "user", "content": "Ciao?"}, {"role": "assistant", "content": "Ciao!"}]},
    "text": {"text": "Una frase."},
}
MALFORMED = [
    ("instruction", {"system": "", "input": "", "output": "x"}, "missing field 'instruction'"),
    ("instruction", {"system": "", "instruction": "a", "input": ""}, "missing field 'output'"),
    ("instruction", {"system": "", "instruction": "a", "input": "", "output": 5}, "'output' must be a string, got int"),
    ("instruction", {"system": 3, "instruction": "a", "input": "", "output": "x"}, "'system' must be a string"),
    ("instruction", {"system": "", "instruction": "a", "input": "", "output": "  "}, "'output' is empty"),
    ("chat", {"messages": "ciao"}, "'messages' must be a list"),
    ("chat", {"messages": []}, "empty list of messages"),
    ("chat", {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, r"messages\[1\]: role"),
    ("chat", {"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}, r"messages\[0\]: content must be a string"),
    ("chat", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}, "no non-empty assistant"),
    ("chat", {"messages": [{"role": "user", "content": "a"}]}, "no non-empty assistant"),
    ("text", {"text": None}, "missing field 'text'"),
    ("text", {"text": 12}, "'text' must be a string"),
    ("text", {"text": ""}, "'text' is empty"),
]


@pytest.mark.parametrize("shape,bad,problem", MALFORMED)
def test_malformed_row_error_names_file_and_row(tok, tmp_path, shape, bad, problem):
    rows = [GOOD[shape], GOOD[shape], bad, GOOD[shape]]
    path = _writesample_rows(str(tmp_path), rows, "bad.jsonl")
    with pytest.raises(BadRowError, match=rf"bad\.jsonl: row 3: .*{problem}") as info:
        build_sft_data(SFTDataConfig(path), tok)
    assert isinstance(info.value, ValueError) and info.value.row_number == 3
    skipped = build_sft_data(SFTDataConfig(path, skip_bad_rows=True), tok)
    s = skipped.stats
    assert (s.rows_read, s.skipped_bad_rows, s.examples) == (4, 1, 3)
    assert "row 3" in s.bad_row_examples[0]


def test_skip_bad_rows_counts_every_bad_row(tok, tmp_path):
    rows = []
    for i in range(12):
        rows.append(GOOD["instruction"] if i % 4 else {"instruction": "a", "output": ""})
    path = _write(tmp_path, "parquet", rows)
    with pytest.raises(BadRowError, match=r"rows\.parquet: row 1: "):
        build_sft_data(SFTDataConfig(path), tok)
    data = build_sft_data(SFTDataConfig(path, skip_bad_rows=True), tok)
    assert (data.stats.skipped_bad_rows, data.stats.examples) == (3, 9)
    assert "skipped (malformed) 3" in data.stats.summary()


def test_csv_cells_stay_text(tok, tmp_path):
    """A CSV column of digits is still text (not numbers rejected as the wrong type)."""
    rows = [{"instruction": "Scrivi in cifre.", "input": "quattordici", "output": "14"},
            {"instruction": "Scrivi in cifre.", "input": "venti", "output": "20"}]
    data = build_sft_data(SFTDataConfig(_write(tmp_path, "csv", rows)), tok)
    assert sorted(tok.decode([t for t in d.targets if t != IGNORE_INDEX]) for d in data.train) == \
           ["14" + EOT, "20" + EOT]
