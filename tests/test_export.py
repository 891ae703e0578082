"""export_merged: the written checkpoint loads in transformers as
LlamaForCausalLM and holds exactly dequantize(W) + delta; it appears
atomically; bad input is refused."""
from __future__ import annotations

import json

import pytest
import torch

from anita_core.hf.load import load_base_weights
from anita_core.hf.export import export_merged
from anita_core.model.weights import PROJECTIONS, projection_module_path
from csrc_triton import nf4_dequantize
from tests.helpers import assert_close
from tests.model_factory import make_tiny_llama_dir, tiny_llama_state_dict
from tests.reference.nf4 import reference_nf4_dequantize

import transformers  # noqa: E402


@pytest.fixture
def loaded(tmp_path, fresh_seed):
    """(config, base) of a tiny untied llama3 model, fp32, double-quantized NF4."""
    ckpt = make_tiny_llama_dir(tmp_path, seed=fresh_seed)
    return load_base_weights(ckpt, progress=False, blocksize=64, double_quant=True)


@pytest.fixture
def loaded_tied(tmp_path, fresh_seed):
    ckpt = make_tiny_llama_dir(tmp_path, seed=fresh_seed, tie_word_embeddings=True,
                               rope_scaling=None, num_layers=1)
    return load_base_weights(ckpt, progress=False, blocksize=32, double_quant=False)


def _make_deltas(config, base, keys):
    return {(i, p): 0.05 * torch.randn(base.layers[i].projections[p].shape) for i, p in keys}


def _tiny_tokenizer_dir(path):
    """A real (word-level) tokenizer saved by transformers, so the export can be
    loaded with AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "ciao": 3, "mondo": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return path


def _expected_state(config, base, deltas, dtype):
    """What the export must hold: dense tensors as they are, projections
    dequantize(W) + delta in fp32, everything then cast to ``dtype``."""
    expected = {"model.embed_tokens.weight": base.embed_tokens, "model.norm.weight": base.norm}
    if base.lm_head is not None:
        expected["lm_head.weight"] = base.lm_head
    for i, layer in enumerate(base.layers):
        expected[f"model.layers.{i}.input_layernorm.weight"] = layer.input_layernorm
        expected[f"model.layers.{i}.post_attention_layernorm.weight"] = \
            layer.post_attention_layernorm
        for p in PROJECTIONS:
            w = nf4_dequantize(layer.projections[p], torch.float32)
            if (i, p) in deltas:
                w = w + deltas[(i, p)]
            expected[f"{projection_module_path(i, p)}.weight"] = w
    return {k: v.to(dtype) for k, v in expected.items()}


def _load_with_transformers(out_dir):
    model = transformers.LlamaForCausalLM.from_pretrained(out_dir)
    return model, {k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype,max_shard_size", [
    (torch.float32, 2**40), (torch.float32, 30_000), (torch.bfloat16, 40_000),
    (torch.float16, 2**40)])
def test_export_loads_in_transformers_with_merged_weights(tmp_path, loaded, dtype, max_shard_size):
    config, base = loaded
    keys = [(i, p) for i in range(config.num_hidden_layers) for k, p in enumerate(PROJECTIONS)
            if (i + k) % 2 == 0]
    deltas = _make_deltas(config, base, keys)
    tokenizer_dir = _tiny_tokenizer_dir(tmp_path / "tokenizer")
    out = export_merged(config, base, deltas, tmp_path / "merged", tokenizer_dir=tokenizer_dir,
                        dtype=dtype, max_shard_size=max_shard_size)
    assert out == tmp_path / "merged"
    sharded = (out / "model.safetensors.index.json").is_file()
    assert sharded == (max_shard_size < 2**40)
    assert sharded != (out / "model.safetensors").is_file()

    model, state = _load_with_transformers(out)
    expected = _expected_state(config, base, deltas, dtype)
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == dtype, name
        assert torch.equal(state[name], tensor), name
    assert model.config.num_key_value_heads == config.num_key_value_heads
    assert dict(model.config.rope_parameters)["rope_type"] == "llama3"

    # The merged projections against the float64 reference: fp32 decode and
    # fp32 add round once each (<= 1 ulp of |W| + |delta| together), then the
    # cast to dtype rounds once more (half an ulp of dtype).
    unit = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    for (i, p), delta in deltas.items():
        name = f"{projection_module_path(i, p)}.weight"
        reference = reference_nf4_dequantize(base.layers[i].projections[p]) + delta.double()
        bound = float(reference.abs().max() + delta.abs().max())
        assert_close("export_merged", name, state[name], reference,
                     atol=(2**-23 + unit) * bound, rtol=0.0)

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("ciao mondo")["input_ids"] == [3, 4]
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (tokenizer_dir / f).read_bytes()
    assert not list(tmp_path.glob(".merged.*")), "temporary directory left behind"


def test_callable_deltas_and_tied_embeddings(tmp_path, loaded_tied):
    config, base = loaded_tied
    deltas = _make_deltas(config, base, [(0, p) for p in PROJECTIONS])
    asked = []

    def delta_for(layer, projection):
        asked.append((layer, projection))
        return deltas[(layer, projection)] if projection != "v_proj" else None

    out = export_merged(config, base, delta_for, tmp_path / "merged")
    assert sorted(asked) == sorted(deltas)
    del deltas[(0, "v_proj")]
    model, state = _load_with_transformers(out)
    expected = _expected_state(config, base, deltas, torch.float32)
    assert "lm_head.weight" not in tiny_llama_state_dict(out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_no_deltas_round_trips_through_the_loader(tmp_path, loaded):
    """Exporting without deltas and quantizing the export again (single-level)
    gives the same NF4 bytes and the same decoded weights: each block's largest
    element decodes to exactly +-absmax, so the new fp32 absmax is the old
    decoded one, and every other element sits on a code point. (Re-applying
    double quantization would not be idempotent: the nested offset moves.)"""
    config, base = loaded
    out = export_merged(config, base, None, tmp_path / "plain")
    again_config, again = load_base_weights(out, progress=False, double_quant=False)
    assert again_config == config
    for i in range(config.num_hidden_layers):
        for p in PROJECTIONS:
            a, b = base.layers[i].projections[p], again.layers[i].projections[p]
            assert torch.equal(a.packed, b.packed), (i, p)
            assert torch.equal(nf4_dequantize(a), nf4_dequantize(b)), (i, p)
    assert torch.equal(again.embed_tokens, base.embed_tokens)


def test_existing_directory_and_overwrite(tmp_path, loaded):
    config, base = loaded
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_merged(config, base, None, out)
    assert (out / "keep.txt").read_text() == "old"
    export_merged(config, base, None, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []


def test_failure_midway_leaves_nothing(tmp_path, loaded):
    config, base = loaded
    out = tmp_path / "merged"

    def failing(layer, projection):
        if layer == config.num_hidden_layers - 1 and projection == "down_proj":
            raise RuntimeError("adapter store went away")
        return None

    with pytest.raises(RuntimeError, match="went away"):
        export_merged(config, base, failing, out, max_shard_size=20_000)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []


def test_overwrite_failure_keeps_the_old_export(tmp_path, loaded):
    config, base = loaded
    out = export_merged(config, base, None, tmp_path / "merged")
    before = (out / "model.safetensors").read_bytes()
    bad = {(0, "q_proj"): torch.full(base.layers[0].projections["q_proj"].shape, float("nan"))}
    with pytest.raises(ValueError, match="q_proj"):
        export_merged(config, base, bad, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before


def test_refusals(tmp_path, loaded):
    config, base = loaded
    q_shape = tuple(base.layers[0].projections["q_proj"].shape)
    out = tmp_path / "x"
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*shape"):
        export_merged(config, base, {(0, "k_proj"): torch.zeros(q_shape)}, out)
    with pytest.raises(ValueError, match="not a \\(layer, projection\\)"):
        export_merged(config, base, {(5, "q_proj"): torch.zeros(q_shape)}, out)
    with pytest.raises(ValueError, match="not a \\(layer, projection\\)"):
        export_merged(config, base, {(0, "qkv_proj"): torch.zeros(q_shape)}, out)
    with pytest.raises(ValueError, match="must be a dict"):
        export_merged(config, base, [torch.zeros(q_shape)], out)
    with pytest.raises(ValueError, match="dtype"):
        export_merged(config, base, None, out, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_shard_size"):
        export_merged(config, base, None, out, max_shard_size=0)
    with pytest.raises(FileNotFoundError, match="tokenizer_dir"):
        export_merged(config, base, None, out, tokenizer_dir=tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer files"):
        export_merged(config, base, None, out, tokenizer_dir=tmp_path / "empty")
    untied = json.loads(json.dumps(config.to_hf_dict()))
    untied["tie_word_embeddings"] = True
    from anita_core.model.config import ModelConfig
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        export_merged(ModelConfig.from_dict(untied, "x"), base, None, out)
    with pytest.raises(ValueError, match="layers"):
        export_merged(ModelConfig.from_dict(dict(untied, tie_word_embeddings=False,
                                                 num_hidden_layers=3), "x"), base, None, out)
    assert not out.exists()
