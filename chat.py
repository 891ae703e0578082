#!/usr/bin/env python
"""Talk to a model, without and with a LoRA adapter, side by side.

    python chat.py --model DIR "Qual è la capitale d'Italia?"
    python chat.py --model DIR --adapter runs/sft/adapter "Scrivi una poesia sul mare."
    python chat.py --model DIR --no-template "C'era una volta"

The prompt is rendered as one user turn with the template of --template (auto:
the tokenizer's own chat template from the model folder when it has one, else the
LLaMA-3 chat format when the tokenizer has its special tokens, else the raw text)
and continued greedily (or sampled with --temperature) by anita's KV-cache
generation. With --adapter the answer is printed twice: the base model's, then
the adapted model's. Runs on the backend ANITA_BACKEND picks (torch on a CPU).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TEMPLATES = ("auto", "chat", "llama3", "alpaca", "none")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="the user's message")
    p.add_argument("--model", required=True, help="model folder (config.json, safetensors, tokenizer)")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder (anita's or PEFT's)")
    p.add_argument("--template", default="auto", choices=TEMPLATES,
                   help="how the prompt is rendered (default: %(default)s)")
    p.add_argument("--no-template", dest="template", action="store_const", const="none",
                   help="continue the raw prompt text (same as --template none)")
    p.add_argument("--system", default=None, help="a system message (chat templates)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    return p


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def render_prompt(args, tokenizer) -> str:
    """The prompt as one user turn (after an optional system turn) in --template's format."""
    from anita_core.data import templates
    from anita_core.data.chat_template import ChatTemplateError, render

    template = args.template
    if template == "auto":
        if tokenizer.chat_template is not None:
            template = "chat"
        elif tokenizer.has_token(templates.START_HEADER):
            template = "llama3"
        else:
            template = "none"
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    if template == "chat":
        if tokenizer.chat_template is None:
            raise SystemExit(f"--template chat: {tokenizer.config_name} has no chat template "
                             "(and there is no chat_template.jinja beside it)")
        try:
            return render(tokenizer.chat_template, messages, tokenizer.special_tokens,
                          add_generation_prompt=True)[0]
        except ChatTemplateError as err:
            raise SystemExit(f"--template chat: {tokenizer.config_name}: {err}")
    if template in ("llama3", "alpaca"):
        missing = [t for t in (templates.BEGIN_OF_TEXT, templates.EOT) if not tokenizer.has_token(t)]
        if missing:
            raise SystemExit(f"--template {template}: {tokenizer.name} has no "
                             f"{', '.join(missing)}; try --template chat or --no-template")
        if template == "llama3":
            return templates.render(templates.llama3_chat_segments(messages,
                                                                   add_generation_prompt=True))
        return templates.BEGIN_OF_TEXT + templates.alpaca_prompt(args.system or "", args.prompt, "")
    return (tokenizer.bos_token or "") + args.prompt


def stop_ids(model_dir: Path, tokenizer) -> list:
    """generation_config.json's eos ids, the tokenizer's eos token and the usual
    end-of-turn tokens that exist in this vocabulary."""
    ids = _read_json(model_dir / "generation_config.json").get("eos_token_id", [])
    ids = list(ids) if isinstance(ids, list) else [ids]
    names = [tokenizer.eos_token, "<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "</s>"]
    ids += [tokenizer.token_to_id(n) for n in names if n]
    return sorted({int(i) for i in ids if i is not None})


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: no config.json there")
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise SystemExit(f"--adapter {args.adapter}: no adapter_config.json there")
    if args.max_new_tokens < 1:
        raise SystemExit(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise SystemExit(f"--model {args.model}: no tokenizer.json there")

    from anita_core.data import load_tokenizer
    from anita_core.hf import load_model
    from anita_core.lora import load_peft
    from anita_core.model.generate import generate

    try:
        tokenizer = load_tokenizer(str(model_dir))
    except ValueError as err:
        raise SystemExit(f"--model {args.model}: {err}")
    prompt_ids = tokenizer.encode(render_prompt(args, tokenizer))
    adapters = None
    model = load_model(model_dir, progress=False)
    if args.adapter is not None:   # read before generating: a bad adapter fails fast
        try:
            adapters = load_peft(args.adapter, model.config)
        except ValueError as err:
            raise SystemExit(f"--adapter {args.adapter}: {err}")
    stops = stop_ids(model_dir, tokenizer)

    def answer() -> str:
        out = generate(model, [prompt_ids], args.max_new_tokens, temperature=args.temperature,
                       eos_token_ids=stops, seed=args.seed)[0]
        return tokenizer.decode([t for t in out if t not in stops], skip_special_tokens=True).strip()

    print(f"### base model ({model_dir.name})\n{answer()}\n", flush=True)
    if adapters is not None:
        model.adapters = adapters
        print(f"### with adapter ({args.adapter})\n{answer()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
