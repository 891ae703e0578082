"""PEFT adapters as PEFT itself writes them: target_modules as full module
paths (what PEFT 0.21 saves for "all-linear" when fewer than 20 modules are
adapted), suffix names, short names, regular expressions and "all-linear",
matched with PEFT's rule; and a PEFT all-linear adapter as --init-adapter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import anita_core  # noqa: F401  (imports triton in the right mode before peft/bnb do)
from anita_core.lora import load_peft
from anita_core.model.config import ModelConfig
from anita_core.model.weights import PROJECTIONS, projection_module_path

# Two layers: PEFT keeps the 14 resolved all-linear names as full paths.
TWO_LAYERS = dict(vocab_size=37, hidden_size=24, intermediate_size=38, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def _peft_adapter(tmp_path, hf_model, seed, **lora_kwargs):
    """A PEFT LoRA adapter saved by PEFT, its LoRA weights moved off their init;
    returns (directory, {(layer, projection): (A, B)} as PEFT holds them)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    peft_model = get_peft_model(hf_model, LoraConfig(r=3, lora_alpha=6, task_type="CAUSAL_LM",
                                                     **lora_kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
    out = tmp_path / "peft"
    peft_model.save_pretrained(str(out))
    n = hf_model.config.num_hidden_layers
    by_path = {projection_module_path(layer, p): (layer, p) for layer in range(n) for p in PROJECTIONS}
    weights = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            weights[by_path[name]] = (module.lora_A["default"].weight.detach().clone(),
                                      module.lora_B["default"].weight.detach().clone())
    return out, weights


def _tiny_hf(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**dict(TWO_LAYERS, **overrides), tie_word_embeddings=False))


def _saved_targets(adapter_dir):
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["target_modules"]


CASES = {
    # (LoraConfig target kwargs, what PEFT must have saved, for the case to be the one named)
    "all-linear, saved as full paths": (
        dict(target_modules="all-linear"),
        lambda saved: isinstance(saved, list) and all(s.startswith("model.layers.") for s in saved)),
    "suffix names": (
        dict(target_modules=["self_attn.q_proj", "mlp.down_proj", "self_attn.v_proj"]),
        lambda saved: sorted(saved) == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]),
    "full paths, one layer": (
        dict(target_modules=["model.layers.1.self_attn.k_proj", "model.layers.1.mlp.up_proj"]),
        lambda saved: sorted(saved) == ["model.layers.1.mlp.up_proj", "model.layers.1.self_attn.k_proj"]),
    "short names with layers_to_transform": (
        dict(target_modules=["o_proj", "gate_proj"], layers_to_transform=[0]),
        lambda saved: sorted(saved) == ["gate_proj", "o_proj"]),
    "regex": (
        dict(target_modules=r".*\.(self_attn\.[qv]|mlp\.down)_proj"),
        lambda saved: isinstance(saved, str)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_loads_with_peft_matching(tmp_path, fresh_seed, case):
    kwargs, saved_as_named = CASES[case]
    out, peft_weights = _peft_adapter(tmp_path, _tiny_hf(), fresh_seed, **kwargs)
    assert saved_as_named(_saved_targets(out)), _saved_targets(out)
    adapters = load_peft(out, ModelConfig(**TWO_LAYERS))
    assert sorted(adapters.adapted()) == sorted(peft_weights)
    assert adapters.scale == 6 / 3
    for where, (a, b) in peft_weights.items():
        got_a, got_b = adapters.get(*where)
        assert torch.equal(got_a, a) and torch.equal(got_b, b), where


BAD_TARGETS = {
    "suffix of a non-projection": (["self_attn"], "names 'self_attn'"),
    "partial name": (["proj"], "names 'proj'"),
    "lm_head path": (["model.layers.0.self_attn.q_proj", "lm_head"], "names 'lm_head'"),
    "not a product": (["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"],
                      "different projections in different layers"),
    "layers select nothing": (["model.layers.0.self_attn.q_proj"], "selects no projection",
                              dict(layers_to_transform=[1])),
    "not a string": ([3], "holds 3"),
}


@pytest.mark.parametrize("case", sorted(BAD_TARGETS))
def test_targets_anita_cannot_honour_are_refused(tmp_path, fresh_seed, case):
    targets, message, *extra = BAD_TARGETS[case]
    out, _ = _peft_adapter(tmp_path, _tiny_hf(), fresh_seed, target_modules="all-linear")
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(target_modules=targets, **(extra[0] if extra else {}))
    (out / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"adapter_config.json: field 'target_modules' .*{message}"):
        load_peft(out, ModelConfig(**TWO_LAYERS))


def test_peft_all_linear_adapter_works_as_init_adapter(tmp_path, fresh_seed, capsys):
    """train_dpo.py --init-adapter with an adapter PEFT trained on all-linear:
    after one step at a tiny learning rate the adapter it saves is the one it started from."""
    import train_dpo
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM
    from anita_core.cli.common import BUNDLED_MODEL
    out, _ = _peft_adapter(tmp_path, LlamaForCausalLM.from_pretrained(BUNDLED_MODEL), fresh_seed,
                           target_modules="all-linear", lora_dropout=0.0)
    assert all(s.startswith("model.layers.") for s in _saved_targets(out))
    # one step at a learning rate of 1e-6: AdamW's first update moves each weight by at
    # most lr * (|g| / (|g| + eps) + weight_decay * |w|) <= ~1e-6, so the saved adapter
    # stays within 2e-6 of the PEFT adapter it started from (a fresh one would not)
    code = train_dpo.main(["--init-adapter", str(out), "--learning-rate", "1e-6", "--max-steps", "1",
                           "--batch-size", "2", "--max-samples", "4", "--no-progress",
                           "--eval-split", "0", "--output-dir", str(tmp_path / "dpo")])
    assert code == 0
    assert f"adapter from {out} (r 3)" in capsys.readouterr().err
    started, saved = load_file(str(out / "adapter_model.safetensors")), load_file(
        str(tmp_path / "dpo" / "adapter" / "adapter_model.safetensors"))
    assert sorted(started) == sorted(saved) and len(saved) == 2 * 2 * len(PROJECTIONS)
    for key in saved:
        assert (saved[key] - started[key]).abs().max() <= 2e-6, key
    assert any(started[key].abs().max() > 1e-3 for key in started if "lora_B" in key)
