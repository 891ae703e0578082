"""Data errors always name file, row and reason (encoding, JSON, empty files
included); --skip-bad-rows covers every per-row problem and the run summary
shows the first skipped rows; DPO pairs whose chosen equals rejected after
templating are counted and skipped with a warning."""
from __future__ import annotations

import json

import pytest
import torch

from anita_core.assets import TOKENIZER_DIR
from anita_core.data import (BadRowError, DPODataConfig, SFTDataConfig, build_dpo_data,
                             build_sft_data, load_tokenizer)
from anita_core.recipes.session import build_data_or_report
from tests.run_cli import TINY, run_script

GOOD = {"instruction": "Dimmi un colore.", "input": "", "output": "Blu."}


def mixed_file(tmp_path):
    """Rows 2, 3 and 4 are bad in three different ways."""
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(GOOD).encode(),
             '{"instruction": "Caff\u00e8?", "output": "S\u00ec."}'.encode("latin-1"),   # not UTF-8
             b'{"instruction": "Saluta.", "output": ',                                  # not JSON
             json.dumps({"instruction": "Conta."}).encode(),                            # no output
             json.dumps({**GOOD, "output": "Rosso."}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER_DIR)


def test_every_row_problem_names_file_row_and_reason(tmp_path, tok):
    path = mixed_file(tmp_path)
    with pytest.raises(BadRowError, match=r"mixed\.jsonl: row 2: not UTF-8 text \(byte 0xe8"):
        build_sft_data(SFTDataConfig(str(path)), tok)
    data = build_sft_data(SFTDataConfig(str(path), skip_bad_rows=True), tok)
    assert data.stats.rows_read == 5 and data.stats.skipped_bad_rows == 3
    assert len(data.train) == 2
    report = data.stats.skipped_rows_report().splitlines()
    assert report[0] == "skipped 3 malformed row(s):"
    assert "row 2: not UTF-8" in report[1] and "row 3: not valid JSON" in report[2]
    assert "row 4: missing field 'output'" in report[3]


def test_blank_lines_do_not_shift_row_numbers_silently(tmp_path, tok):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"instruction": 1' + "\n")
    with pytest.raises(BadRowError, match=r"gaps\.jsonl: row 2: line 3: not valid JSON"):
        build_sft_data(SFTDataConfig(str(path)), tok)


@pytest.mark.parametrize("name,content", [("empty.jsonl", b""), ("blank.json", b"\n  \n"),
                                          ("empty.csv", b""), ("empty.parquet", b"")])
def test_an_empty_file_says_so(tmp_path, tok, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}: empty file \(no rows\)"):
        build_sft_data(SFTDataConfig(str(path)), tok)


def test_encoding_errors_in_whole_file_formats_name_the_line(tmp_path, tok):
    csv_file = tmp_path / "rows.csv"
    csv_file.write_bytes(b"instruction,output\nCiao,Ciao\nCaff\xe8,S\xec\n")
    with pytest.raises(ValueError, match=r"rows\.csv: line 3: not UTF-8 text \(byte 0xe8"):
        build_sft_data(SFTDataConfig(str(csv_file)), tok)
    array = tmp_path / "rows.json"
    array.write_bytes(b'[{"instruction": "Ciao", "output": "Ciao"},\n{"instruction": "Caff\xe8"}]')
    with pytest.raises(ValueError, match=r"rows\.json: line 2: not UTF-8 text"):
        build_sft_data(SFTDataConfig(str(array)), tok)


def test_identical_dpo_pairs_are_counted_skipped_and_warned_about(tmp_path, tok):
    rows = [{"prompt": "Di' ciao.", "chosen": "Ciao!", "rejected": "No."},
            {"prompt": "Di' ciao.", "chosen": "Ciao!", "rejected": "Ciao!"},
            {"prompt": "Conta.", "chosen": " Uno due. ", "rejected": "Uno due."},   # same once templated
            {"prompt": "Conta.", "chosen": "Uno due tre.", "rejected": "Tre."}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logged = []
    data = build_data_or_report(build_dpo_data, DPODataConfig(str(path)), tok, logged.append, "pairs")
    assert data.stats.identical_pairs == 2 and len(data.train) == 2
    assert "skipped (chosen == rejected) 2" in data.stats.summary()
    assert any(m.startswith("warning: 2 preference pair(s) whose chosen and rejected answers are "
                            "the same") for m in logged)


def test_the_run_summary_shows_the_skipped_rows(tmp_path):
    out = tmp_path / "run"
    proc = run_script("train_sft.py", *TINY, "--max-steps", 1, "--data", mixed_file(tmp_path),
                      "--skip-bad-rows", "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = proc.stderr[proc.stderr.index("train loss:"):]
    assert "skipped 3 malformed row(s):" in summary
    for reason in ("row 2: not UTF-8", "row 3: not valid JSON", "row 4: missing field 'output'"):
        assert reason in summary, reason


def undecodable(tmp_path, kind: str, suffix: str, seed: int):
    """A file under a JSON name that is not JSON lines at all."""
    path = tmp_path / f"{kind}{suffix}"
    if kind == "random":
        # random bytes, led by 0xff (never UTF-8) so that row 1 is the first bad one
        path.write_bytes(b"\xff" + torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(seed),
                                                 dtype=torch.uint8).numpy().tobytes())
    elif kind == "latin1":
        path.write_bytes("istruzione: perché?\nrisposta: così\n".encode("latin-1"))
    else:
        path.write_text("instruction,output\nCiao,Ciao\n")          # CSV under a JSON name
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("kind,reason", [("random", r"not UTF-8 text \(byte 0xff at column 1: invalid start byte\)"),
                                         ("latin1", r"not UTF-8 text \(byte 0xe9 at column 18: "),
                                         ("csv", r"not valid JSON \(Expecting value\)")])
def test_a_file_that_is_not_json_lines_is_refused_at_its_first_row(tmp_path, tok, fresh_seed,
                                                                    kind, reason, suffix):
    path = undecodable(tmp_path, kind, suffix, fresh_seed)
    for max_samples in (None, 1000):          # read whole, and streamed (--max-samples)
        with pytest.raises(BadRowError, match=rf"^{path}: row 1: {reason}"):
            build_sft_data(SFTDataConfig(str(path), max_samples=max_samples), tok)
        with pytest.raises(BadRowError, match=r"no row of this file is readable: --skip-bad-rows skips "
                                              r"rows, not files\)$"):
            build_sft_data(SFTDataConfig(str(path), max_samples=max_samples, skip_bad_rows=True), tok)


def test_a_gzip_name_on_bytes_that_are_not_gzip_is_one_error(tmp_path, tok):
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(b"\x00not gzip at all\n")
    with pytest.raises(ValueError, match=rf"^{path}: not a readable gzip file \(BadGzipFile: "):
        build_sft_data(SFTDataConfig(str(path), max_samples=10), tok)


@pytest.mark.parametrize("script,case", [("train_sft.py", "random bytes"), ("train_dpo.py", "random bytes"),
                                         ("train_sft.py", "row 3 not JSON")])
def test_the_scripts_refuse_an_undecodable_file_in_one_line_before_the_model_loads(tmp_path, fresh_seed,
                                                                                  script, case):
    """Nothing printed before the line: not the base model's, nor `datasets`' own ERROR log
    ("Failed to load JSON from file ... pyarrow.lib.ArrowInvalid"), which it writes when it
    reads the whole file and meets a bad row (the row-3 case) before anita's reader takes over."""
    if case == "random bytes":
        path = undecodable(tmp_path, "random", ".jsonl", fresh_seed)
        expected = f"error: {path}: row 1: not UTF-8 text (byte 0xff at column 1: invalid start byte)"
    else:
        path = tmp_path / "rows.jsonl"
        path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\nnot JSON\n")
        expected = f"error: {path}: row 3: not valid JSON (Expecting value)"
    proc = run_script(script, "--no-progress", "--data", path, "--output-dir", tmp_path / "run", timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == expected
