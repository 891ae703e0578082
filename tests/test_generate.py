"""Generation with a KV cache against generation by full recomputation."""
from __future__ import annotations

import torch

from anita_core.model.generate import generate
from anita_core.lora import LoRAAdapters, LoRAConfig
from anita_core.hf import load_model
from tests.model_factory import make_tiny_llama_dir


def tiny_model(tmp_path):
    model = load_model(make_tiny_llama_dir(tmp_path), progress=False)
    model.adapters = LoRAAdapters.init(LoRAConfig(r=4, alpha=8, seed=5), model.config)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.2)   # a non-trivial adapter changes the output
    return model


def greedy_by_recomputation(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model.logits(torch.tensor([ids]))[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_greedy_with_cache_equals_full_recomputation(tmp_path):
    model = tiny_model(tmp_path)
    prompt = torch.randint(0, model.config.vocab_size, (7,)).tolist()
    assert generate(model, [prompt], max_new_tokens=9) == [greedy_by_recomputation(model, prompt, 9)]


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tmp_path):
    model = tiny_model(tmp_path)
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (3, 8, 5)]
    together = generate(model, prompts, max_new_tokens=6)
    alone = [generate(model, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone


def test_sampling_is_seeded_and_top_k_1_is_greedy(tmp_path):
    model = tiny_model(tmp_path)
    prompt = [[3, 1, 4, 1, 5]]
    a = generate(model, prompt, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=11)
    b = generate(model, prompt, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=11)
    assert a == b
    assert generate(model, prompt, max_new_tokens=8, temperature=0.7, top_k=1, seed=3) == \
        generate(model, prompt, max_new_tokens=8)


def test_generation_stops_at_eos_and_adapters_change_the_output(tmp_path):
    model = tiny_model(tmp_path)
    prompt = [[2, 7, 1, 8]]
    full = generate(model, prompt, max_new_tokens=8)[0]
    stopped = generate(model, prompt, max_new_tokens=8, eos_token_ids=[full[2]])[0]
    assert stopped == full[:full.index(full[2]) + 1]
    with model.adapters.disabled():
        base_logits = model.logits(torch.tensor(prompt))
    assert not torch.allclose(base_logits, model.logits(torch.tensor(prompt)))
