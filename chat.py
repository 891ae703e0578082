#!/usr/bin/env python
"""Talk to a model, without and with a LoRA adapter, side by side.

    python chat.py --model DIR "Qual è la capitale d'Italia?"
    python chat.py --model DIR --adapter runs/sft/adapter "Scrivi una poesia sul mare."
    python chat.py --model DIR --no-template "C'era una volta"

The prompt is rendered as one user turn with the template of --template (auto:
the tokenizer's own chat template from the model folder when it has one, else the
LLaMA-3 chat format when the tokenizer has its special tokens, else the raw text)
and continued greedily (or sampled with --temperature). With --adapter the
answer is printed twice: the base model's, then the adapted model's.

Numerics (--numerics; each answer's header says which ran):
  nf4         anita's model: the projections quantized to NF4 on load (or read as
              stored from a bitsandbytes 4-bit checkpoint), the numerics adapters
              are trained with; KV-cache generation on the backend ANITA_BACKEND
              picks (torch on a CPU).
  checkpoint  the weights as stored (bf16, fp32, ...), run by transformers'
              LlamaForCausalLM (+ PEFT for --adapter); needs transformers and peft
              (pip install -e ".[real-model]").
  auto        (default) checkpoint for a merged export (the folder --merge-export
              writes: its weights are NF4 + the LoRA delta, which quantizing again
              would change), nf4 for everything else.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TEMPLATES = ("auto", "chat", "llama3", "alpaca", "none")
NUMERICS = ("auto", "nf4", "checkpoint")


def build_parser() -> argparse.ArgumentParser:
    from anita_core.cli.common import add_threads_argument, add_tokenizer_argument
    from anita_core.cli.flag_types import FlagParser, non_negative_float, positive_int, seed_int, utf8_text
    p = FlagParser(prog="chat.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", type=utf8_text, help="the user's message")
    p.add_argument("--model", required=True, help="model folder (config.json, safetensors, tokenizer)")
    add_tokenizer_argument(p)
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder (anita's or PEFT's)")
    p.add_argument("--template", default="auto", choices=TEMPLATES,
                   help="how the prompt is rendered (default: %(default)s)")
    p.add_argument("--no-template", dest="template", action="store_const", const="none",
                   help="continue the raw prompt text (same as --template none)")
    p.add_argument("--system", default=None, type=utf8_text, help="a system message (chat templates)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="default: %(default)s")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=seed_int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--numerics", default="auto", choices=NUMERICS,
                   help="nf4: anita's NF4 model; checkpoint: the stored weights in transformers; "
                        "auto: checkpoint for a merged export, else nf4 (default: %(default)s)")
    add_threads_argument(p)
    return p


def _read_json(path: Path) -> dict:
    """A JSON object file of the model folder (generation_config.json...); {} when absent."""
    if not path.is_file():
        return {}
    from anita_core.cli.common import usage_error
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:
        usage_error(f"--model: {path}: not valid JSON (nested too deeply)")
    except ValueError as err:      # not JSON, not UTF-8
        usage_error(f"--model: {path}: not valid JSON ({err})")
    if not isinstance(value, dict):
        usage_error(f"--model: {path}: expected a JSON object, got {type(value).__name__}")
    return value


def render_prompt(args, tokenizer) -> str:
    """The prompt as one user turn (after an optional system turn) in --template's format;
    a template this tokenizer cannot render is one line (exit code 2)."""
    from anita_core.data import templates
    from anita_core.data.chat_template import ChatTemplateError, render
    from anita_core.cli.common import usage_error

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
            usage_error(f"--template chat: {tokenizer.config_name} has no chat template "
                        "(and there is no chat_template.jinja beside it)")
        try:
            return render(tokenizer.chat_template, messages, tokenizer.special_tokens,
                          add_generation_prompt=True)[0]
        except ChatTemplateError as err:
            usage_error(f"--template chat: {tokenizer.config_name}: {err}")
    if template in ("llama3", "alpaca"):
        missing = [t for t in (templates.BEGIN_OF_TEXT, templates.EOT) if not tokenizer.has_token(t)]
        if missing:
            usage_error(f"--template {template}: {tokenizer.name} has no "
                        f"{', '.join(missing)}; try --template chat or --no-template")
        if template == "llama3":
            return templates.render(templates.llama3_chat_segments(messages,
                                                                   add_generation_prompt=True))
        return templates.BEGIN_OF_TEXT + templates.alpaca_prompt(args.system or "", args.prompt, "")
    return (tokenizer.bos_token or "") + args.prompt


def stop_ids(model_dir: Path, tokenizer) -> list:
    """generation_config.json's eos ids, the tokenizer's eos token and the usual
    end-of-turn tokens that exist in this vocabulary."""
    path = model_dir / "generation_config.json"
    ids = _read_json(path).get("eos_token_id", [])
    ids = list(ids) if isinstance(ids, list) else [ids]
    if not all(isinstance(i, int) and not isinstance(i, bool) or i is None for i in ids):
        from anita_core.cli.common import usage_error
        usage_error(f"--model: {path}: field 'eos_token_id' must be a token id or a list of them, "
                    f"got {ids!r}")
    names = [tokenizer.eos_token, "<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "</s>"]
    ids += [tokenizer.token_to_id(n) for n in names if n]
    return sorted({int(i) for i in ids if i is not None})


def choose_numerics(args, model_dir: Path) -> str:
    from anita_core.hf.export import MERGED_MARKER
    if args.numerics != "auto":
        return args.numerics
    return "checkpoint" if (model_dir / MERGED_MARKER).is_file() else "nf4"


def describe_numerics(numerics: str, model_dir: Path) -> str:
    """What runs, for the answer's header."""
    config = _read_json(model_dir / "config.json")
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    if numerics == "checkpoint":
        if "quantization_config" in config:
            return "bitsandbytes 4-bit as stored, transformers"
        return f"{stored} weights as stored, transformers"
    if "quantization_config" in config:
        return "NF4 as stored (bitsandbytes 4-bit checkpoint), anita"
    return f"NF4, quantized on load from the {stored} weights, anita"


class TransformersModel:
    """--numerics checkpoint: transformers' LlamaForCausalLM in the stored dtype."""

    def __init__(self, model_dir: Path):
        from anita_core.cli.common import usage_error
        try:
            from transformers import LlamaForCausalLM
        except ImportError:
            usage_error("--numerics checkpoint: needs transformers (pip install -e "
                        "\".[real-model]\"), or use --numerics nf4")
        self.model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype="auto").eval()
        self.base = self.model

    def add_adapter(self, adapter: str) -> None:
        from peft import PeftModel
        self.model = PeftModel.from_pretrained(self.base, adapter).eval()

    def generate(self, prompt_ids, args, stops):
        import torch
        torch.manual_seed(args.seed)
        with torch.no_grad():
            out = self.model.generate(torch.tensor([prompt_ids]), max_new_tokens=args.max_new_tokens,
                                      do_sample=args.temperature > 0,
                                      temperature=args.temperature if args.temperature > 0 else None,
                                      top_k=None, top_p=None, eos_token_id=stops,
                                      pad_token_id=stops[0] if stops else None)
        return out[0, len(prompt_ids):].tolist()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from anita_core.cli.common import apply_threads, usage_error
    from anita_core.train.input_checks import BadInput, check_adapter, check_model
    apply_threads(args.threads)
    # the model folder (config, file headers, tokenizer) and the adapter, checked as the
    # trainers check theirs, before anything loads
    try:
        checked = check_model(args.model, args.tokenizer)
        if args.adapter is not None:
            check_adapter("--adapter", args.adapter, checked.config)
    except BadInput as err:
        usage_error(str(err))
    model_dir, tokenizer = Path(checked.model_dir), checked.tokenizer

    from anita_core.hf import load_model
    from anita_core.lora import load_peft
    from anita_core.model.generate import generate

    try:
        prompt_ids = tokenizer.encode(render_prompt(args, tokenizer))
    except ValueError as err:       # a template that writes text no tokenizer encodes
        usage_error(f"--template {args.template}: the rendered prompt cannot be tokenized: {err}")
    numerics = choose_numerics(args, model_dir)
    stops = stop_ids(model_dir, tokenizer)
    if numerics == "checkpoint":
        runner = TransformersModel(model_dir)

        def tokens():
            return runner.generate(prompt_ids, args, stops)
    else:
        try:      # what the check above cannot see: the values (a NaN weight)
            model = load_model(model_dir, progress=False)
        except (ValueError, FileNotFoundError) as err:
            usage_error(f"--model {args.model}: cannot load the base model: {err}")
        if args.adapter is not None:   # read before generating: a bad adapter fails fast
            try:
                adapters = load_peft(args.adapter, model.config)
            except ValueError as err:
                usage_error(f"--adapter {args.adapter}: {err}")

        def tokens():
            return generate(model, [prompt_ids], args.max_new_tokens, temperature=args.temperature,
                            eos_token_ids=stops, seed=args.seed)[0]

    def answer() -> str:
        return tokenizer.decode([t for t in tokens() if t not in stops], skip_special_tokens=True).strip()

    how = describe_numerics(numerics, model_dir)
    print(f"### base model ({model_dir.name}; {how})\n{answer()}\n", flush=True)
    if args.adapter is not None:
        if numerics == "checkpoint":
            runner.add_adapter(args.adapter)
        else:
            model.adapters = adapters
        print(f"### with adapter ({args.adapter}; {how})\n{answer()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
