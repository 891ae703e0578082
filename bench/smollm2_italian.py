"""SmolLM2-135M-Instruct fine-tuned on the bundled Italian instruction rows, and
its answer to a fixed Italian prompt before and after (the README's example).

    python bench/smollm2_italian.py --model DIR --out runs/smollm2-it [--epochs 1]

Rows are rendered with the model's own chat template (ChatML) as chat.py renders
prompts, with the loss on the answer tokens only, padded into batches of 8, and
trained with AdamW (lr 1e-3, r 16, alpha 32, all projections) on the active
backend (ANITA_BACKEND; torch on a CPU). Stands in for
``train_sft.py --template chat`` until the SFT CLI accepts tokenizers without the
LLaMA-3 special tokens; the adapter is written in PEFT format to OUT/adapter.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "Qual è il capoluogo della regione Toscana?"


ENGLISH_OPENINGS = {"What", "Translate", "Give", "Which", "Rewrite", "Sort", "Fix", "Classify",
                    "Write", "Name", "Explain", "Summarize"}


def italian_rows() -> list:
    """The bundled instruction rows asked in Italian (the file mixes both languages)."""
    from anita_core.assets import sample_path
    with open(sample_path("instruction"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r["instruction"].split()[0] not in ENGLISH_OPENINGS]


def encode_row(row, model_dir, tokenizer, chat):
    user = row["instruction"].strip() + (f"\n\n{row['input'].strip()}" if row["input"].strip() else "")
    messages = ([{"role": "system", "content": row["system"]}] if row["system"] else []) + \
        [{"role": "user", "content": user}]
    prompt = chat.render_own_chat_template(model_dir, chat.own_chat_template(model_dir), messages)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    answer_ids = tokenizer.encode(row["output"].strip() + "<|im_end|>", add_special_tokens=False).ids
    ids = prompt_ids + answer_ids
    labels = [-100] * len(prompt_ids) + answer_ids
    return ids[:-1], labels[1:]


def batches(encoded, size, pad_id):
    for start in range(0, len(encoded), size):
        chunk = encoded[start:start + size]
        S = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), S), pad_id, dtype=torch.long)
        targets = torch.full((len(chunk), S), -100, dtype=torch.long)
        for b, (i, t) in enumerate(chunk):       # right padding: causal attention never sees it
            ids[b, :len(i)] = torch.tensor(i)
            targets[b, :len(t)] = torch.tensor(t)
        yield ids, targets


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import chat
    from tokenizers import Tokenizer

    from anita_core.hf import load_model
    from anita_core.lora import LoRAAdapters, LoRAConfig, save_peft
    from anita_core.model.generate import generate

    model_dir = Path(args.model)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = load_model(model_dir, progress=False)
    stops = chat.stop_ids(model_dir, tokenizer)
    prompt = chat.render_own_chat_template(model_dir, chat.own_chat_template(model_dir),
                                           [{"role": "user", "content": PROMPT}])
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids

    def answer():
        out = generate(model, [prompt_ids], 40, eos_token_ids=stops)[0]
        return tokenizer.decode([t for t in out if t not in stops], skip_special_tokens=True).strip()

    print(f"prompt: {PROMPT}\nbefore: {answer()}", flush=True)
    rows = italian_rows()
    encoded = [encode_row(r, model_dir, tokenizer, chat) for r in rows]
    model.adapters = LoRAAdapters.init(LoRAConfig(r=16, alpha=32, seed=args.seed), model.config)
    optimizer = torch.optim.AdamW(list(model.adapters.parameters()), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    step, start = 0, time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for ids, targets in batches([encoded[i] for i in order], 8, pad_id=stops[0]):
            optimizer.zero_grad(set_to_none=True)
            n = int((targets != -100).sum())
            loss_sum, _ = model.train_step(ids, targets, grad_scale=1.0 / n)
            optimizer.step()
            step += 1
            print(f"step {step}: loss {float(loss_sum) / n:.3f} ({ids.numel()} tokens, "
                  f"{time.perf_counter() - start:.0f} s)", flush=True)
    model.train(False)
    print(f"{len(rows)} Italian rows, {step} steps\nafter:  {answer()}", flush=True)
    print(save_peft(model.adapters, Path(args.out) / "adapter"))


if __name__ == "__main__":
    main()
