"""Build the bundled tiny LLaMA-3-architecture base model (``tiny-llama3/``).

    python -m anita_core.assets.build_base_model

Random weights: projections normal(0, 0.02) as LlamaForCausalLM initializes
them, norms at one, but embeddings and lm_head at std 0.25. With the final
RMSNorm holding the hidden state at unit RMS, lm_head's std sets the logits'
range (std ~ 0.25 * sqrt(64) = 2): at 0.02 every logit stays within about +-1.3
and no adapter can move the loss far below uniform. The bundled tokenizer's vocabulary and special tokens, GQA and llama3
RoPE scaling, saved as a HuggingFace checkpoint (config.json,
model.safetensors, tokenizer files). It exists so that train_sft.py and
train_dpo.py run end to end on a CPU in minutes; it knows no language until
they train it. Deterministic: the same seed writes the same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

from anita_core.assets import ASSETS_DIR, TOKENIZER_DIR
from anita_core.model.config import ModelConfig
from anita_core.data import load_tokenizer

BASE_MODEL_DIR = os.path.join(ASSETS_DIR, "tiny-llama3")


def tiny_config(tokenizer) -> ModelConfig:
    return ModelConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=176,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_id,
        eos_token_id=[tokenizer.end_of_text_id, tokenizer.eos_id], max_position_embeddings=2048)


def random_state_dict(config: ModelConfig, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    normal = lambda *shape, std=0.02: torch.randn(*shape, generator=g) * std  # noqa: E731
    H, I, D = config.hidden_size, config.intermediate_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * D, config.num_key_value_heads * D
    tensors = {"model.embed_tokens.weight": normal(config.vocab_size, H, std=0.25),
               "model.norm.weight": torch.ones(H),
               "lm_head.weight": normal(config.vocab_size, H, std=0.25)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(H),
            p + "post_attention_layernorm.weight": torch.ones(H),
            p + "self_attn.q_proj.weight": normal(q_out, H),
            p + "self_attn.k_proj.weight": normal(kv_out, H),
            p + "self_attn.v_proj.weight": normal(kv_out, H),
            p + "self_attn.o_proj.weight": normal(H, q_out),
            p + "mlp.gate_proj.weight": normal(I, H),
            p + "mlp.up_proj.weight": normal(I, H),
            p + "mlp.down_proj.weight": normal(H, I),
        })
    return tensors


def build(out_dir: str = BASE_MODEL_DIR, seed: int = 0) -> str:
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    config = tiny_config(tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    save_file(random_state_dict(config, seed), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**config.to_hf_dict(), "torch_dtype": "float32"}, f, indent=2, sort_keys=True)
        f.write("\n")
    for name in os.listdir(TOKENIZER_DIR):
        shutil.copyfile(os.path.join(TOKENIZER_DIR, name), os.path.join(out_dir, name))
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=BASE_MODEL_DIR, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    print(f"wrote {build(args.out, args.seed)}")


if __name__ == "__main__":
    main()
