"""Hostile data lines and templates, each case the issue found: one bad row, said in
anita's words with its file and row (exit code 2 through the CLI), never an exception
of the json module, the tokenizer or Jinja; and the resource bounds (a line's length,
nesting depth, a template's rendering) hold."""
from __future__ import annotations

import json
import time

import pytest

import train_sft
from anita_core.assets import TOKENIZER_DIR
from anita_core.data import BadRowError, DataStats, load_tokenizer
from anita_core.data import chat_template, table
from anita_core.data.chat_template import ChatTemplateError, render
from anita_core.data.loading import read_rows

GOOD = '{"instruction": "a", "input": "", "output": "b"}\n'
FAST = ["--max-steps", "1", "--batch-size", "2", "--no-progress", "--eval-split", "0"]


def first_problem(path) -> str:
    with pytest.raises(BadRowError) as e:
        read_rows(str(path), stats=DataStats())
    return str(e.value)


CASES = {   # name -> (file bytes, the message after "<file>: ")
    "nested 100,000 deep": (GOOD + "[" * 100_000 + "]" * 100_000 + "\n",
                            "row 2: nested 100,000 levels deep (a row may nest at most 100)"),
    "a lone surrogate": (GOOD + '{"instruction": "\\ud800", "input": "", "output": "b"}\n',
                         "row 2: field 'instruction' holds a lone surrogate escape (half of a UTF-16 "
                         "pair, no text: was the text cut between the halves of a character?)"),
    "a surrogate in a message": (
        '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\\uDFFF!"}]}\n',
        "row 1: field 'messages'[1]['content'] holds a lone surrogate escape"),
    "5,000 digits": (GOOD + '{"instruction": "a", "output": "b", "n": ' + "9" * 5000 + "}\n",
                     "row 2: a number of 5,000 digits (at most 4,300 are read)"),
    "binary bytes": (bytes(range(256)) * 40, "row 1: not valid JSON (Expecting value)"),
    "a UTF-16 file": ('{"text": "ciao"}\n'.encode("utf-16"),
                      "row 1: not UTF-8 text (byte 0xff at column 1: invalid start byte)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_hostile_line_is_one_bad_row_in_anitas_words(tmp_path, case):
    content, message = CASES[case]
    path = tmp_path / "data.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert first_problem(path).startswith(f"{path}: {message}")


def test_a_valid_surrogate_pair_and_a_doubled_backslash_are_text(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "\\ud83d\\ude00 and \\\\ud800"}\n')
    rows = read_rows(str(path), stats=DataStats())
    assert rows == [("text", {"text": "\U0001F600 and \\ud800"})]


def test_a_line_past_the_bound_is_one_bad_row_and_the_next_line_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(table, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "data.jsonl"
    path.write_text(GOOD + '{"text": "' + "x" * 5000 + '"}\n' + '{"text": "ok"}\n')
    problems = [p for _, p in enumerate(table.file_rows(str(path)))]
    assert [n for n, _ in problems] == [1, 2, 3]
    assert str(problems[1][1]) == ("a line longer than 1,000 bytes (one JSON line is one row: is this a "
                                   "JSON-lines file?)")
    assert problems[2][1] == b'{"text": "ok"}\n'
    stats = DataStats()
    read_rows(str(path), stats=stats, shape="text", skip_bad_rows=True)
    assert stats.skipped_bad_rows == 2          # the long line, and the instruction row (no text)


def test_a_json_array_file_gets_the_same_bounds(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("[" + "[" * 150 + "]" * 150 + "]")
    with pytest.raises(ValueError, match=r"data\.json: nested 150 levels deep \(a row may nest "
                                         r"at most 100\)"):
        read_rows(str(path), stats=DataStats())
    path.write_text('[{"text": "ok"},\n {"text": "\\udc80"}]')
    assert first_problem(path) == (f"{path}: row 2: field 'text' holds a lone surrogate escape (half of a "
                                   "UTF-16 pair, no text)")
    path.write_text('[{"text": "ok"},\n {"text": ' + "1" * 4500 + "}]")
    with pytest.raises(ValueError, match=r"data\.json: a number of 4,500 digits"):
        read_rows(str(path), stats=DataStats())


def test_a_csv_field_past_the_bound_names_the_line(tmp_path, monkeypatch):
    monkeypatch.setattr(table, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "data.csv"
    path.write_text("text\nok\n" + "x" * 2000 + "\n")
    with pytest.raises(ValueError, match=r"data\.csv: line 3: not valid CSV \(field larger than field "
                                         r"limit \(1000\)\)"):
        read_rows(str(path), stats=DataStats())


def test_the_cli_names_file_and_row_for_each_case(tmp_path, capsys):
    for case in ("nested 100,000 deep", "a lone surrogate", "5,000 digits", "binary bytes"):
        content, message = CASES[case]
        path = tmp_path / "data.jsonl"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        out = tmp_path / "run"
        assert train_sft.main(["--data", str(path), "--output-dir", str(out), *FAST]) == 2
        err = capsys.readouterr().err
        assert f"error: {path}: {message}" in err and "Traceback" not in err, err
        assert not out.exists(), "a refused run leaves no folder behind"


MESSAGES = [{"role": "user", "content": "ciao"}]


@pytest.mark.parametrize("source,reason", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "asked range() for more than 1,000,000 items"),
    ("{{ 'a' * 10**9 }}", "would repeat a value to more than 67,108,864 items"),
    ("{{ 2 ** 100000 }}", "would raise 2 to the power 100000"),
    ("{{ 'a'|center(10**9) }}", "gave a filter the argument 1,000,000,000"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "would join values into more than 67,108,864 items"),
    ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "RecursionError"),
    ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
    ("{{ messages + 1 }}", "TypeError"),
    ("{{ '\\ud800' }}", None),
])
def test_a_template_bomb_or_error_is_a_chat_template_error(source, reason):
    started = time.perf_counter()
    with pytest.raises(ChatTemplateError) as e:
        render(source, MESSAGES, {})
    assert time.perf_counter() - started < 5
    if reason is None:
        assert str(e.value) == ("the chat template wrote a lone surrogate U+D800 at character 1 (no text "
                                "UTF-8 can write)")
    else:
        assert str(e.value).startswith("the chat template failed: ") and reason in str(e.value)


def test_a_rendering_past_its_time_or_output_is_stopped(monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", 0.2)
    slow = "{% for i in range(900) %}{% for j in range(900) %}{{ messages[0].role }}{% endfor %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="the rendering took more than 0.2 s"):
        render(slow, MESSAGES, {})
    monkeypatch.setattr(chat_template, "MAX_RENDER_CHARS", 1000)
    with pytest.raises(ChatTemplateError, match="wrote more than 1,000 characters"):
        render("{% for i in range(300) %}{{ messages[0].content }}{% endfor %}", MESSAGES, {})
    assert render("{{ messages[0].content }}", MESSAGES, {})[0] == "ciao"


def test_the_tokenizer_names_a_text_it_refuses():
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    with pytest.raises(ValueError, match=r"^text 2 of 2 holds a lone surrogate U\+DC80 at character 3 "):
        tokenizer.encode_batch(["ok", "ab\udc80"])
    assert json.dumps(tokenizer.encode("ok")) == json.dumps(tokenizer.encode_batch(["ok"])[0])
