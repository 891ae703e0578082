"""ModelConfig: reading HF config.json (both RoPE spellings), writing one
transformers loads, projection shapes, and the refusals."""
from __future__ import annotations

import json

import pytest
import torch

from anita_core.model.config import ModelConfig, projection_shapes
from anita_core.model.weights import PROJECTIONS, projection_module_path
from tests.model_factory import TINY_LLAMA3_ROPE_SCALING, tiny_llama_config

import transformers  # noqa: E402

# The published config.json of Llama-3.1-8B-Instruct (top-level rope form).
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}


def _saved_config(tmp_path, **kwargs):
    """A config.json exactly as the installed transformers writes it."""
    tiny_llama_config(**kwargs).save_pretrained(tmp_path)
    return tmp_path


def _expect_same_as_transformers(ours: ModelConfig, theirs) -> None:
    assert ours.vocab_size == theirs.vocab_size
    assert ours.hidden_size == theirs.hidden_size
    assert ours.intermediate_size == theirs.intermediate_size
    assert ours.num_hidden_layers == theirs.num_hidden_layers
    assert ours.num_attention_heads == theirs.num_attention_heads
    assert ours.num_key_value_heads == theirs.num_key_value_heads
    assert ours.head_dim == theirs.head_dim
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token_id == theirs.eos_token_id
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    rope = dict(theirs.rope_parameters)
    assert ours.rope_theta == rope.pop("rope_theta")
    if rope["rope_type"] == "default":
        assert ours.rope_scaling is None
    else:
        assert ours.rope_scaling == rope


@pytest.mark.parametrize("kwargs", [
    dict(),                                                       # GQA 6/2, llama3 rope
    dict(rope_scaling=None, tie_word_embeddings=True),            # plain rope, tied
    dict(hidden_size=40, num_heads=4, num_kv_heads=4, head_dim=12),  # head_dim != hidden/heads
    dict(num_heads=6, num_kv_heads=1),                            # multi-query
])
def test_reads_what_transformers_writes(tmp_path, kwargs):
    directory = _saved_config(tmp_path, **kwargs)
    raw = json.loads((directory / "config.json").read_text())
    assert "rope_parameters" in raw  # transformers 5.x spelling (the case under test)
    from_dir = ModelConfig.from_json(directory)
    from_file = ModelConfig.from_json(directory / "config.json")
    assert from_dir == from_file
    _expect_same_as_transformers(from_dir, transformers.LlamaConfig.from_pretrained(directory))


def test_reads_the_top_level_rope_form_of_older_checkpoints():
    ours = ModelConfig.from_dict(LLAMA_31_8B, source="llama31/config.json")
    _expect_same_as_transformers(ours, transformers.LlamaConfig.from_dict(dict(LLAMA_31_8B)))
    assert ours.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192}
    assert ours.eos_token_ids == [128001, 128008, 128009]
    assert ours.num_kv_groups == 4
    # The pre-"rope_type" spelling of the same thing.
    legacy = dict(LLAMA_31_8B, rope_scaling={k if k != "rope_type" else "type": v
                                             for k, v in LLAMA_31_8B["rope_scaling"].items()})
    assert ModelConfig.from_dict(legacy, source="legacy") == ours


def test_defaults_match_transformers_when_fields_are_absent():
    minimal = {"model_type": "llama", "vocab_size": 50, "hidden_size": 32,
               "intermediate_size": 40, "num_hidden_layers": 1, "num_attention_heads": 4}
    ours = ModelConfig.from_dict(minimal, source="minimal")
    _expect_same_as_transformers(ours, transformers.LlamaConfig.from_dict(dict(minimal)))


@pytest.mark.parametrize("rope_scaling", ["llama3", None])
@pytest.mark.parametrize("tied", [False, True])
def test_to_hf_dict_round_trips_through_transformers(tmp_path, rope_scaling, tied):
    ours = ModelConfig.from_json(_saved_config(tmp_path, rope_scaling=rope_scaling,
                                               tie_word_embeddings=tied))
    hf = ours.to_hf_dict()
    theirs = transformers.LlamaConfig.from_dict(json.loads(json.dumps(hf)))
    _expect_same_as_transformers(ours, theirs)
    assert hf["architectures"] == ["LlamaForCausalLM"]
    assert ModelConfig.from_dict(hf, source="round trip") == ours
    # The legacy top-level fields alone (what transformers 4.x reads) say the same.
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}
    assert ModelConfig.from_dict(legacy, source="legacy round trip") == ours


def test_eos_list_round_trips():
    ours = ModelConfig.from_dict(LLAMA_31_8B, source="x")
    assert ours.to_hf_dict()["eos_token_id"] == [128001, 128008, 128009]


@pytest.mark.parametrize("kwargs", [
    dict(), dict(hidden_size=40, num_heads=4, num_kv_heads=2, head_dim=12),
    dict(num_heads=6, num_kv_heads=1, intermediate_size=77),
])
def test_projection_shapes_match_transformers_modules(tmp_path, kwargs):
    config = tiny_llama_config(**kwargs)
    ours = ModelConfig.from_dict(config.to_dict(), source="tiny")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    modules = dict(model.named_modules())
    shapes = projection_shapes(ours)
    assert tuple(shapes) == PROJECTIONS
    for p in PROJECTIONS:
        assert tuple(modules[projection_module_path(0, p)].weight.shape) == shapes[p], p


def test_projection_shapes_of_llama3_8b():
    shapes = projection_shapes(ModelConfig.from_dict(LLAMA_31_8B, source="8b"))
    assert shapes == {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096),
                      "o_proj": (4096, 4096), "gate_proj": (14336, 4096),
                      "up_proj": (14336, 4096), "down_proj": (4096, 14336)}


# ------------------------------------------------------------------ refusals
def _llama3_params(**changes):
    p = dict(TINY_LLAMA3_ROPE_SCALING, rope_theta=500000.0)
    p.update(changes)
    return {k: v for k, v in p.items() if v is not None}


BAD_CONFIGS = [
    # (change to the tiny config.json, the field the error must name)
    (dict(model_type="gemma"), "model_type"),
    (dict(model_type=None), "model_type"),
    (dict(architectures=["MistralForCausalLM"]), "architectures"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(pretraining_tp=2), "pretraining_tp"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(vocab_size="131"), "vocab_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(head_dim=None, hidden_size=50), "hidden_size"),         # 50 % 6 heads, no head_dim
    (dict(num_key_value_heads=4), "num_key_value_heads"),         # 4 does not divide 6
    (dict(num_key_value_heads=0), "num_key_value_heads"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings"),
    (dict(rope_parameters=_llama3_params(rope_type="yarn")), "rope_parameters"),
    (dict(rope_parameters=_llama3_params(rope_type="linear")), "rope_parameters"),
    (dict(rope_parameters=_llama3_params(factor=None)), "rope_parameters.factor"),
    (dict(rope_parameters=_llama3_params(low_freq_factor=5.0)),
     "rope_parameters.low_freq_factor"),
    (dict(rope_parameters=_llama3_params(rope_theta=0.0)), "rope_theta"),
    (dict(rope_parameters=None, rope_theta=1e4,
          rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling"),
]


@pytest.mark.parametrize("change,field", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_bad_config_names_file_and_field(tmp_path, change, field):
    directory = _saved_config(tmp_path)
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    for key, value in change.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError) as error:
        ModelConfig.from_json(directory)
    message = str(error.value)
    assert str(path) in message and f"'{field}'" in message, message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such config file"):
        ModelConfig.from_json(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)


def test_direct_construction_is_validated():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig(vocab_size=10, hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=3, head_dim=4)
    with pytest.raises(ValueError, match="rope_scaling"):
        ModelConfig(vocab_size=10, hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                    rope_scaling={"rope_type": "yarn", "factor": 4.0})
