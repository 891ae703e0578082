"""Every model family anita reads (Mistral, Qwen2, Qwen3 beside LLaMA) against
transformers' own model class, loaded 4-bit NF4 by bitsandbytes with PEFT LoRA,
on tiny random models built offline from transformers' config classes at odd
sizes (tests/model_factory.FAMILY_EXTRAS): a Mistral window of 5 and a Qwen2
window of 4 on its second layer, both shorter than the 13-token rows; Qwen2's
q/k/v biases with tied embeddings; a Qwen3 head_dim of 32 where hidden / heads
is 16 (not 12, model_factory's default: bitsandbytes' CPU dequantize is wrong when
in_features is a multiple of 16 but not of 64 (test_model_vs_hf), and o_proj's
in_features is heads x head_dim; 4 x 32 = 128 keeps the reference right).

Tolerances are test_model_vs_hf's, for its reasons: both sides hold the same
NF4 bytes and LoRA weights and compute in fp32, so only summation order
differs (~1e-6 relative); 1e-4 of the reference's largest magnitude is a 100x
margin, far below what a missed bias, norm or window moves (>1e-2: checked by
the window and bias tests below, which drop each feature and see the miss).
"""
from __future__ import annotations

import json

import pytest
import torch

from anita_core.hf import load_model
from anita_core.hf.load import check_checkpoint, load_base_weights
from anita_core.lora import LoRAAdapters, LoRAConfig
from anita_core.model.config import ModelConfig
from anita_core.model.families import FAMILIES
from anita_core.model.weights import PROJECTIONS
from tests.helpers import assert_close
from tests.model_factory import (FAMILY_EXTRAS, load_hf_4bit, make_tiny_model_dir,
                                 tiny_family_config, tiny_llama_state_dict)
from tests.test_model_vs_hf import (REFERENCE_SHAPES, REL, _scaled_atol,
                                    check_padded_batch_against_hf, pair_for)

NEW_FAMILIES = ("mistral", "qwen2", "qwen3")
SHAPES = dict(REFERENCE_SHAPES)          # hidden 64, MLP 100, 4 heads / 2 KV heads


def _family_dir(tmp_path, family, **kwargs):
    if family == "qwen3":
        kwargs.setdefault("head_dim", 32)
    return make_tiny_model_dir(tmp_path, family, **SHAPES, **kwargs)


# ------------------------------------------------------------------ config.json
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_config_reads_what_transformers_writes_and_writes_it_back(family):
    from transformers import AutoConfig

    hf = tiny_family_config(family, num_layers=3, **{k: v for k, v in SHAPES.items()
                                                     if k != "num_heads" and k != "num_kv_heads"})
    d = hf.to_dict()
    d["architectures"] = [FAMILIES[family].architecture]
    ours = ModelConfig.from_dict(d, source="config.json")
    assert ours.model_type == family
    assert ours.head_dim == hf.head_dim
    assert ours.qkv_bias == (family == "qwen2")
    assert ours.qk_norm == (family == "qwen3")
    if family == "mistral":
        expected = (hf.sliding_window,) * 3
    elif getattr(hf, "use_sliding_window", False):
        expected = tuple(hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types)
    else:
        expected = (None,) * 3
    assert ours.windows == expected
    back = AutoConfig.for_model(**ours.to_hf_dict())
    assert type(back) is type(hf)
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "tie_word_embeddings", "sliding_window"):
        assert getattr(back, name) == getattr(hf, name), name
    assert getattr(back, "layer_types", None) == getattr(hf, "layer_types", None)
    assert ModelConfig.from_dict(ours.to_hf_dict(), source="written") == ours


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gemma"}, "model_type"),
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"sliding_window": 0}, "sliding_window"),
])
def test_bad_family_config_is_one_line_naming_the_field(change, field):
    d = tiny_family_config("qwen3").to_dict()
    d["architectures"] = ["Qwen3ForCausalLM"]
    if field == "sliding_window":
        d["use_sliding_window"] = True
    d.update(change)
    with pytest.raises(ValueError) as error:
        ModelConfig.from_dict(d, source="cfg.json")
    message = str(error.value)
    assert "\n" not in message and message.startswith("cfg.json: field ") and field in message
    if field == "model_type":
        assert all(name in message for name in FAMILIES)


# ------------------------------------------------------------------ loading
@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_loads_full_precision_and_sharded_checkpoints(tmp_path, family, shard):
    ckpt = _family_dir(tmp_path, family, max_shard_size=shard)
    if shard is not None:
        assert (ckpt / "model.safetensors.index.json").is_file()
    stored = tiny_llama_state_dict(ckpt)
    config, base = load_base_weights(ckpt, progress=False)
    for i, layer in enumerate(base.layers):
        prefix = f"model.layers.{i}.self_attn"
        for p in ("q_proj", "k_proj", "v_proj"):
            if config.qkv_bias:
                assert torch.equal(layer.biases[p], stored[f"{prefix}.{p}.bias"])
            else:
                assert p not in layer.biases
        for n in ("q_norm", "k_norm"):
            got = getattr(layer, n)
            if config.qk_norm:
                assert torch.equal(got, stored[f"{prefix}.{n}.weight"])
            else:
                assert got is None


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_loads_prequantized_bnb_4bit_checkpoints(tmp_path, family):
    """transformers + bitsandbytes save_pretrained of a 4-bit model: the NF4 bytes
    anita reads are bnb's, and the family's dense extras come through."""
    src = _family_dir(tmp_path, family)
    hf = load_hf_4bit(src)
    out = tmp_path / "bnb"
    hf.save_pretrained(out)
    config, base = load_base_weights(out, progress=False)
    full = load_model(src, progress=False)
    for i, (a, b) in enumerate(zip(base.layers, full.base.layers)):
        for p in PROJECTIONS:
            assert torch.equal(a.projections[p].packed, b.projections[p].packed), (i, p)
        assert a.biases.keys() == b.biases.keys()
        for p in a.biases:
            assert torch.equal(a.biases[p], b.biases[p])
        for n in ("q_norm", "k_norm"):
            x, y = getattr(a, n), getattr(b, n)
            assert (x is None and y is None) or torch.equal(x, y)


def test_a_family_tensor_missing_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = _family_dir(tmp_path, "qwen2")
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias' is missing"):
        check_checkpoint(ckpt)


# ------------------------------------------------------- the model vs transformers
def _build_pair(tmp_path, family, targets=PROJECTIONS, seed=0):
    ckpt = _family_dir(tmp_path, family, seed=seed)
    lora_config = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=tuple(targets), seed=seed)
    model, hf = pair_for(ckpt, lora_config)
    return model, hf, ckpt


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_logits_loss_and_lora_grads_match_transformers(tmp_path, family):
    model, hf, _ = _build_pair(tmp_path, family)
    assert model.config.model_type == family
    check_padded_batch_against_hf(model, hf, f"{family}_vs_hf")


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_dropping_the_family_feature_is_seen(tmp_path, family):
    """The parity above is not blind to the family: the same model read as a
    plain llama (no window, no bias, no q/k norm) gives logits far outside its
    tolerance. (A check of the check.)"""
    model, hf, ckpt = _build_pair(tmp_path, family)
    ids = torch.randint(0, model.config.vocab_size, (1, 13))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits[0]
    from dataclasses import replace
    plain = replace(model.config, model_type="llama", qkv_bias=False, qk_norm=False,
                    layer_windows=None, head_dim=model.config.head_dim)
    model.config = plain
    for layer in model.base.layers:
        layer.biases, layer.q_norm, layer.k_norm, layer.attention_window = {}, None, None, None
        layer._joined_biases.clear()
    wrong = model.logits(ids)[0]
    assert float((wrong - ref).abs().max()) > 100 * _scaled_atol(ref)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_adapters_both_ways_and_merged_export_read_by_transformers(tmp_path, family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from anita_core.hf.export import export_merged
    from anita_core.lora import load_peft, save_peft

    model, hf, ckpt = _build_pair(tmp_path, family, targets=("q_proj", "k_proj", "o_proj",
                                                             "up_proj", "down_proj"))
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    ours = model.logits(ids)

    save_peft(model.adapters, tmp_path / "anita_adapter")
    peft_loaded = PeftModel.from_pretrained(load_hf_4bit(ckpt), tmp_path / "anita_adapter").train()
    with torch.no_grad():
        ref = peft_loaded(input_ids=ids).logits
    assert_close(f"{family}_vs_hf logits", "PEFT loading anita's adapter", ours, ref,
                 atol=_scaled_atol(ref), rtol=REL)

    hf.save_pretrained(tmp_path / "peft_adapter")
    model.adapters = load_peft(tmp_path / "peft_adapter", model.config)
    with torch.no_grad():
        from_peft = model.logits(ids)
    assert_close(f"{family}_vs_hf logits", "anita loading PEFT's adapter", from_peft, ref,
                 atol=_scaled_atol(ref), rtol=REL)

    out = tmp_path / "merged"
    deltas = {key: model.adapters.delta(*key) for key in model.adapters.adapted()}
    export_merged(model.config, model.base, deltas, out)
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == family
    merged = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").train()
    with torch.no_grad():
        from_merged = merged(input_ids=ids).logits
    assert_close(f"{family}_vs_hf logits", "merged export in transformers", from_merged, ours,
                 atol=_scaled_atol(ours), rtol=REL)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_generation_with_the_cache_equals_recomputation(tmp_path, family):
    """The KV-cache path (model/generate.py: SDPA over the cache, the window applied by
    slot) generates what full recomputation through the training path (flash attention
    with windowed bounds, checked against transformers above) generates, past the
    window: 7 prompt tokens and 9 new ones against Mistral's window of 5; and a
    left-padded batch generates what each prompt generates alone."""
    from anita_core.model.generate import generate
    from tests.test_generate import greedy_by_recomputation

    model, _, _ = _build_pair(tmp_path, family)
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (7,)).tolist()
    assert generate(model, [prompt], max_new_tokens=9) == [greedy_by_recomputation(model, prompt, 9)]
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (3, 8)]
    together = generate(model, prompts, max_new_tokens=6)
    assert together == [generate(model, [p], max_new_tokens=6)[0] for p in prompts]
