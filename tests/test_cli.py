"""train_sft.py / train_dpo.py as a user meets them: --help, bad input, a short run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import train_dpo
import train_sft
from tests.model_factory import make_tiny_llama_dir

FAST = ["--max-steps", "2", "--batch-size", "2", "--no-progress", "--eval-split", "0"]


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        train_sft.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--preset", "--model", "--data", "--lora-r", "--learning-rate", "--resume",
                 "--skip-bad-rows", "--max-seq-length", "--merge-export"):
        assert flag in out
    assert "(default: 0.005)" in out            # the demo preset's learning rate
    with pytest.raises(SystemExit):
        train_dpo.main(["--preset", "dpo", "--help"])
    out = capsys.readouterr().out
    assert "(default: 5e-05)" in out and "--beta" in out and "--exclude-sources" in out


def test_malformed_row_names_file_and_row_or_is_skipped_and_counted(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    rows = [{"instruction": "Dimmi un colore.", "input": "", "output": "Blu."},
            {"instruction": "Conta fino a tre.", "input": ""},                       # no output
            {"instruction": "Saluta.", "input": "", "output": "Ciao!"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code = train_sft.main(["--data", str(data), "--output-dir", str(tmp_path / "run"), *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "row 2" in err and "output" in err

    code = train_sft.main(["--data", str(data), "--skip-bad-rows", "--max-seq-length", "32",
                           "--output-dir", str(tmp_path / "run2"), *FAST])
    assert code == 0
    err = capsys.readouterr().err
    assert "rows read 3; skipped (malformed) 1;" in err
    assert (tmp_path / "run2" / "adapter" / "adapter_model.safetensors").is_file()


def test_missing_model_directory_is_a_clear_error(tmp_path, capsys):
    for main, script in ((train_sft.main, "train_sft.py"), (train_dpo.main, "train_dpo.py")):
        with pytest.raises(SystemExit) as e:
            main(["--model", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "run"), *FAST])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"{script}: error: argument --model: {tmp_path / 'nowhere'}: no such "
                       "model directory (and not a hub name owner/name)",
                       f"({script} --help lists every flag and its default)"]
        assert not (tmp_path / "run").exists()          # stopped before the output folder


def test_help_shows_each_default_once(capsys):
    for main in (train_sft.main, train_dpo.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "(default: runs/<script>-<preset>, runs/ being $ANITA_RUNS_DIR when set)" in out
        assert "(default: None)" not in out
        assert "--threads N" in out


def test_threads_flag_sets_torch_threads(tmp_path):
    import torch
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code = train_sft.main(["--threads", "1", "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
                               "--batch-size", "2", "--no-progress", "--eval-split", "0"])
        assert code == 0 and torch.get_num_threads() == 1
        with pytest.raises(SystemExit) as e:
            train_dpo.main(["--threads", "0"])
        assert e.value.code == 2
    finally:
        torch.set_num_threads(before)


def test_model_of_another_architecture_is_a_clear_error(tmp_path, capsys):
    ckpt = make_tiny_llama_dir(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(model_type="gemma", architectures=["GemmaForCausalLM"])
    (ckpt / "config.json").write_text(json.dumps(config))
    capsys.readouterr()                 # the factory's progress bar
    with pytest.raises(SystemExit) as e:
        train_sft.main(["--model", str(ckpt), "--output-dir", str(tmp_path / "run"), *FAST])
    assert e.value.code == 2           # bad input, as every other refusal
    err = capsys.readouterr().err
    assert err.strip() == (f"error: --model {ckpt}: {ckpt / 'config.json'}: field 'model_type' is "
                           "'gemma'; supported families: llama, mistral, qwen2, qwen3")
    assert not (tmp_path / "run").exists()      # refused before the output folder is made


def test_an_existing_merge_export_folder_is_refused_before_the_model_loads(tmp_path, capsys):
    taken = tmp_path / "merged"
    taken.mkdir()
    (taken / "keep.txt").write_text("someone's files")
    with pytest.raises(SystemExit) as e:
        train_sft.main(["--merge-export", str(taken), "--output-dir", str(tmp_path / "run"), *FAST])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --merge-export {taken}: already exists; choose a new directory" in err
    assert "base model" not in err                       # refused before loading
    assert (taken / "keep.txt").read_text() == "someone's files"


def test_dpo_drops_rows_by_source_and_trains(tmp_path, capsys):
    data = Path(train_dpo.__file__).parent / "anita_core" / "assets" / "data" / "dpo_messages.jsonl"
    sources = [json.loads(line)["source"] for line in data.read_text().splitlines()]
    code = train_dpo.main(["--data", str(data), "--exclude-sources", "toxic-dpo",
                           "--output-dir", str(tmp_path / "dpo"), *FAST])
    assert code == 0
    err = capsys.readouterr().err
    assert f"rows read {len(sources)}; filtered by source {sources.count('toxic-dpo')};" in err
    metrics = [json.loads(l) for l in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        assert name in metrics[0], name


def test_sigint_writes_a_checkpoint_and_exits_130(tmp_path):
    """A real Ctrl-C (SIGINT) to a running train_sft.py, once its step 2 is done (a
    chosen point, ANITA_STOP_AT): checkpoint, exit 130, and --resume picks the run up
    from that checkpoint."""
    from tests.run_cli import run_script
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    proc = run_script("train_sft.py", "--max-steps", "200", "--no-progress", "--output-dir", out,
                      stop_at="SIGINT@step:2")
    err = proc.stderr
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: checkpoint of step 2" in err
    from anita_core.train.run_checkpoint import latest_checkpoint, load_checkpoint_state
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None
    steps_done = load_checkpoint_state(checkpoint)["step"]
    assert steps_done == 2

    code = train_sft.main(["--resume", "--max-steps", str(steps_done + 1), "--no-progress",
                           "--output-dir", str(out)])
    assert code == 0
    logged = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if '"loss"' in l]
    assert logged[-1] == steps_done + 1


def test_malformed_json_line_is_reported_once_by_anita(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": bad}\n')
    code = train_sft.main(["--data", str(data), "--output-dir", str(tmp_path / "run"), *FAST])
    assert code == 2
    err = capsys.readouterr().err
    assert f"error: {data}: row 2: not valid JSON (Expecting value)" in err
    assert "pyarrow" not in err and "Failed to load JSON" not in err


def test_generate_module_is_not_a_silent_command():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "anita_core.model.generate"], capture_output=True,
                          text=True, cwd=Path(train_sft.__file__).parent, timeout=300)
    assert done.returncode == 2
    assert "not a command" in done.stderr and "chat.py --model DIR" in done.stderr
