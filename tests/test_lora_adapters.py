"""LoRA adapters: PEFT-style initialization, the parameter container, and the
PEFT on-disk format in both directions (anita -> PEFT, PEFT -> anita), plus
every malformed input and an interrupted save."""
from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from anita_core.lora import peft as lora_peft
from anita_core.model.config import ModelConfig, projection_shapes
from anita_core.lora import LoRAAdapters, LoRAConfig, check_peft, load_peft, peft_key, save_peft
from anita_core.model.weights import PROJECTIONS, projection_module_path
from tests.helpers import assert_close

# Small shapes that differ from one another (q/o use 4 heads x 8 = 32 !=
# hidden 24, k/v use 2 x 8 = 16, MLP 38), so a transposed or swapped matrix
# cannot pass a shape check by accident.
TINY = dict(vocab_size=37, hidden_size=24, intermediate_size=38, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
MODEL = ModelConfig(**TINY)


def hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=False))


def random_adapters(seed, **overrides):
    """Anita-initialized adapters whose B is made non-zero (as after training)."""
    kwargs = dict(r=3, alpha=5.0, dropout=0.05, seed=seed)
    kwargs.update(overrides)
    adapters = LoRAAdapters.init(LoRAConfig(**kwargs), MODEL)
    with torch.no_grad():
        for _, b in (adapters.get(*k) for k in adapters.adapted()):
            b.normal_()
    return adapters


def lora_modules_by_location(peft_model):
    """{(layer, projection): PEFT LoRA module} for every module PEFT adapted."""
    from peft.tuners.lora import LoraLayer
    by_path = {projection_module_path(layer, p): (layer, p)
               for layer in range(MODEL.num_hidden_layers) for p in PROJECTIONS}
    found = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            assert name in by_path, f"PEFT adapted {name}, which is not a projection"
            found[by_path[name]] = module
    return found


# ------------------------------------------------------------------ config
def test_scale_plain_and_rslora():
    assert LoRAConfig(r=16, alpha=32.0).scale == 32.0 / 16
    assert LoRAConfig(r=16, alpha=32.0, use_rslora=True).scale == 32.0 / math.sqrt(16)


def test_config_normalizes_order_and_layers():
    c = LoRAConfig(target_modules=["down_proj", "q_proj"], layers_to_transform=[2, 0])
    assert c.target_modules == ("q_proj", "down_proj")
    assert c.layers_to_transform == (0, 2)
    assert LoRAConfig(layers_to_transform=1).layers_to_transform == (1,)


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_modules=["q_proj", "lm_head"]), "'lm_head'"),
    (dict(target_modules=["q_proj", "qproj"]), "'qproj'"),
    (dict(target_modules="embed_tokens"), "'embed_tokens'"),
    (dict(target_modules=[]), "target_modules is empty"),
    (dict(target_modules=["q_proj", "q_proj"]), "'q_proj' more than once"),
    (dict(r=0), "r must be"),
    (dict(r=2.0), "r must be"),
    (dict(r=True), "r must be"),
    (dict(alpha=0.0), "alpha must be"),
    (dict(alpha=float("nan")), "alpha must be"),
    (dict(dropout=1.0), "dropout must be"),
    (dict(dropout=-0.1), "dropout must be"),
    (dict(use_rslora=1), "use_rslora"),
    (dict(seed=1.5), "seed"),
    (dict(layers_to_transform=[]), "layers_to_transform is empty"),
    (dict(layers_to_transform=[0, -1]), "-1"),
    (dict(layers_to_transform=[1, 1]), "layer 1 more than once"),
])
def test_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        LoRAConfig(**kwargs)


def test_layers_beyond_model_rejected():
    with pytest.raises(ValueError, match="layer 3 does not exist"):
        LoRAAdapters.init(LoRAConfig(layers_to_transform=[0, 3]), MODEL)


# ------------------------------------------------------- (c) initialization
def test_init_follows_peft_rule(fresh_seed):
    """A = torch.nn.Linear(in, r)'s default weight (Kaiming-uniform, a=sqrt(5)),
    drawn in parameters() order from a generator seeded with config.seed; B = 0."""
    cfg = LoRAConfig(r=4, alpha=8.0, seed=fresh_seed, target_modules=["k_proj", "o_proj", "down_proj"],
                     layers_to_transform=[0, 2])
    adapters = LoRAAdapters.init(cfg, MODEL)
    shapes = projection_shapes(MODEL)
    # Independent reconstruction: nn.Linear's own init from the global RNG
    # seeded the same way, one Linear per adapted projection in the same order.
    torch.manual_seed(fresh_seed)
    for layer, projection in adapters.adapted():
        out_features, in_features = shapes[projection]
        a, b = adapters.get(layer, projection)
        expected_a = torch.nn.Linear(in_features, cfg.r, bias=False).weight.detach()
        assert torch.equal(a, expected_a), (layer, projection)
        assert torch.equal(b, torch.zeros(out_features, cfg.r)), (layer, projection)
        assert a.abs().max() <= 1.0 / math.sqrt(in_features), (layer, projection)
    assert adapters.adapted() == [(0, "k_proj"), (0, "o_proj"), (0, "down_proj"),
                                  (2, "k_proj"), (2, "o_proj"), (2, "down_proj")]


def test_init_statistics(fresh_seed):
    """A * sqrt(in) is U(-1, 1): bounded by 1, mean 0, std 1/sqrt(3)."""
    adapters = LoRAAdapters.init(LoRAConfig(r=8, seed=fresh_seed), MODEL)
    normalized = torch.cat([(a.detach() * math.sqrt(a.shape[1])).flatten()
                            for a, _ in (adapters.get(*k) for k in adapters.adapted())])
    n = normalized.numel()  # 8 x 3 layers x 190 input features = 4560
    assert normalized.abs().max() <= 1.0
    # P(no sample above 0.99) = 0.99^4560 ~ e^-46: a truncated range fails here.
    assert normalized.abs().max() > 0.99
    # Mean: standard error 0.577/sqrt(4560) = 0.009; 0.05 is > 5 standard errors.
    assert abs(float(normalized.mean())) < 0.05, n
    # Std: relative standard error sqrt(0.8 / (4 n)) = 0.7%; 5% is > 7 of them.
    assert abs(float(normalized.std()) / (1 / math.sqrt(3)) - 1) < 0.05
    for _, b in (adapters.get(*k) for k in adapters.adapted()):
        assert torch.count_nonzero(b) == 0


def test_init_deterministic_in_seed_only(fresh_seed):
    cfg = LoRAConfig(r=3, seed=fresh_seed)
    rng_before = torch.get_rng_state()
    first = LoRAAdapters.init(cfg, MODEL)
    assert torch.equal(torch.get_rng_state(), rng_before), "init consumed the global RNG"
    torch.manual_seed(fresh_seed + 12345)  # a different global RNG state changes nothing
    torch.rand(7)
    second = LoRAAdapters.init(cfg, MODEL)
    other = LoRAAdapters.init(LoRAConfig(r=3, seed=fresh_seed + 1), MODEL)
    for (n1, t1), (n2, t2), (n3, t3) in zip(first.named_parameters(), second.named_parameters(),
                                            other.named_parameters()):
        assert n1 == n2 == n3
        assert torch.equal(t1, t2), n1
        if ".lora_A." in n1:
            assert not torch.equal(t1, t3), f"{n1}: different seeds gave the same A"


# ------------------------------------------------------------ container API
def test_parameters_are_fp32_leaf_masters_in_stable_order(fresh_seed):
    cfg = LoRAConfig(r=2, seed=fresh_seed, target_modules=["up_proj", "q_proj"],
                     layers_to_transform=[2, 1])
    adapters = LoRAAdapters.init(cfg, MODEL)
    names = [n for n, _ in adapters.named_parameters()]
    assert names == [peft_key(layer, p, m) for layer in (1, 2) for p in ("q_proj", "up_proj")
                     for m in "AB"]
    assert names[0] == "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    assert names[-1] == "base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"
    params = adapters.parameters()
    assert all(p is q for p, (_, q) in zip(params, adapters.named_parameters()))
    assert len(params) == 8
    for p in params:
        assert p.dtype == torch.float32 and p.requires_grad and p.is_leaf and p.is_contiguous()
    shapes = projection_shapes(MODEL)
    assert adapters.num_parameters() == 2 * 2 * (sum(shapes["q_proj"]) + sum(shapes["up_proj"]))
    a, b = adapters.get(1, "q_proj")
    assert a.shape == (2, 24) and b.shape == (32, 2)
    assert adapters.get(1, "k_proj") is None      # projection not targeted
    assert adapters.get(0, "q_proj") is None      # layer not adapted


def test_masters_stay_fp32_when_given_half(fresh_seed):
    cfg = LoRAConfig(r=2, target_modules=["v_proj"], layers_to_transform=[0])
    out_features, in_features = projection_shapes(MODEL)["v_proj"]
    a = torch.randn(2, in_features, dtype=torch.float16)
    b = torch.randn(out_features, 2, dtype=torch.float16)
    adapters = LoRAAdapters(cfg, MODEL, {(0, "v_proj"): (a, b)})
    got_a, got_b = adapters.get(0, "v_proj")
    assert got_a.dtype == got_b.dtype == torch.float32
    assert torch.equal(got_a, a.float()) and torch.equal(got_b, b.float())


def test_disabled_context_restores_state(fresh_seed):
    adapters = LoRAAdapters.init(LoRAConfig(r=2, seed=fresh_seed), MODEL)
    assert adapters.get(0, "q_proj") is not None
    with adapters.disabled():
        assert not adapters.enabled
        assert all(adapters.get(layer, p) is None for layer, p in adapters.adapted())
        with adapters.disabled():   # nesting keeps them off
            pass
        assert not adapters.enabled
    assert adapters.enabled and adapters.get(0, "q_proj") is not None
    with pytest.raises(RuntimeError, match="boom"):
        with adapters.disabled():
            raise RuntimeError("boom")
    assert adapters.enabled


def test_zero_grad(fresh_seed):
    adapters = random_adapters(fresh_seed, target_modules=["o_proj"])
    loss = sum((a.sum() * b.sum()) for a, b in (adapters.get(*k) for k in adapters.adapted()))
    loss.backward()
    assert all(p.grad is not None for p in adapters.parameters())
    adapters.zero_grad(set_to_none=False)
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in adapters.parameters())
    adapters.zero_grad()
    assert all(p.grad is None for p in adapters.parameters())


def test_delta_matches_float64_reference(fresh_seed):
    for use_rslora in (False, True):
        adapters = random_adapters(fresh_seed, use_rslora=use_rslora)
        for layer, projection in adapters.adapted():
            a, b = adapters.get(layer, projection)
            reference = adapters.scale * (b.double() @ a.double())
            # fp32 dot products of r = 3 terms of size <= ~1, times scale <= 2.9:
            # rounding is a few fp32 ulps of values <= ~5, i.e. well under 1e-6.
            assert_close("lora_delta", f"{layer}.{projection}", adapters.delta(layer, projection),
                         reference, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="no adapter"):
        LoRAAdapters.init(LoRAConfig(target_modules=["q_proj"]), MODEL).delta(0, "k_proj")


@pytest.mark.parametrize("call, message", [
    (lambda ad: ad.get(3, "q_proj"), r"layer must be an integer in \[0, 3\)"),
    (lambda ad: ad.get(-1, "q_proj"), "layer must be"),
    (lambda ad: ad.get(0, "lm_head"), "projection must be one of"),
    (lambda ad: ad.delta(0, "proj"), "projection must be one of"),
])
def test_accessors_reject_bad_locations(call, message):
    with pytest.raises(ValueError, match=message):
        call(LoRAAdapters.init(LoRAConfig(r=2), MODEL))


def test_constructor_rejects_bad_weights():
    cfg = LoRAConfig(r=2, target_modules=["k_proj"], layers_to_transform=[1])
    out_features, in_features = projection_shapes(MODEL)["k_proj"]
    good = (torch.zeros(2, in_features), torch.zeros(out_features, 2))
    with pytest.raises(ValueError, match="no weights given for layer 1 k_proj"):
        LoRAAdapters(cfg, MODEL, {})
    with pytest.raises(ValueError, match="layer 0 k_proj, which the LoRAConfig does not adapt"):
        LoRAAdapters(cfg, MODEL, {(1, "k_proj"): good, (0, "k_proj"): good})
    with pytest.raises(ValueError, match=r"layers.1.self_attn.k_proj.lora_A.weight has shape \(24, 2\)"):
        LoRAAdapters(cfg, MODEL, {(1, "k_proj"): (good[0].t(), good[1])})
    with pytest.raises(ValueError, match="lora_B.weight has dtype torch.int64"):
        LoRAAdapters(cfg, MODEL, {(1, "k_proj"): (good[0], good[1].long())})


# ------------------------------------------------- (a) anita -> PEFT round trip
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("targets, layers", [
    (PROJECTIONS, None),
    (("k_proj", "o_proj", "up_proj"), [0, 2]),
])
def test_anita_adapter_loads_in_peft(tmp_path, fresh_seed, use_rslora, targets, layers):
    from peft import PeftModel
    adapters = random_adapters(fresh_seed, use_rslora=use_rslora, target_modules=targets,
                               layers_to_transform=layers)
    out = save_peft(adapters, tmp_path / "adapter", base_model_name_or_path="tiny-llama")
    assert sorted(os.listdir(tmp_path)) == ["adapter"]     # no temp dirs left behind
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]

    base = hf_model()
    base_weights = {name: w.detach().clone() for name, w in base.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, str(out))
    complaints = [str(w.message) for w in caught
                  if any(s in str(w.message).lower() for s in ("missing", "unexpected"))]
    assert not complaints, complaints

    loaded = peft_model.peft_config["default"]
    assert (loaded.r, loaded.lora_alpha, loaded.lora_dropout, loaded.use_rslora) == (
        3, 5.0, 0.05, use_rslora)
    assert set(loaded.target_modules) == set(targets)
    assert loaded.layers_to_transform == layers
    assert loaded.base_model_name_or_path == "tiny-llama"

    modules = lora_modules_by_location(peft_model)
    assert sorted(modules) == sorted(adapters.adapted())
    for (layer, projection), module in modules.items():
        a, b = adapters.get(layer, projection)
        assert torch.equal(module.lora_A["default"].weight, a), (layer, projection)
        assert torch.equal(module.lora_B["default"].weight, b), (layer, projection)
        assert module.scaling["default"] == adapters.scale

    # PEFT's merge adds exactly what anita's delta says (same orientation and scale).
    merged = peft_model.merge_and_unload().state_dict()
    for layer, projection in adapters.adapted():
        name = projection_module_path(layer, projection) + ".weight"
        expected = base_weights[name] + adapters.delta(layer, projection)
        # Both sides add an fp32 delta of size <~5 to an fp32 weight: at most a
        # couple of fp32 ulps (~5e-7) apart from different summation order.
        assert_close("lora_merge_vs_peft", name, merged[name], expected, atol=2e-6, rtol=0)


# ------------------------------------------------- (b) PEFT -> anita round trip
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("peft_targets", [
    dict(target_modules="all-linear"),
    dict(target_modules=["down_proj", "q_proj", "v_proj"], layers_to_transform=[1]),
    dict(target_modules=["gate_proj"], layers_to_transform=2),
    dict(target_modules=r"model\.layers\.[02]\.mlp\.(gate|up)_proj"),
])
def test_peft_adapter_loads_in_anita(tmp_path, fresh_seed, use_rslora, peft_targets):
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(hf_model(), LoraConfig(
        r=5, lora_alpha=7, lora_dropout=0.1, use_rslora=use_rslora, task_type="CAUSAL_LM",
        **peft_targets))
    with torch.no_grad():  # as after training: B non-zero, A moved off its init
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_()
    peft_model.save_pretrained(str(tmp_path / "peft"))

    adapters = load_peft(tmp_path / "peft", MODEL)
    modules = lora_modules_by_location(peft_model)
    assert sorted(adapters.adapted()) == sorted(modules)
    assert (adapters.config.r, adapters.config.alpha, adapters.config.dropout,
            adapters.config.use_rslora) == (5, 7, 0.1, use_rslora)
    for (layer, projection), module in modules.items():
        a, b = adapters.get(layer, projection)
        assert a.dtype == b.dtype == torch.float32 and a.requires_grad and b.requires_grad
        assert torch.equal(a, module.lora_A["default"].weight), (layer, projection)
        assert torch.equal(b, module.lora_B["default"].weight), (layer, projection)
        assert adapters.scale == module.scaling["default"]


def test_anita_round_trip_and_overwrite(tmp_path, fresh_seed):
    first = random_adapters(fresh_seed, target_modules=["q_proj", "gate_proj"])
    second = random_adapters(fresh_seed + 1, r=4, use_rslora=True)
    save_peft(first, tmp_path / "adapter")
    save_peft(second, tmp_path / "adapter")   # replaces the existing adapter
    assert sorted(os.listdir(tmp_path)) == ["adapter"]   # old copy removed
    loaded = load_peft(tmp_path / "adapter", MODEL)
    assert (loaded.config.r, loaded.config.alpha, loaded.config.use_rslora,
            loaded.config.target_modules, loaded.config.layers_to_transform) == (
        4, 5.0, True, PROJECTIONS, None)
    for (n1, t1), (n2, t2) in zip(loaded.named_parameters(), second.named_parameters()):
        assert n1 == n2 and torch.equal(t1, t2), n1


# ------------------------------------------------------------ (d) bad inputs
def _edit_config(**changes):
    def edit(d):
        cfg_path = d / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(changes)
        cfg_path.write_text(json.dumps(cfg))
    return edit


def _edit_tensors(fn):
    def edit(d):
        path = d / "adapter_model.safetensors"
        tensors = load_file(str(path))
        fn(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
    return edit


KEY_A = peft_key(1, "o_proj", "A")   # o_proj A is [r, 32]
KEY_B = peft_key(1, "o_proj", "B")   # o_proj B is [24, r]

BAD_ADAPTERS = {
    "config file missing": (lambda d: (d / "adapter_config.json").unlink(),
                            "adapter_config.json is missing"),
    "weights file missing": (lambda d: (d / "adapter_model.safetensors").unlink(),
                             "adapter_model.safetensors is missing"),
    "config not json": (lambda d: (d / "adapter_config.json").write_text("{r: 3"),
                        "adapter_config.json is not valid JSON"),
    "config not an object": (lambda d: (d / "adapter_config.json").write_text("[1]"),
                             "adapter_config.json must hold a JSON object"),
    "weights not safetensors": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"junk"),
                                "adapter_model.safetensors is not a readable safetensors"),
    "not lora": (_edit_config(peft_type="IA3"), "adapter_config.json: field 'peft_type'"),
    "rank mismatch": (_edit_config(r=4), f"adapter_model.safetensors: key '{peft_key(0, 'q_proj', 'A')}' "
                                         "has rank 3"),
    "bad rank": (_edit_config(r=0), "adapter_config.json: field 'r'"),
    "bad alpha": (_edit_config(lora_alpha="16"), "adapter_config.json: field 'lora_alpha'"),
    "bad dropout": (_edit_config(lora_dropout=1.5), "adapter_config.json: field 'lora_dropout'"),
    "bad rslora": (_edit_config(use_rslora="yes"), "adapter_config.json: field 'use_rslora'"),
    "target not a projection": (_edit_config(target_modules=["q_proj", "lm_head"]),
                                "adapter_config.json: field 'target_modules' names 'lm_head'"),
    "target list empty": (_edit_config(target_modules=[]),
                          "adapter_config.json: field 'target_modules' must be a non-empty"),
    "regex matches nothing": (_edit_config(target_modules=r".*\.lm_head"),
                              "adapter_config.json: field 'target_modules' .* matches no projection"),
    "regex not a product": (_edit_config(target_modules=r"model\.layers\.(0\.self_attn\.q|1\.mlp\.up)_proj"),
                            "adapter_config.json: field 'target_modules' .* different projections"),
    "layer out of range": (_edit_config(layers_to_transform=[0, 3]),
                           "adapter_config.json: field 'layers_to_transform'"),
    "dora": (_edit_config(use_dora=True), "adapter_config.json: field 'use_dora'"),
    "bias": (_edit_config(bias="all"), "adapter_config.json: field 'bias'"),
    "rank pattern": (_edit_config(rank_pattern={"q_proj": 8}), "adapter_config.json: field 'rank_pattern'"),
    "modules to save": (_edit_config(modules_to_save=["lm_head"]),
                        "adapter_config.json: field 'modules_to_save'"),
    "fan in fan out": (_edit_config(fan_in_fan_out=True), "adapter_config.json: field 'fan_in_fan_out'"),
    "pissa init": (_edit_config(init_lora_weights="pissa"),
                   "adapter_config.json: field 'init_lora_weights'"),
    "layers pattern": (_edit_config(layers_pattern="blocks"), "adapter_config.json: field 'layers_pattern'"),
    "config drops a target": (_edit_config(target_modules=["q_proj", "k_proj", "v_proj", "gate_proj",
                                                           "up_proj", "down_proj"]),
                              f"adapter_model.safetensors: unexpected key '{peft_key(0, 'o_proj', 'A')}'"),
    "unexpected key": (_edit_tensors(lambda t: t.update({"base_model.model.lm_head.lora_A.weight":
                                                         torch.zeros(3, 24)})),
                       "adapter_model.safetensors: unexpected key 'base_model.model.lm_head.lora_A.weight'"),
    "missing key": (_edit_tensors(lambda t: t.pop(KEY_B)),
                    f"adapter_model.safetensors: missing key '{KEY_B}'"),
    "wrong base model": (_edit_tensors(lambda t: t.update({KEY_A: torch.zeros(3, 30)})),
                         f"adapter_model.safetensors: key '{KEY_A}' has shape \\(3, 30\\), but the "
                         "model config needs \\(3, 32\\)"),
    "B rank mismatch": (_edit_tensors(lambda t: t.update({KEY_B: torch.zeros(24, 2)})),
                        f"adapter_model.safetensors: key '{KEY_B}' has rank 2"),
    "not 2-d": (_edit_tensors(lambda t: t.update({KEY_A: torch.zeros(3, 32, 1)})),
                f"adapter_model.safetensors: key '{KEY_A}' has shape \\(3, 32, 1\\)"),
    "integer tensor": (_edit_tensors(lambda t: t.update({KEY_A: torch.zeros(3, 32, dtype=torch.int32)})),
                       f"adapter_model.safetensors: key '{KEY_A}' has dtype torch.int32"),
    "non-finite": (_edit_tensors(lambda t: t[KEY_B].__setitem__((4, 1), float("inf"))),
                   f"adapter_model.safetensors: key '{KEY_B}' holds non-finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_load_rejects_bad_adapter(tmp_path, fresh_seed, case):
    corrupt, message = BAD_ADAPTERS[case]
    out = save_peft(random_adapters(fresh_seed), tmp_path / "adapter")
    load_peft(out, MODEL)   # valid before the corruption
    corrupt(out)
    with pytest.raises(ValueError, match=message):
        load_peft(out, MODEL)


# what check_peft (the header-only check the commands run before the base model loads)
# says where its message differs from load_peft's; a NaN is a value: load_peft's alone
HEADER_MESSAGES = {"integer tensor": f"adapter_model.safetensors: key '{KEY_A}' has dtype I32"}


@pytest.mark.parametrize("case", sorted(set(BAD_ADAPTERS) - {"non-finite"}))
def test_check_finds_what_load_finds_without_reading_tensor_data(tmp_path, fresh_seed, case):
    corrupt, message = BAD_ADAPTERS[case]
    out = save_peft(random_adapters(fresh_seed), tmp_path / "adapter")
    assert check_peft(out, MODEL) == load_peft(out, MODEL).config
    corrupt(out)
    with pytest.raises(ValueError, match=HEADER_MESSAGES.get(case, message)):
        check_peft(out, MODEL)


def test_load_rejects_missing_dir_and_bin_only(tmp_path):
    with pytest.raises(ValueError, match="nowhere is not a directory"):
        load_peft(tmp_path / "nowhere", MODEL)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text("{}")
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="adapter_model.safetensors is missing .only adapter_model.bin"):
        load_peft(tmp_path / "bin", MODEL)


def test_load_rejects_wrong_base_model_config(tmp_path, fresh_seed):
    out = save_peft(random_adapters(fresh_seed), tmp_path / "adapter")
    wider = ModelConfig(**dict(TINY, hidden_size=32))
    with pytest.raises(ValueError, match="adapter_model.safetensors: key .* has shape .* different base"):
        load_peft(out, wider)
    fewer_layers = ModelConfig(**dict(TINY, num_hidden_layers=2))
    with pytest.raises(ValueError, match="unexpected key 'base_model.model.model.layers.2."):
        load_peft(out, fewer_layers)


def test_save_refuses_foreign_directory(tmp_path, fresh_seed):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "optimizer.pt").write_bytes(b"precious")
    with pytest.raises(ValueError, match="holds 'optimizer.pt'.*refusing"):
        save_peft(random_adapters(fresh_seed), target)
    assert (target / "optimizer.pt").read_bytes() == b"precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        save_peft(random_adapters(fresh_seed), tmp_path / "file")
    with pytest.raises(ValueError, match="adapters must be LoRAAdapters"):
        save_peft({}, tmp_path / "x")


# ------------------------------------------------------- (e) interrupted save
class SimulatedCrash(RuntimeError):
    pass


def _crash(*args, **kwargs):
    raise SimulatedCrash("simulated crash")


def _crash_when_tmp_takes_the_name(real_rename):
    def rename(src, dst):
        if ".tmp-" in os.fspath(src):
            raise SimulatedCrash("simulated crash between the two renames")
        return real_rename(src, dst)
    return rename


@pytest.mark.parametrize("where", ["after the weights", "before the swap", "during the swap"])
def test_interrupted_save_keeps_previous_adapter(tmp_path, fresh_seed, monkeypatch, where):
    old = random_adapters(fresh_seed)
    out = save_peft(old, tmp_path / "adapter")
    if where == "after the weights":       # weights temp file written, config not yet
        monkeypatch.setattr(lora_peft, "_write_config", _crash)
    elif where == "before the swap":      # both temp files complete, nothing renamed
        monkeypatch.setattr(lora_peft, "_replace_dir", _crash)
    else:                                 # old adapter already moved aside
        monkeypatch.setattr(lora_peft.os, "rename", _crash_when_tmp_takes_the_name(os.rename))
    new = random_adapters(fresh_seed + 1, r=5)
    with pytest.raises(SimulatedCrash):
        save_peft(new, out)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["adapter"], "temp or backup directory left behind"
    loaded = load_peft(out, MODEL)
    assert loaded.config.r == 3
    for (n1, t1), (n2, t2) in zip(loaded.named_parameters(), old.named_parameters()):
        assert n1 == n2 and torch.equal(t1, t2), n1


def test_half_precision_file_loads_as_fp32_masters(tmp_path, fresh_seed):
    """PEFT saves LoRA weights in the model's dtype when autocast is off; anita
    widens them (exactly) to fp32 masters."""
    out = save_peft(random_adapters(fresh_seed, target_modules=["v_proj"]), tmp_path / "adapter")
    path = out / "adapter_model.safetensors"
    stored = {k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}
    save_file(stored, str(path), metadata={"format": "pt"})
    loaded = load_peft(out, MODEL)
    for name, t in loaded.named_parameters():
        assert t.dtype == torch.float32 and torch.equal(t, stored[name].float()), name


@pytest.mark.gpu
def test_cuda_placement_matches_cpu(tmp_path, fresh_seed):
    """Init draws on the CPU, so the values do not depend on the device."""
    cfg = LoRAConfig(r=4, seed=fresh_seed, layers_to_transform=[1])
    on_cpu = LoRAAdapters.init(cfg, MODEL)
    on_gpu = LoRAAdapters.init(cfg, MODEL, device="cuda")
    assert on_gpu.device.type == "cuda"
    for (n1, t1), (_, t2) in zip(on_cpu.named_parameters(), on_gpu.named_parameters()):
        assert t2.is_cuda and t2.requires_grad and t2.is_leaf and torch.equal(t1, t2.cpu()), n1
    out = save_peft(on_gpu, tmp_path / "adapter")
    loaded = load_peft(out, MODEL, device="cuda")
    for (n1, t1), (_, t2) in zip(on_gpu.named_parameters(), loaded.named_parameters()):
        assert t2.is_cuda and torch.equal(t1, t2), n1
