"""`--template chat`: conversations rendered with the tokenizer's own chat
template, checked against transformers' apply_chat_template (text, ids and
assistant masks) on two tokenizers built here that are not LLaMA-3's: a
byte-level ChatML one laid out like SmolLM2's, and a SentencePiece-style
(Metaspace) one with a Mistral-style [INST] template. Also raw text with the
tokenizer's own BOS/EOS, and the errors for a tokenizer/template mismatch and
for a template that marks no answer."""
from __future__ import annotations

import json

import pytest

from anita_core.assets import TOKENIZER_DIR
from anita_core.data import SFTDataConfig, build_sft_data, documents_from_rows, load_tokenizer
from anita_core.data import templates
from anita_core.data.chat_template import ChatTemplateError, answer_spans, render
from anita_core.data.documents import IGNORE_INDEX
from anita_core.data.rows import CHECKS
from tests.chat_tokenizers import CHATML, CHATML_MARKED, INST, INST_MARKED, Unloadable, chat_model_dir
from tests.chat_tokenizers import write_tokenizer as _write_tokenizer
from tests.helpers import sample_rows


FIXTURES = {"chatml": (CHATML, CHATML_MARKED), "inst": (INST, INST_MARKED)}


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def pair(request, tmp_path_factory):
    """(kind, our tokenizer with the plain template, transformers' tokenizer)."""
    import transformers
    kind = request.param
    folder = _write_tokenizer(tmp_path_factory.mktemp(kind), kind, FIXTURES[kind][0])
    return kind, load_tokenizer(str(folder)), transformers.AutoTokenizer.from_pretrained(str(folder))


def _conversations(kind):
    """Sample chat rows and instruction rows as conversations; for [INST] only
    alternating user/assistant turns (the format has no other roles)."""
    out = [CHECKS["chat"](row)["messages"] for row in sample_rows("chat")]
    for row in sample_rows("instruction")[:40]:
        row = CHECKS["instruction"](row)
        out.append(templates.instruction_messages(row["system"], row["instruction"], row["input"],
                                                  row["output"]))
    out.append([{"role": "user", "content": "  spazi \n"}, {"role": "assistant", "content": "\n ok\t"},
                {"role": "user", "content": "Di nuovo?"}, {"role": "assistant", "content": "Sì."}])
    if kind == "inst":
        out = [m for m in out if all(x["role"] == ("user", "assistant")[i % 2]
                                     for i, x in enumerate(m[1:] if m[0]["role"] == "system" else m))]
    return out


def _documents(tok, conversations, **kwargs):
    rows = [("chat", {"messages": m}) for m in conversations]
    return documents_from_rows(rows, tok, template="chat", **kwargs)


def test_renders_and_masks_like_apply_chat_template(pair):
    kind, tok, hf = pair
    marked = FIXTURES[kind][1]
    conversations = _conversations(kind)
    assert len(conversations) > 50
    documents = _documents(tok, conversations)
    assert len(documents) == len(conversations)
    for messages, doc in zip(conversations, documents):
        text = hf.apply_chat_template(messages, tokenize=False)
        assert templates.render(templates.tokenizer_chat_segments(tok, messages)) == text
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True, chat_template=marked)
        assert doc.input_ids == list(out["input_ids"]), text
        # targets[t] is token t + 1 when that token is an answer token
        expected_targets = [nxt if m else IGNORE_INDEX
                            for nxt, m in zip(out["input_ids"][1:], out["assistant_masks"][1:])]
        assert doc.targets == expected_targets + [IGNORE_INDEX], text
        # and in words: the answers and their end-of-turn token, nothing else
        # (whitespace aside: the Metaspace fixture has no byte fallback for \n, \t)
        answers = "".join(m["content"] + tok.eos_token for m in messages if m["role"] == "assistant")
        learned = tok.decode([t for t in doc.targets if t != IGNORE_INDEX])
        assert "".join(learned.replace("<unk>", "").split()) == "".join(answers.split()), (learned, answers)


def test_generation_blocks_give_transformers_spans(pair):
    kind, tok, hf = pair
    for messages in _conversations(kind)[:30]:
        text, spans = answer_spans(FIXTURES[kind][1], messages, tok.special_tokens)
        assert text == hf.apply_chat_template(messages, tokenize=False, chat_template=FIXTURES[kind][1])
        # the marked template's blocks and the plain template's prefix rule agree
        assert spans == answer_spans(FIXTURES[kind][0], messages, tok.special_tokens)[1]


def test_generation_prompt_and_system_prompt(pair):
    kind, tok, hf = pair
    messages = [{"role": "user", "content": "Qual è la capitale d'Italia?"}]
    text, _ = render(tok.chat_template, messages, tok.special_tokens, add_generation_prompt=True)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    convo = messages + [{"role": "assistant", "content": "Roma."}]
    segments = templates.tokenizer_chat_segments(tok, convo, "Rispondi in breve.")
    with_system = templates.with_system_prompt(convo, "Rispondi in breve.")
    assert templates.render(segments) == hf.apply_chat_template(with_system, tokenize=False)
    assert "Rispondi in breve." in templates.render(segments)


def test_raw_text_uses_the_tokenizers_own_bos_and_eos(pair):
    kind, tok, hf = pair
    text = " Il Po nasce dal Monviso.\n"
    (doc,) = documents_from_rows([("text", {"text": text})], tok)
    expected = hf.bos_token + text + hf.eos_token
    assert doc.input_ids == hf.encode(expected, add_special_tokens=False)
    assert doc.input_ids[0] == hf.bos_token_id and doc.input_ids[-1] == hf.eos_token_id
    assert doc.targets[:-1] == doc.input_ids[1:]


def test_alpaca_uses_the_tokenizers_own_markers(pair):
    kind, tok, hf = pair
    row = {"system": "", "instruction": "Traduci: cane", "input": "", "output": " dog "}
    (doc,) = documents_from_rows([("instruction", row)], tok, template="alpaca")
    prompt = templates.alpaca_prompt("", "Traduci: cane", "")
    assert doc.input_ids == hf.encode(hf.bos_token + prompt + "dog" + hf.eos_token,
                                      add_special_tokens=False)
    assert tok.decode([t for t in doc.targets if t != IGNORE_INDEX]).strip() == "dog" + hf.eos_token


# ------------------------------------------------------------------ errors
def test_llama3_template_on_another_tokenizer_is_a_one_line_error(pair, tmp_path):
    kind, tok, _ = pair
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Ciao"},
                                             {"role": "assistant", "content": "Ciao!"}]}) + "\n")
    for shape in ("chat", "auto"):
        with pytest.raises(ValueError) as e:
            build_sft_data(SFTDataConfig(data=str(data), shape=shape, template="llama3"), tok)
        message = str(e.value)
        assert "\n" not in message
        assert message.startswith(f"{tok.name}: no <|begin_of_text|> token, which --template llama3 needs")
        assert "use --template chat" in message
    # --template chat works on the same file
    built = build_sft_data(SFTDataConfig(data=str(data), template="chat"), tok)
    assert len(built.train) == 1


def test_missing_chat_template_names_the_config_and_a_working_template(tmp_path):
    folder = _write_tokenizer(tmp_path / "tok", "chatml", None)
    tok = load_tokenizer(str(folder))
    with pytest.raises(ValueError) as e:
        templates.check_template(tok, "chat", "instruction")
    assert str(e.value) == (f"{folder / 'tokenizer_config.json'}: no chat_template, which "
                            "--template chat needs; use --template alpaca")
    # a LLaMA-3 tokenizer with its chat template: every template works
    bundled = load_tokenizer(TOKENIZER_DIR)
    for template in templates.TEMPLATES:
        templates.check_template(bundled, template, "chat")


def test_template_without_an_assistant_span_names_the_row(tmp_path):
    # a template that drops assistant turns leaves nothing to learn
    drops_answers = ("{% for message in messages %}{% if message['role'] != 'assistant' %}"
                     "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
                     "{% endif %}{% endfor %}")
    tok = load_tokenizer(str(_write_tokenizer(tmp_path / "tok", "chatml", drops_answers)))
    good = {"messages": [{"role": "user", "content": "Ciao"}, {"role": "assistant", "content": "Ciao!"}]}
    rows = [("chat", good), ("chat", {"messages": [{"role": "user", "content": "Come stai oggi?"},
                                                   {"role": "assistant", "content": "Bene."}]})]
    with pytest.raises(ValueError, match=r"^the rows read: row 1: chat row starting 'Ciao': "
                                         r"the chat template produced no assistant span"):
        documents_from_rows(rows, tok, template="chat")
    # training on all tokens needs no answer span
    docs = documents_from_rows(rows, tok, template="chat", train_on_all_tokens=True)
    assert len(docs) == 2
    # from a file: the file and the row number; --skip-bad-rows skips and counts
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for _, row in rows))
    with pytest.raises(ValueError, match=rf"^{data}: row 1: chat row starting 'Ciao': the chat "
                                         r"template produced no assistant span"):
        build_sft_data(SFTDataConfig(str(data), template="chat"), tok)
    with pytest.raises(ValueError, match=r"no usable examples .* skipped \(malformed\) 2"):
        build_sft_data(SFTDataConfig(str(data), template="chat", skip_bad_rows=True), tok)


def test_template_errors_and_rewrites_name_the_row(tmp_path):
    no_system = ("{% for message in messages %}{% if message['role'] == 'system' %}"
                 "{{ raise_exception('System role not supported') }}{% endif %}"
                 "{{ message['content'] + eos_token }}{% endfor %}")
    tok = load_tokenizer(str(_write_tokenizer(tmp_path / "a", "chatml", no_system)))
    rows = [("chat", {"messages": [{"role": "user", "content": "Ciao"},
                                   {"role": "assistant", "content": "Ciao!"}]})]
    assert len(documents_from_rows(rows, tok, template="chat")) == 1
    with pytest.raises(ValueError, match=r"^the rows read: row 1: .*System role not supported"):
        documents_from_rows(rows, tok, template="chat", system_prompt="Sii breve.")
    # a template that rewrites earlier answers (as templates that drop old reasoning do)
    last_differs = ("{% for message in messages %}"
                    "{% if message['role'] == 'assistant' and not loop.last %}{{ '[...]' }}"
                    "{% else %}{{ message['content'] }}{% endif %}{{ eos_token }}{% endfor %}")
    tok = load_tokenizer(str(_write_tokenizer(tmp_path / "b", "chatml", last_differs)))
    two_turns = rows[0][1]["messages"] * 2
    with pytest.raises(ValueError, match=r"^the rows read: row 1: .*renders message 1 \(assistant\) "
                                         r"differently"):
        documents_from_rows([("chat", {"messages": two_turns})], tok, template="chat")
    # a template that does not write the answer as given
    rewrites = "{% for message in messages %}{{ message['content'] | upper + eos_token }}{% endfor %}"
    tok = load_tokenizer(str(_write_tokenizer(tmp_path / "c", "chatml", rewrites)))
    with pytest.raises(ValueError, match=r"^the rows read: row 1: .*does not write the answer of "
                                         r"message 1"):
        documents_from_rows(rows, tok, template="chat")


def test_templates_run_sandboxed(tmp_path):
    escapes = ["{{ ''.__class__.__mro__[1].__subclasses__() }}",
               "{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns._x }}"]
    for source in escapes:
        with pytest.raises(ChatTemplateError, match="the chat template failed"):
            render(source, [{"role": "user", "content": "x"}], {})
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        render("{% for %}", [], {})


# ------------------------------------------------------------------ the CLI
FAST = ["--max-steps", "1", "--batch-size", "1", "--no-progress", "--eval-split", "0",
        "--max-seq-length", "64", "--max-samples", "6", "--gradient-accumulation-steps", "1"]


def test_cli_checks_the_template_before_the_model_loads_and_trains_with_chat(tmp_path, capsys):
    import train_sft
    from anita_core.assets import sample_path
    ckpt = chat_model_dir(tmp_path)
    with Unloadable(ckpt):
        code = train_sft.main(["--model", str(ckpt), "--data", sample_path("chat"),
                               "--output-dir", str(tmp_path / "bad"), *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert (f"error: {ckpt / 'tokenizer.json'}: no <|begin_of_text|> token, which --template llama3 "
            "needs; use --template chat or --template alpaca") in err
    assert "base model" not in err                               # the model was never loaded
    code = train_sft.main(["--model", str(ckpt), "--data", sample_path("chat"), "--template", "chat",
                           "--output-dir", str(tmp_path / "run"), *FAST])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_chat_template_of_the_bundled_tokenizer_equals_the_llama3_template():
    """The bundled tokenizer's chat_template is LLaMA-3's: rendering with it
    (prefix rule) gives the llama3 template's documents, masks included."""
    tok = load_tokenizer(TOKENIZER_DIR)
    rows = [("chat", CHECKS["chat"](r)) for r in sample_rows("chat")]
    rows += [("instruction", CHECKS["instruction"](r)) for r in sample_rows("instruction")[:60]]
    for system_prompt in (None, "Sei un assistente."):
        by_llama3 = documents_from_rows(rows, tok, template="llama3", system_prompt=system_prompt)
        by_chat = documents_from_rows(rows, tok, template="chat", system_prompt=system_prompt)
        assert [(d.input_ids, d.targets) for d in by_chat] == [(d.input_ids, d.targets) for d in by_llama3]


def test_answer_mask_rule_on_hand_made_offsets():
    """A token is an answer token when its characters overlap an answer span
    (transformers' rule): a token straddling a boundary counts, an empty-range
    token counts only strictly inside a span."""
    from anita_core.data.documents import answer_mask
    offsets = [(0, 3), (3, 5), (5, 5), (5, 8), (8, 8), (8, 10), (10, 12), (12, 14)]
    spans = [(4, 8), (12, 13)]
    assert answer_mask(offsets, spans) == [False, True, True, True, False, False, False, True]
    assert answer_mask(offsets, []) == [False] * len(offsets)
    assert answer_mask([], spans) == []
