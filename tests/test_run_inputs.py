"""The folders a user hands the trainers are checked before anything expensive (the
base model's tensors, the data's tokenization, the output folder): one line naming
the flag, the file and what is wrong, exit code 2, and no output folder left. A model
folder without a tokenizer is an error unless --tokenizer names one."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import train_dpo
import train_sft
from anita_core.assets import TOKENIZER_DIR
from anita_core.lora import LoRAAdapters, LoRAConfig, save_peft
from anita_core.model.config import ModelConfig
from anita_core.cli.common import BUNDLED_MODEL
from tests.model_factory import make_tiny_llama_dir

FAST = ["--max-steps", "1", "--batch-size", "2", "--no-progress", "--eval-split", "0",
        "--max-samples", "8"]


def model_without(tmp_path: Path, *missing: str) -> Path:
    """The bundled tiny model's folder without the files named."""
    folder = tmp_path / "model"
    shutil.copytree(BUNDLED_MODEL, folder)
    for name in missing:
        (folder / name).unlink()
    return folder


def refusal(main, argv, capsys) -> str:
    """The one line a refused command prints (exit code 2, before the model loads)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "base model /" not in err, err   # "base model DIR: ..." when loaded
    return err.strip()


def test_a_model_folder_without_a_tokenizer_is_refused_unless_one_is_named(tmp_path, capsys):
    folder = model_without(tmp_path, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    out = tmp_path / "run"
    for main in (train_sft.main, train_dpo.main):
        err = refusal(main, ["--model", str(folder), "--output-dir", str(out), *FAST], capsys)
        assert err == (f"error: --model {folder}: no tokenizer.json there; name this model's "
                       "tokenizer with --tokenizer DIR (anita does not guess one)")
        assert not out.exists()
    assert train_sft.main(["--model", str(folder), "--tokenizer", TOKENIZER_DIR, "--output-dir", str(out),
                           *FAST]) == 0
    assert "vocab 1024" in capsys.readouterr().err


def test_a_tokenizer_whose_ids_do_not_fit_the_model_is_refused(tmp_path, capsys):
    ckpt = make_tiny_llama_dir(tmp_path)              # vocab_size 131; the bundled tokenizer has 1,024
    capsys.readouterr()
    err = refusal(train_sft.main, ["--model", str(ckpt), "--tokenizer", TOKENIZER_DIR,
                                   "--output-dir", str(tmp_path / "run"), *FAST], capsys)
    assert err == (f"error: --tokenizer {TOKENIZER_DIR}: its 1,024 token ids do not fit the model's 131 "
                   f"embedding rows ({ckpt / 'config.json'}: vocab_size); the tokenizer of another model?")


def test_a_damaged_tokenizer_is_named_in_anitas_words(tmp_path, capsys):
    folder = model_without(tmp_path)
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    err = refusal(train_sft.main, ["--model", str(folder), "--output-dir", str(tmp_path / "run"), *FAST],
                  capsys)
    assert err.startswith(f"error: --model {folder}: {folder / 'tokenizer.json'}: not a tokenizer the "
                          "`tokenizers` library reads (")
    (folder / "tokenizer.json").write_bytes((Path(BUNDLED_MODEL) / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_bytes(b"\xff\xfe{}")
    err = refusal(train_sft.main, ["--model", str(folder), "--output-dir", str(tmp_path / "run"), *FAST],
                  capsys)
    assert err.startswith(f"error: --model {folder}: {folder / 'tokenizer_config.json'}: not valid JSON (")


def test_a_model_folder_without_config_is_refused_before_the_data_is_read(tmp_path, capsys):
    folder = model_without(tmp_path, "config.json")
    err = refusal(train_sft.main, ["--model", str(folder), "--output-dir", str(tmp_path / "run"), *FAST],
                  capsys)
    assert err == (f"error: --model {folder}: {folder / 'config.json'}: missing (not a model folder: it "
                   "holds config.json and safetensors)")
    assert not (tmp_path / "run").exists()


def test_weights_that_disagree_with_the_config_are_refused_from_the_headers(tmp_path, capsys):
    folder = model_without(tmp_path)
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    err = refusal(train_sft.main, ["--model", str(folder), "--output-dir", str(tmp_path / "run"), *FAST],
                  capsys)
    assert err == (f"error: --model {folder}: {folder / 'model.safetensors'}: tensor "
                   f"'model.layers.2.input_layernorm.weight' is missing (expected by "
                   f"{folder / 'config.json'})")


def test_init_adapter_is_checked_before_the_model_loads(tmp_path, capsys):
    out = tmp_path / "run"
    not_adapter = tmp_path / "notes"
    not_adapter.mkdir()
    (not_adapter / "x.txt").write_text("hi")
    err = refusal(train_sft.main, ["--init-adapter", str(not_adapter), "--output-dir", str(out), *FAST],
                  capsys)
    assert err == (f"error: --init-adapter {not_adapter}: {not_adapter / 'adapter_config.json'} is "
                   "missing (not a PEFT adapter folder)")
    # an adapter of another model: its shapes, from the file's header
    bundled = ModelConfig.from_json(BUNDLED_MODEL)
    other = ModelConfig(**{**{k: getattr(bundled, k) for k in ("vocab_size", "intermediate_size",
                                                               "num_hidden_layers", "num_attention_heads",
                                                               "num_key_value_heads")},
                           "hidden_size": 2 * bundled.hidden_size, "head_dim": 2 * bundled.head_dim})
    adapter = save_peft(LoRAAdapters.init(LoRAConfig(r=2, alpha=4), other), tmp_path / "other")
    for main, flag in ((train_sft.main, "--init-adapter"), (train_dpo.main, "--reference-adapter")):
        err = refusal(main, [flag, str(adapter), "--output-dir", str(out), *FAST], capsys)
        assert err.startswith(f"error: {flag} {adapter}: {adapter / 'adapter_model.safetensors'}: key ")
        assert err.endswith("an adapter for a different base model?")
    assert not out.exists()


def test_what_the_fuzzer_found_in_config_json_is_one_line(tmp_path, capsys):
    """A number past a float's range (an OverflowError before); a value quoted in full
    (4,000 digits) shortened."""
    folder = model_without(tmp_path)
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": ' + "9" * 400))
    err = refusal(train_sft.main, ["--model", str(folder), "--output-dir", str(tmp_path / "run"), *FAST],
                  capsys)
    assert err == (f"error: --model {folder}: {folder / 'config.json'}: field 'rms_norm_eps' is a number too "
                   "large (400 digits)")
    (folder / "config.json").write_text(config.replace('"vocab_size": 1024', '"vocab_size": "' + "x" * 4000 + '"'))
    err = refusal(train_sft.main, ["--model", str(folder), "--output-dir", str(tmp_path / "run"), *FAST],
                  capsys)
    assert err.startswith(f"error: --model {folder}: {folder / 'config.json'}: field 'vocab_size' must be an "
                          "integer, got 'xxx") and len(err) < 600
